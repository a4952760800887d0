"""`llm-audit SOURCE --plan`: what an audit would analyse, download, skip and cost — from
headers only, before any shard is downloaded or any tensor read.

- a hub id ``org/name[@rev]``: ``config.json`` (small, through the hub cache) and every shard's
  safetensors header through ``huggingface_hub.get_safetensors_metadata`` (HTTP range requests
  of the first bytes of each shard). No shard is downloaded. The headers become `TensorInfo`
  records whose `file` is the shard's name in the repo and whose offsets are relative to the
  shard's data region (the header's own length is not known without the shard).
- a local file or folder (safetensors or GGUF): `source.open_checkpoint`, which reads and
  validates headers only.

Either way the tensors go through the audit's own planner (`pipeline.plan`: `plan_checkpoint`
or `plan_gguf`, then --include/--exclude), so the jobs are those the audit would run. The
download list is `hub.pick_shards`, what `hub.open_hub` fetches.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

from .errors import FormatError, SourceError
from .hub import SINGLE_FILE, HubRef, hub_error, offline, parse_hub_id, pick_shards
from .options import AuditOptions
from .plan import owner_name
from .routing import MatrixJob, Skipped, is_ignored
from .safetext import clip
from .source import INDEX_NAME, Checkpoint, TensorInfo

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"

#: Per-matrix analysis seconds on a CPU, c·N·M² (Gram product) + e·M³ (eigensolve) + d, N = max
#: and M = min of the shape, per trap rule ("none" = --no-randomize): (c, e, d). What
#: analysis.analyse_matrix runs (spectral.esd, the fits, the rule and its anatomy); reading and
#: decoding are not included. Measured by `OMP_WAIT_POLICY=PASSIVE python3
#: benchmarks/plan_cost_model.py` on this project's 2-core machine (torch 2.13 CPU, 2 threads,
#: load average ~4.9 from other jobs), float32 Gaussian matrices 256²..2048² and 4:1 to 2:1
#: rectangular; rms relative error 14-40% over those sizes (two runs differ by up to 2x on a
#: size: the load); benchmarks/results/plan_cost_model.txt.
#: Real weights cost more where they have traps (their anatomy): on all-MiniLM-L6-v2 the audit's
#: summed per-matrix seconds were 1.1-1.5x (none), 2.5-2.9x (ww), 2.7-2.8x (tw) the prediction
#: (two runs).
#: Not measured on a GPU: a cuda estimate is "unknown".
CPU_COST = MappingProxyType({
    "none": (2.672e-11, 2.931e-10, 3.047e-02),
    "ww": (1.562e-10, 2.365e-10, 3.772e-02),
    "tw": (2.861e-10, 6.138e-11, 1.521e-02),
    "perm": (1.483e-09, 0.0, 1.751e-01),
})
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def matrix_seconds(N: int, M: int, count: int, device_type: str, trap_rule: str) -> float | None:
    """Estimated analysis seconds of `count` matrices of shape (N, M) (either order) on
    `device_type` with `trap_rule` ("none": no trap analysis); None where unmeasured (cuda)."""
    if device_type != "cpu":
        return None
    c, e, d = CPU_COST[trap_rule]
    n, m = max(N, M), min(N, M)
    return count * (c * n * m * m + e * m ** 3 + d)


@dataclass(frozen=True)
class ShardPlan:
    """One file of the checkpoint. `bytes`: a hub shard's tensor data (its header excluded) or a
    local file's size; `planned_bytes`: bytes of planned matrices and their scales in it."""

    name: str
    bytes: int
    planned_bytes: int
    matrices: int
    download: bool = False  # a hub shard the audit would download


@dataclass(frozen=True)
class Estimate:
    seconds: float | None  # None: unknown on this device
    device: str
    trap_rule: str  # "none" with --no-randomize
    matrices: int
    note: str


@dataclass(frozen=True)
class AuditPlan:
    """What `audit(source, options)` would do, decided from headers alone."""

    source: str
    model: str
    revision: str | None
    format: str
    hub: bool
    jobs: tuple[MatrixJob, ...]
    skipped: tuple[Skipped, ...]
    ignored: tuple[tuple[str, int], ...]  # (reason, tensors): biases, norms, buffers, 1-D
    filtered_out: int  # jobs --include/--exclude drop
    shards: tuple[ShardPlan, ...]
    estimate: Estimate
    options: AuditOptions

    @property
    def matrices(self) -> int:
        return sum(job_matrices(j) for j in self.jobs)

    @property
    def read_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    @property
    def download_bytes(self) -> int:
        return sum(s.bytes for s in self.shards if s.download)

    def to_json(self) -> dict:
        return {
            "source": self.source, "model": self.model, "revision": self.revision,
            "format": self.format, "hub": self.hub,
            "options": {f.name: getattr(self.options, f.name) for f in fields(self.options)},
            "matrices": [job_row(j, self.estimate) for j in self.jobs],
            "skipped": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape),
                         "reason": s.reason} for s in self.skipped],
            "ignored": dict(self.ignored), "filtered_out": self.filtered_out,
            "shards": [vars_(s) for s in self.shards],
            "totals": {"jobs": len(self.jobs), "matrices": self.matrices,
                       "read_bytes": self.read_bytes, "download_bytes": self.download_bytes,
                       "download_files": [s.name for s in self.shards if s.download]},
            "estimate": vars_(self.estimate),
        }

    def write(self, out: str | Path) -> Path:
        from .jsonio import dumps
        from .report.writers import atomic_write

        path = Path(out) / PLAN_FILE
        atomic_write(path, dumps(self.to_json(), indent=1) + "\n")
        return path


def vars_(record) -> dict:
    return {f.name: getattr(record, f.name) for f in fields(record)}


def job_matrices(job: MatrixJob) -> int:
    return len(job.fused) or 1


def job_shape(job: MatrixJob) -> tuple[int, int]:
    """(rows, cols) of each matrix the job gives (a fused tensor split into its modules)."""
    rows, cols = job.matrix_shape
    k = len(job.fused)
    if k:
        return (rows // k, cols) if job.fused_dim == 0 else (rows, cols // k)
    return rows, cols


def job_row(job: MatrixJob, estimate: Estimate | None = None) -> dict:
    """The plan.json row of one job (the audit's layers.csv columns it already knows)."""
    rows, cols = job_shape(job)
    seconds = None if estimate is None else matrix_seconds(
        rows, cols, job_matrices(job), estimate.device, estimate.trap_rule)
    return {"name": job.name, "layer": job.layer, "module": job.module,
            "hf_module": job.hf_module or job.module, "expert": job.expert,
            "shape": [rows, cols], "N": max(rows, cols), "M": min(rows, cols),
            "dtype": job.parts[0].dtype if job.scheme in ("dense", "gguf") else job.scheme,
            "scheme": job.scheme, "matrices": job_matrices(job), "fused": list(job.fused),
            "transposed": job.transposed, "file": str(job.parts[0].file),
            "bytes": job.nbytes, "seconds": seconds}


def plan_source(source: str | Path, options: AuditOptions | None = None) -> AuditPlan:
    """The plan of `source` (a local file or folder, or a hub id) under `options`."""
    opts = options or AuditOptions()
    device = opts.torch_device().type  # a bad --device fails here, as in audit()
    ref = None if Path(source).exists() else parse_hub_id(str(source))
    if ref is None:
        from .source import open_checkpoint

        ckpt = open_checkpoint(source)  # headers only (pickles are refused: they have none)
        shards = tuple((str(f), f.stat().st_size, False) for f in ckpt.files)
    else:
        ckpt, shards = _hub_checkpoint(ref, opts)
    return _assemble(str(source), ckpt, shards, opts, device, hub=ref is not None)


def _assemble(source: str, ckpt: Checkpoint, shards: tuple[tuple[str, int, bool], ...],
              opts: AuditOptions, device: str, hub: bool) -> AuditPlan:
    from .pipeline import plan

    jobs, skipped = plan(ckpt, opts)
    filtered = 0
    if opts.include is not None or opts.exclude is not None:
        filtered = len(plan(ckpt, AuditOptions())[0]) - len(jobs)
    planned: Counter[str] = Counter()
    matrices: Counter[str] = Counter()
    for j in jobs:
        matrices[str(j.parts[0].file)] += job_matrices(j)
        for p in j.parts:
            planned[str(p.file)] += p.nbytes
    shard_plans = tuple(ShardPlan(name, size, planned[name], matrices[name], download)
                        for name, size, download in shards)
    rule = opts.trap_rule if opts.randomize else "none"
    estimate = _estimate(jobs, device, rule)
    log.info("%s: %d jobs, %d skipped, estimate %s s", source, len(jobs), len(skipped),
             estimate.seconds)
    return AuditPlan(source, ckpt.name, ckpt.revision, ckpt.format, hub, tuple(jobs),
                     tuple(skipped), _ignored(ckpt.tensors, opts), filtered, shard_plans,
                     estimate, opts)


def _estimate(jobs: list[MatrixJob], device: str, rule: str) -> Estimate:
    n = sum(job_matrices(j) for j in jobs)
    if device != "cpu":
        return Estimate(None, device, rule, n, f"unknown: the cost model is measured on CPU "
                        f"only, not on {device}")
    total = sum(matrix_seconds(*job_shape(j), job_matrices(j), device, rule) for j in jobs)
    return Estimate(total, device, rule, n, "analysis only, from a cost model of Gaussian "
                    "matrices on a 2-core CPU (benchmarks/plan_cost_model.py); real weights with "
                    "traps took 2.5-3x longer (all-MiniLM-L6-v2); reading, decoding, downloads "
                    "and float64 redos not included")


def _ignored(tensors: tuple[TensorInfo, ...], opts: AuditOptions) -> tuple[tuple[str, int], ...]:
    """Tensors that are not weight matrices (not in the skipped table), by reason."""
    counts = Counter(why for t in tensors if owner_name(t.name) == t.name and opts.wants(t.name)
                     and (why := is_ignored(t)))
    return tuple(sorted(counts.items()))


# --- the hub: headers by HTTP range requests, nothing downloaded but config.json ------------

def _hub_checkpoint(ref: HubRef, opts: AuditOptions
                    ) -> tuple[Checkpoint, tuple[tuple[str, int, bool], ...]]:
    from . import hub
    from .source import _read_config

    meta = _hub_metadata(ref)
    try:
        tensors, sizes = hub_tensors(meta.weight_map, meta.files_metadata)
    except FormatError as e:
        raise FormatError(f"{ref}: {e}") from None
    config = hub._fetch(ref, "config.json", ref.revision, optional=True)
    revision = ref.revision
    if config is not None and _SHA_RE.match(config.parent.name):
        revision = config.parent.name  # the snapshot folder: the commit the hub resolved
    text = _read_config(config) if config is not None else "{}"
    wanted = set(pick_shards(meta.weight_map, opts)) if meta.sharded else {SINGLE_FILE}
    shards = tuple((s, sizes[s], s in wanted) for s in sorted(sizes))
    ckpt = Checkpoint(ref.repo, Path(ref.repo), tuple(Path(s) for s in sorted(sizes)),
                      tuple(tensors), text, revision)
    return ckpt, shards


def hub_tensors(weight_map: Mapping[str, str], files: Mapping[str, object]
                ) -> tuple[list[TensorInfo], dict[str, int]]:
    """TensorInfo records from huggingface_hub's per-shard headers, validated and routed as
    `open_checkpoint` does (shards in name order, tensors in file order, each tensor where the
    weight map says), and each shard's data bytes."""
    from .source import _check_layout, _tensor_info

    tensors: list[TensorInfo] = []
    sizes: dict[str, int] = {}
    for shard in sorted(set(weight_map.values())):
        if shard not in files:
            raise FormatError(f"{INDEX_NAME} maps tensors to {clip(shard)!r} but the hub gave "
                              "no header for it")
        path = Path(shard)
        ts = [_tensor_info(path, name, {"dtype": ti.dtype, "shape": list(ti.shape),
                                        "data_offsets": list(ti.data_offsets)}, 0)
              for name, ti in files[shard].tensors.items()]
        sizes[shard] = max((t.end for t in ts), default=0)
        _check_layout(path, ts, 0, sizes[shard])
        ts.sort(key=lambda t: (t.begin, t.end))
        tensors.extend(t for t in ts if weight_map.get(t.name) == shard)
    missing = sorted(set(weight_map) - {t.name for t in tensors})
    if missing:
        raise FormatError(f"tensor {clip(missing[0])!r} is mapped to shard "
                          f"{clip(weight_map[missing[0]])!r} but that shard's header does not "
                          f"list it ({len(missing)} missing)")
    return tensors, sizes


def _hub_metadata(ref: HubRef):
    """huggingface_hub's SafetensorsRepoMetadata of `ref`, its failures as one-line errors."""
    import huggingface_hub
    from huggingface_hub.errors import (
        HFValidationError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        SafetensorsParsingError,
    )

    if offline():
        raise _offline(ref)
    try:
        return huggingface_hub.get_safetensors_metadata(ref.repo, revision=ref.revision)
    except NotASafetensorsRepoError:
        raise SourceError(f"{ref}: the repo has no {SINGLE_FILE} or {INDEX_NAME}; --plan reads "
                          "safetensors headers from the hub (a GGUF repo: download the .gguf "
                          "file and plan it locally)") from None
    except SafetensorsParsingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{ref}: a shard's safetensors header cannot be parsed "
                          f"({clip(first)})") from None
    except OfflineModeIsEnabled:
        raise _offline(ref) from None
    except HFValidationError as e:
        raise SourceError(f"{ref}: not a local path, and not a valid hub repo id ({e})") from None
    except Exception as e:  # noqa: BLE001 - huggingface_hub's HTTP errors, mapped to one line
        raise hub_error(ref, e) from e


def _offline(ref: HubRef) -> SourceError:
    return SourceError(f"{ref}: --plan reads the shards' headers from the Hugging Face hub, "
                       "which cannot be reached (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE, or "
                       "plan a downloaded copy by its local path")


# --- the terminal table ------------------------------------------------------------------------

def plan_lines(p: AuditPlan, max_shards: int = 20) -> list[str]:
    """The plan as terminal lines (untrusted names: the caller makes each line terminal-safe):
    the matrices grouped by module, dtype and shape, skips by reason, downloads, the estimate."""
    rev = f"@{p.revision}" if p.revision else ""
    lines = [f"{p.model}{rev} ({p.format}{', hub' if p.hub else ''}): {len(p.jobs)} jobs, "
             f"{p.matrices} matrices, {_size(p.read_bytes)} of weights to read",
             f"{'module':<16} {'dtype':<12} {'shape':>12} {'matrices':>8} {'layers':>9} "
             f"{'bytes':>10} {'seconds':>9}"]
    for (module, dtype, shape), group in _groups(p).items():
        layers = sorted({j.layer for j in group if j.layer is not None})
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]) if layers \
            else "-"
        secs = matrix_seconds(*shape, sum(map(job_matrices, group)), p.estimate.device,
                              p.estimate.trap_rule)
        lines.append(f"{_cut(module, 16):<16} {dtype:<12} {'x'.join(map(str, shape)):>12} "
                     f"{sum(map(job_matrices, group)):>8} {span:>9} "
                     f"{_size(sum(j.nbytes for j in group)):>10} "
                     f"{'?' if secs is None else f'{secs:.1f}':>9}")
    reasons = Counter(s.reason for s in p.skipped)
    for reason, n in reasons.most_common():
        lines.append(f"skipped {n}: {reason}")
    if p.ignored:
        lines.append("not weight matrices: " + ", ".join(f"{why} {n}" for why, n in p.ignored))
    if p.filtered_out:
        lines.append(f"left out by --include/--exclude: {p.filtered_out} jobs")
    lines += _shard_lines(p, max_shards)
    e = p.estimate
    when = "unknown" if e.seconds is None else f"{e.seconds:.1f} s"
    lines.append(f"estimate on {e.device} (trap rule {e.trap_rule}): {when}; {e.note}")
    return lines


def _groups(p: AuditPlan) -> dict[tuple[str, str, tuple[int, int]], list[MatrixJob]]:
    out: dict[tuple[str, str, tuple[int, int]], list[MatrixJob]] = {}
    for j in p.jobs:
        row = job_row(j)
        module = "+".join(j.fused) if j.fused else j.module
        out.setdefault((module, row["dtype"], job_shape(j)), []).append(j)
    return out


def _shard_lines(p: AuditPlan, limit: int) -> list[str]:
    if not p.hub:
        return [f"files: {len(p.shards)}, {_size(sum(s.bytes for s in p.shards))} (local: "
                "nothing to download)"]
    down = [s for s in p.shards if s.download]
    lines = [f"download: {len(down)} of {len(p.shards)} shard(s), {_size(p.download_bytes)} "
             "(tensor data; + config.json)"]
    for s in down[:limit]:
        lines.append(f"  {s.name}  {_size(s.bytes)}  ({s.matrices} matrices, "
                     f"{_size(s.planned_bytes)} planned)")
    if len(down) > limit:
        lines.append(f"  ... and {len(down) - limit} more")
    return lines


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"
