"""End to end on one GPU: a synthetic gpt-oss-20b-shaped checkpoint is generated on this machine's
disk and audited by `llm_audit.audit()`, with a projection for the 120b shape.

    python benchmarks/gpu_gptoss.py [--json out.json] [--keep] [--out DIR]
    python benchmarks/gpu_gptoss.py --device cpu --layers 2 --experts 2 --width 256 --vocab 2048

Checkpoint (nothing downloaded): the HF gpt-oss layout at full widths by default — 24 layers,
32 experts, hidden = intermediate = 2880, vocab 201088; experts MXFP4 (`gate_up_proj_blocks`
[E, 5760, 90, 16] + `_scales` [E, 5760, 90], `down_proj_blocks` [E, 2880, 90, 16] + scales, BF16
biases), attention BF16 with biases (q [4096, 2880], k/v [512, 2880], o [2880, 4096], sinks
[64]), router [E, 2880] + bias, layernorms, embeddings and `lm_head` [201088, 2880] BF16;
~13.8 GB in ~4.5 GB shards + `model.safetensors.index.json` + config.json. Weights are
heavy-tailed (Student-t, nu = 3, x 0.02) plus a planted rank-16 part (x 0.002), so the alpha fits
and the traps have something to find. They are drawn and MXFP4-encoded on the device, a few
experts at a time, and written shard by shard with `safetensors.torch.save_file` (one shard
in host RAM at a time). Each shard is fsync'ed and dropped from the page cache
(`posix_fadvise(DONTNEED)`), and the share of its pages still resident is read back with
`mincore`, so the audit reads from disk; the output says whether that worked. Generation time is
reported apart and is not part of the audit time.

Audit: one `llm_audit.audit(folder, device=..., trap_rule=..., precision=..., seed=...,
max_spectra=0)` call in this process, timed around the call (wall). Printed: GB/s (checkpoint
bytes / audit wall), matrices/s, GPU memory peak (`max_memory_allocated`/`_reserved`, reset
after generation), the stages' busy seconds from `summary["stage_seconds"]` (read, decode, eigen,
fit, traps; `wait` = main thread waiting for the background reader) as shares of their sum and
of the wall (reading and decoding overlap the compute, so busy seconds can add up to more than
the wall), a sanity line (alpha median, traps), and PASS/FAIL against the 180 s target (full
20b shape only). Missing per-matrix timing columns or summary keys print as NaN; an audit()
that does not know `precision` is called without it (said in the output).

Projection: 120b (36 layers x 128 experts, same widths, ~65 GB) does not fit the 64 GB device
disk, so it is projected from this run's measured per-matrix costs: mean main-thread compute
(eigen + fit + traps; `seconds` if those columns are missing) per matrix class (expert 2880x2880,
q, k, v, o, router, embed/lm_head) x that class's count in 120b; I/O = 120b bytes / measured
read+decode throughput; projection = max(compute, I/O) (they overlap), sum = pessimistic bound;
target 900 s. The 20b shape is projected the same way (at full size: a check against the
measured wall). A reduced run at full width (`--layers 1 --experts 2`) measures the real expert
and attention costs; at a reduced width the projections are sanity numbers only.

`--budget S` stops the audit (via the progress callback) so that the script ends within S
seconds, and SIGTERM does the same: the report is then printed from the matrices done so far,
marked PARTIAL. Exit code 0 complete, 3 partial, 1 error.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llm_audit  # noqa: E402

SHAPE_20B = {"layers": 24, "experts": 32, "width": 2880, "vocab": 201088}
SHAPE_120B = {"layers": 36, "experts": 128, "width": 2880, "vocab": 201088}
TARGET_20B_S, TARGET_120B_S = 180.0, 900.0
GB = 1e9
STAGES = ("read", "decode", "eigen", "fit", "traps")
STAGE_LABELS = {"read": "read (I/O)", "decode": "decode", "eigen": "eigenvalues", "fit": "fit",
                "traps": "traps", "wait": "wait (main thread on reader)"}
TIME_COLUMNS = {"read": "read_seconds", "decode": "decode_seconds", "eigen": "eigen_seconds",
                "fit": "fit_seconds", "traps": "trap_seconds"}
CLASSES = ("expert", "q_proj", "k_proj", "v_proj", "o_proj", "router", "embed/lm_head")
BYTES = {"BF16": 2, "U8": 1}
TORCH = {"BF16": torch.bfloat16, "U8": torch.uint8}
FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between FP4 magnitudes 0, .5 .. 4, 6
CHUNK_ELEMS = 1 << 26  # float32 values drawn per step on the device (~256 MB, x5 for temporaries)


class Interrupted(Exception):
    """The audit was stopped (budget reached or SIGTERM); the report uses the rows so far."""


# ---------------------------------------------------------------- checkpoint layout and bytes

@dataclass(frozen=True)
class Unit:
    """Tensors generated together: `kind` is dense (heavy-tailed BF16 weight), mxfp4 (blocks +
    scales of one expert stack), zeros or ones."""

    kind: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * BYTES[d] for s, d in zip(self.shapes, self.dtypes, strict=True))


def attention_dims(width: int) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim): gpt-oss's 64 x 64 (q 4096) and 8 kv heads at width 2880,
    scaled with the width otherwise (heads a multiple of 8)."""
    heads = max(8, round(64 * width / 2880 / 8) * 8)
    return heads, heads // 8, 64


def checkpoint_units(layers: int, experts: int, width: int, vocab: int) -> list[Unit]:
    def one(kind, name, shape, dtype="BF16"):
        return Unit(kind, (name,), (tuple(shape),), (dtype,))

    heads, kv, hd = attention_dims(width)
    W, E, B = width, experts, width // 32
    units = [one("dense", "model.embed_tokens.weight", (vocab, W))]
    for i in range(layers):
        p = f"model.layers.{i}."
        units += [
            one("ones", p + "input_layernorm.weight", (W,)),
            one("dense", p + "self_attn.q_proj.weight", (heads * hd, W)),
            one("zeros", p + "self_attn.q_proj.bias", (heads * hd,)),
            one("dense", p + "self_attn.k_proj.weight", (kv * hd, W)),
            one("zeros", p + "self_attn.k_proj.bias", (kv * hd,)),
            one("dense", p + "self_attn.v_proj.weight", (kv * hd, W)),
            one("zeros", p + "self_attn.v_proj.bias", (kv * hd,)),
            one("dense", p + "self_attn.o_proj.weight", (W, heads * hd)),
            one("zeros", p + "self_attn.o_proj.bias", (W,)),
            one("zeros", p + "self_attn.sinks", (heads,)),
            one("ones", p + "post_attention_layernorm.weight", (W,)),
            one("dense", p + "mlp.router.weight", (E, W)),
            one("zeros", p + "mlp.router.bias", (E,)),
        ]
        for proj, rows in (("gate_up_proj", 2 * W), ("down_proj", W)):
            q = p + f"mlp.experts.{proj}"
            units += [Unit("mxfp4", (q + "_blocks", q + "_scales"),
                           ((E, rows, B, 16), (E, rows, B)), ("U8", "U8")),
                      one("zeros", q + "_bias", (E, rows))]
    units += [one("ones", "model.norm.weight", (W,)),
              one("dense", "lm_head.weight", (vocab, W))]
    return units


def checkpoint_bytes(shape: dict) -> int:
    return sum(u.nbytes for u in checkpoint_units(**shape))


def class_counts(shape: dict) -> dict[str, int]:
    """Matrices the audit analyses per class (the fused gate_up is two matrices per expert)."""
    L = shape["layers"]
    return {"expert": 3 * L * shape["experts"], "q_proj": L, "k_proj": L, "v_proj": L,
            "o_proj": L, "router": L, "embed/lm_head": 2}


def gpt_oss_config(layers: int, experts: int, width: int, vocab: int) -> dict:
    heads, kv, hd = attention_dims(width)
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
            "num_hidden_layers": layers, "hidden_size": width, "intermediate_size": width,
            "num_local_experts": experts, "experts_per_token": 4, "vocab_size": vocab,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
            "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                "lm_head"]}}


def plan_shards(units: list[Unit], shard_bytes: int) -> list[list[Unit]]:
    shards: list[list[Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


# ---------------------------------------------------------------- generation on the device

def heavy_tailed(gen: torch.Generator, lead: int, rows: int, cols: int, device: torch.device,
                 u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 [lead, rows, cols]: Student-t (nu = 3) x 0.02 + (u @ v) x 0.002 (u [lead, rows, r],
    v [lead, r, cols])."""
    z = torch.randn((lead, rows, cols), generator=gen, device=device)
    chi2 = torch.randn((lead, rows, cols), generator=gen, device=device).square_()
    for _ in range(2):
        chi2.add_(torch.randn((lead, rows, cols), generator=gen, device=device).square_())
    W = z.mul_(chi2.div_(3.0).rsqrt_()).mul_(0.02)
    return W.add_(torch.matmul(u, v), alpha=0.002)


def encode_mxfp4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., R, C] -> blocks U8 [..., R, C/32, 16], scales U8 [..., R, C/32], on W's device.
    The encoder of tests/checkpoints.py (same rounding, ties to the smaller magnitude; low nibble
    = even position), with its midpoints on the device."""
    *lead, R, C = W.shape
    x = W.to(torch.float32).reshape(*lead, R, C // 32, 32)
    amax = x.abs().amax(-1).to(torch.float64)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    e = e.clamp(-127, 127)
    q = x / torch.exp2(e).to(torch.float32).unsqueeze(-1)  # exact: a power of two
    mids = torch.tensor(FP4_MIDPOINTS, device=W.device)
    mag = torch.bucketize(q.abs(), mids, out_int32=True)  # nearest magnitude code 0..7
    codes = (mag | (torch.signbit(q).to(mag.dtype) << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8)


def generate_unit(u: Unit, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The unit's tensors on the CPU, drawn and encoded on `device` a chunk at a time."""
    if u.kind in ("zeros", "ones"):
        fill = torch.zeros if u.kind == "zeros" else torch.ones
        return {u.names[0]: fill(u.shapes[0], dtype=TORCH[u.dtypes[0]])}
    rank = 16
    if u.kind == "dense":
        rows, cols = u.shapes[0]
        out = torch.empty((rows, cols), dtype=torch.bfloat16)
        v = torch.randn((1, rank, cols), generator=gen, device=device)
        step = max(1, CHUNK_ELEMS // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            uu = torch.randn((1, r1 - r0, rank), generator=gen, device=device)
            out[r0:r1].copy_(heavy_tailed(gen, 1, r1 - r0, cols, device, uu, v)[0]
                             .to(torch.bfloat16))
        return {u.names[0]: out}
    (E, rows, nb, _), _ = u.shapes
    cols = nb * 32
    blocks = torch.empty(u.shapes[0], dtype=torch.uint8)
    scales = torch.empty(u.shapes[1], dtype=torch.uint8)
    step = max(1, CHUNK_ELEMS // (rows * cols))
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        uu = torch.randn((e1 - e0, rows, rank), generator=gen, device=device)
        vv = torch.randn((e1 - e0, rank, cols), generator=gen, device=device)
        b, s = encode_mxfp4(heavy_tailed(gen, e1 - e0, rows, cols, device, uu, vv))
        blocks[e0:e1].copy_(b)
        scales[e0:e1].copy_(s)
    return {u.names[0]: blocks, u.names[1]: scales}


def drop_page_cache(path: Path) -> str:
    """fsync + POSIX_FADV_DONTNEED; '' if both calls succeeded, else the error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return f"open: {e}"
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return ""
    except (OSError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        os.close(fd)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore on a fresh mapping); None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        resident = total = 0
        for p in paths:
            size = p.stat().st_size
            if size == 0:
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            finally:
                os.close(fd)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
                total += n
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        return resident / total if total else None
    except (OSError, AttributeError, ValueError):
        return None


def generate(folder: Path, shape: dict, device: torch.device, seed: int,
             shard_bytes: int) -> dict:
    """Write the checkpoint shard by shard; returns timings and page-cache facts."""
    t0, mem0 = time.perf_counter(), mem_available()
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = plan_shards(checkpoint_units(**shape), shard_bytes)
    weight_map, files, errors = {}, [], []
    for k, units in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for u in units:
            tensors.update(generate_unit(u, gen, device))
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
        weight_map.update({n: name for u in units for n in u.names})
        files.append(folder / name)
        err = drop_page_cache(folder / name)
        if err:
            errors.append(f"{name}: {err}")
        print(f"[gen] {name}: {size(sum(u.nbytes for u in units))}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(f.stat().st_size for f in files)},
                    "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(gpt_oss_config(**shape), indent=1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "shards": len(files),
            "file_bytes": sum(f.stat().st_size for f in files),
            "fadvise_errors": errors, "files": files,
            "mem_available_gb": [mem0 / GB, mem_available() / GB]}


# ---------------------------------------------------------------- machine facts

def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (longest mount point of /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1].rstrip("/") + "/") \
                    and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def mem_available() -> float:
    """MemAvailable in bytes (NaN if unknown): a drop by the checkpoint's size during generation
    means the files live in RAM (tmpfs, a memory-backed overlay), not on a disk."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def pick_folder(need: int) -> Path:
    """A fresh temp folder with room for `need` bytes: in $TMPDIR, /tmp or /var/tmp (else beside
    the repository), preferring a block-device filesystem to an overlay and anything to RAM."""
    cands = [Path(d) for d in (os.environ.get("TMPDIR"), "/tmp", "/var/tmp", str(ROOT.parent))
             if d and Path(d).is_dir() and os.access(d, os.W_OK)]
    roomy = [d for d in cands if shutil.disk_usage(d).free > need * 1.05 + 2**30] or cands

    def rank(d: Path) -> int:
        fs = filesystem(d.resolve())
        return 0 if fs in ("ext4", "xfs", "btrfs", "f2fs", "zfs", "ext3") else \
            2 if fs in ("tmpfs", "ramfs") else 1

    base = min(roomy, key=rank) if roomy else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="gptoss-bench-", dir=base))


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "llm_audit": llm_audit.__version__,
            "gpu": "none", "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB)"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = ""
    return info


# ---------------------------------------------------------------- the audit

class Observer:
    """Progress callback: keeps the rows (for a partial report), prints a line now and then,
    and stops the audit at the deadline."""

    def __init__(self, deadline: float | None, every: float) -> None:
        self.deadline, self.every = deadline, every
        self.rows: list = []
        self.t0 = self.last = time.perf_counter()
        self.jobs = self.jobs_total = self.bytes_done = self.bytes_total = 0

    def __call__(self, event) -> None:
        now = time.perf_counter()
        if hasattr(event, "rows"):
            self.rows.extend(event.rows)
            self.jobs = getattr(event, "jobs_done", self.jobs + 1)
            self.bytes_done = getattr(event, "bytes_done", 0)
        else:
            self.jobs_total = getattr(event, "jobs_total", 0)
            self.bytes_total = getattr(event, "bytes_total", 0)
        if now - self.last >= self.every:
            self.last = now
            el = now - self.t0
            frac = self.bytes_done / self.bytes_total if self.bytes_total else 0
            eta = f", ETA {el / frac - el:.0f} s" if frac > 0 else ""
            print(f"[audit] {self.jobs}/{self.jobs_total} jobs, {len(self.rows)} matrices, "
                  f"{self.bytes_done / GB:.2f}/{self.bytes_total / GB:.2f} GB, {el:.0f} s, "
                  f"{len(self.rows) / el:.1f} matrices/s{eta}", flush=True)
        if self.deadline is not None and now > self.deadline:
            raise Interrupted(f"budget reached after {now - self.t0:.0f} s of audit")


def run_audit(folder: Path, args, observer: Observer) -> tuple[object | None, float, str, str]:
    """(result or None if interrupted, wall seconds, precision note, interruption reason)."""
    kw = {"device": args.device, "trap_rule": args.trap_rule, "seed": args.seed,
          "max_spectra": 0, "progress": observer, "precision": args.precision}
    note = args.precision
    for attempt in range(2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        observer.rows.clear()
        audit = llm_audit.audit  # its module's import is not part of the audit time
        observer.t0 = observer.last = t0 = time.perf_counter()
        try:
            res = audit(folder, **kw)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return res, time.perf_counter() - t0, note, ""
        except TypeError as e:
            if attempt or "precision" not in str(e):
                raise
            kw.pop("precision")
            note = f"{args.precision} asked; not supported by this llm_audit (called without)"
        except (Interrupted, KeyboardInterrupt) as e:
            return None, time.perf_counter() - t0, note, str(e) or type(e).__name__
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the report

def nan(x) -> float:
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def column(df, name: str):
    import pandas as pd

    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce").astype(float)
    return pd.Series(math.nan, index=df.index, dtype=float)


def matrix_class(module: str, expert) -> str:
    if expert is not None and not (isinstance(expert, float) and math.isnan(expert)) \
            and str(expert) != "<NA>":
        return "expert"
    if module in ("embed_tokens", "lm_head"):
        return "embed/lm_head"
    return module if module in CLASSES else "other"


def compute_seconds(df) -> tuple[object, str]:
    """Per-row main-thread compute: eigen + fit + traps, or `seconds` where those are missing."""
    parts = [column(df, TIME_COLUMNS[s]) for s in ("eigen", "fit", "traps")]
    if all(p.notna().any() for p in parts):
        return parts[0].fillna(0) + parts[1].fillna(0) + parts[2].fillna(0), \
            "eigen+fit+traps columns"
    return column(df, "seconds"), "`seconds` column (eigen/fit/trap columns missing)"


def stage_seconds(summary: dict, df) -> dict[str, float]:
    """Busy seconds per stage: summary["stage_seconds"], else the per-row columns' sums."""
    st = summary.get("stage_seconds") or {}
    out = {}
    for s in (*STAGES, "wait"):
        v = nan(st.get(s))
        if math.isnan(v) and s in TIME_COLUMNS and TIME_COLUMNS[s] in df.columns:
            v = float(column(df, TIME_COLUMNS[s]).sum(min_count=1))
        out[s] = v
    return out


def project(df, cost_source, io_rate: float, shape: dict) -> dict:
    """Projected audit seconds of `shape` from per-class mean compute and the I/O rate."""
    ok = (df["status"] == "ok").tolist()
    classes = [matrix_class(m, e) for m, e in zip(df["module"], df["expert"], strict=True)]
    per, compute, missing = {}, 0.0, []
    for c, count in class_counts(shape).items():
        sel = [k == c for k in classes]
        pick = cost_source[[s and o for s, o in zip(sel, ok, strict=True)]]
        if pick.dropna().empty:
            pick = cost_source[sel]
        cost = nan(pick.mean()) if len(pick.dropna()) else math.nan
        per[c] = {"count": count, "measured": int(sum(sel)), "mean_compute_s": cost,
                  "total_s": count * cost}
        if math.isnan(cost):
            missing.append(c)
        else:
            compute += count * cost
    nbytes = checkpoint_bytes(shape)
    io = nbytes / io_rate if io_rate > 0 else math.nan
    return {"shape": shape, "bytes": nbytes, "compute_s": compute, "io_s": io,
            "projected_s": max(compute, io), "pessimistic_s": compute + io, "classes": per,
            "classes_not_measured": missing}


def report(args, shape: dict, mach: dict, gen_info: dict, resident, res, observer: Observer,
           wall: float, precision_note: str, stop_reason: str, folder: Path) -> dict:
    import pandas as pd

    from llm_audit.records import MatrixResult

    partial = res is None
    if partial:
        rows = [r.as_row() if isinstance(r, MatrixResult) else dict(r) for r in observer.rows]
        df, summary = pd.DataFrame(rows), {}
    else:
        df, summary = res.details, res.summary.as_dict()
    full = shape == SHAPE_20B
    nbytes = int(summary.get("bytes") or 0) if not partial else observer.bytes_done
    n = len(df)
    ok = int((df["status"] == "ok").sum()) if n else 0
    st = stage_seconds(summary, df) if n else dict.fromkeys((*STAGES, "wait"), math.nan)
    busy = sum(v for k, v in st.items() if k != "wait" and not math.isnan(v))
    cuda = torch.cuda.is_available() and str(args.device) != "cpu"
    mem = {"allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30} if cuda else None
    io_busy = st["read"] + st["decode"]
    if not math.isnan(io_busy) and io_busy > 0:
        io_rate, io_src = nbytes / io_busy, "read+decode busy seconds"
    else:
        io_rate, io_src = (nbytes / wall if wall > 0 else math.nan), \
            "end-to-end bytes/wall (no stage timings: pessimistic, includes compute)"
    cost, cost_src = compute_seconds(df) if n else (None, "")
    proj = {k: project(df, cost, io_rate, s)
            for k, s in (("20b", SHAPE_20B), ("120b", SHAPE_120B))} if n else {}
    alpha = column(df, "alpha")[df["status"] == "ok"] if n else pd.Series(dtype=float)
    traps = column(df, "rand_num_spikes")[df["status"] == "ok"] if n else pd.Series(dtype=float)
    out = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": mach, "shape": shape, "full_20b_shape": full,
        "full_width": shape["width"] == SHAPE_20B["width"],
        "checkpoint_bytes_planned": checkpoint_bytes(shape), "checkpoint_bytes": nbytes,
        "folder": str(folder), "filesystem": filesystem(folder.resolve()),
        "generation": {k: v for k, v in gen_info.items() if k != "files"},
        "resident_before_audit": resident,
        "options": {"device": args.device, "trap_rule": args.trap_rule,
                    "precision": precision_note, "seed": args.seed},
        "partial": partial, "stop_reason": stop_reason,
        "audit_wall_s": wall, "summary_elapsed_s": nan(summary.get("elapsed_seconds")),
        "gb_per_s": nbytes / GB / wall if wall > 0 else math.nan,
        "matrices": n, "ok": ok, "failed": n - ok,
        "matrices_per_s": n / wall if wall > 0 else math.nan,
        "gpu_memory_peak": mem, "stage_seconds": st, "stage_busy_sum_s": busy,
        "failed_rows": [f"{row['name']}: {row.get('warning', '')}"
                        for _, row in df[df["status"] != "ok"].head(10).iterrows()] if n else [],
        "alpha_median": nan(alpha.median()) if len(alpha.dropna()) else math.nan,
        "total_traps": int(traps.fillna(0).sum()) if len(traps) else 0,
        "matrices_with_traps": int((traps.fillna(0) > 0).sum()) if len(traps) else 0,
        "target_20b": None if not full or partial else wall <= TARGET_20B_S,
        "io_rate_gb_per_s": io_rate / GB, "io_rate_source": io_src,
        "compute_cost_source": cost_src, "projection": proj,
    }
    print_report(out)
    return out


def fmt(x, spec: str = ".1f", unit: str = "", width: int = 0) -> str:
    x = nan(x)
    return ("NaN" if math.isnan(x) else f"{x:{spec}}{unit}").rjust(width)


def size(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1e6:.2f} MB"


def print_report(r: dict) -> None:
    m, s, g = r["machine"], r["shape"], r["generation"]
    kind = "20b-shaped, full size" if r["full_20b_shape"] else "REDUCED shape, not 20b-sized"
    P = print
    P("\n==== gpu_gptoss: synthetic gpt-oss checkpoint, generated here and audited end to end ====")
    if r["partial"]:
        P(f"PARTIAL: the audit was stopped ({r['stop_reason']}); numbers below cover "
          f"{r['matrices']} matrices done")
    P(f"date (UTC)        {r['date_utc']}")
    P(f"machine           GPU {m['gpu']} | {m['cpus']} CPUs | torch {m['torch']} (CUDA "
      f"{m['cuda']}) | python {m['python']} | llm_audit {m['llm_audit']} {m.get('git', '')}")
    P(f"checkpoint        {s['layers']} layers x {s['experts']} experts, width {s['width']}, "
      f"vocab {s['vocab']} ({kind}): {g['shards']} shards, {size(g['file_bytes'])} on disk, "
      f"audited bytes {size(r['checkpoint_bytes'])}")
    P(f"location          {r['folder']} ({r['filesystem']})")
    res = r["resident_before_audit"]
    cache = ("fsync+fadvise(DONTNEED) ok on every shard" if not g["fadvise_errors"]
             else "fadvise FAILED: " + "; ".join(g["fadvise_errors"]))
    cache += (f"; {100 * res:.1f}% of the checkpoint's pages resident before the audit"
              + (" (cold reads)" if res < 0.05 else " (page cache NOT dropped: reads are warm)")
              if res is not None else "; residency unknown (mincore unavailable)")
    P(f"generation        {g['seconds']:.1f} s ({g['file_bytes'] / GB / g['seconds']:.2f} GB/s "
      f"written, not part of the audit time); {cache}")
    m0, m1 = g["mem_available_gb"]
    P(f"host memory       MemAvailable {fmt(m0)} GB before generation, {fmt(m1)} GB after "
      f"(a drop by the checkpoint's size would mean the files live in RAM)")
    o = r["options"]
    P(f"audit options     device {o['device']}, trap_rule {o['trap_rule']}, precision "
      f"{o['precision']}, seed {o['seed']}")
    P(f"audit wall        {r['audit_wall_s']:.1f} s around audit() (summary elapsed_seconds "
      f"{fmt(r['summary_elapsed_s'])} s)")
    P(f"read rate         {fmt(r['gb_per_s'], '.3f')} GB/s (checkpoint bytes / audit wall)")
    P(f"matrices          {r['matrices']} ({r['ok']} ok, {r['failed']} failed): "
      f"{fmt(r['matrices_per_s'], '.2f')} matrices/s")
    for line in r["failed_rows"][:5]:
        P(f"  not ok: {line}")
    mem = r["gpu_memory_peak"]
    P("GPU memory peak   " + (f"allocated {mem['allocated_gib']:.2f} GiB, reserved "
                             f"{mem['reserved_gib']:.2f} GiB" if mem else "n/a (CPU)"))
    st, busy, wall = r["stage_seconds"], r["stage_busy_sum_s"], r["audit_wall_s"]
    P("stages (busy seconds; I/O and decode run beside the compute, so the busy sum can "
      "exceed the wall)")
    P(f"  {'stage':<28} {'busy s':>8}   {'of busy sum':>11}   {'of wall':>10}")
    for k in (*STAGES, "wait"):
        v = st[k]
        sh = fmt(100 * v / busy, ".1f", "%") if busy > 0 and k != "wait" else "-"
        P(f"  {STAGE_LABELS[k]:<28} {fmt(v, '.1f', '', 8)}   {sh:>11}   "
          f"{fmt(100 * v / wall if wall > 0 else math.nan, '.1f', '%', 10)}")
    P(f"  {'sum of busy stages (no wait)':<28} {busy:8.1f}   {'100%':>11}   "
      f"{fmt(100 * busy / wall if wall > 0 else math.nan, '.1f', '%', 10)}")
    P(f"sanity            alpha median {fmt(r['alpha_median'], '.3f')} (ok rows); traps "
      f"{r['total_traps']} in {r['matrices_with_traps']} matrices")
    if r["target_20b"] is None:
        P(f"target 20b        <= {TARGET_20B_S:.0f} s: " + (
            "not judged (partial run)" if r["partial"] else
            f"target applies to full size (this run: {wall:.1f} s at a reduced shape)"))
    else:
        P(f"target 20b        {wall:.1f} s <= {TARGET_20B_S:.0f} s: "
          f"{'PASS' if r['target_20b'] else 'FAIL'}")
    if not r["projection"]:
        return
    P(f"projection        per-matrix compute from the {r['compute_cost_source']}; I/O at "
      f"{fmt(r['io_rate_gb_per_s'], '.3f')} GB/s ({r['io_rate_source']})")
    if r["full_width"] and not r["full_20b_shape"]:
        P("                  (reduced checkpoint at full width: the expert and attention costs "
          "are those of 20b/120b; embed/lm_head and router are measured at other shapes)")
    elif not r["full_width"]:
        P("                  (costs measured at a REDUCED width: both projections are sanity "
          "numbers only, not predictions)")
    p20, p120 = r["projection"]["20b"], r["projection"]["120b"]
    P(f"  {'class':<14} {'measured':>8} {'mean s':>9} {'count 20b':>10} {'count 120b':>10} "
      f"{'120b s':>9}")
    for c in CLASSES:
        a, b = p20["classes"][c], p120["classes"][c]
        P(f"  {c:<14} {a['measured']:8d} {fmt(a['mean_compute_s'], '.4f', '', 9)} "
          f"{a['count']:10d} {b['count']:10d} {fmt(b['total_s'], '.1f', '', 9)}")
    for name, p, target in (("20b", p20, TARGET_20B_S), ("120b", p120, TARGET_120B_S)):
        verdict = ("PASS" if p["projected_s"] <= target else "FAIL") \
            if r["full_width"] and not math.isnan(p["projected_s"]) else "n/a"
        if p["classes_not_measured"] and verdict == "PASS":
            verdict = "n/a (lower bound only)"
        extra = (f"; measured here: {wall:.1f} s" if name == "20b" and r["full_20b_shape"]
                 and not r["partial"] else "")
        low = (f" (LOWER BOUND: not measured: {', '.join(p['classes_not_measured'])})"
               if p["classes_not_measured"] else "")
        P(f"  {name + '-shaped':<12} compute {fmt(p['compute_s'])} s{low}, I/O {fmt(p['io_s'])} s "
          f"({p['bytes'] / GB:.1f} GB) -> projected {fmt(p['projected_s'])} s (max), "
          f"{fmt(p['pessimistic_s'])} s (sum, pessimistic); target {target:.0f} s: "
          f"{verdict}{extra}")
    if r["full_20b_shape"]:
        P("  (120b router is [128, 2880]; its cost is taken from the 20b router [32, 2880])")


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="checkpoint folder (default: a fresh temp folder, deleted "
                                  "at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    ap.add_argument("--layers", type=int, default=SHAPE_20B["layers"])
    ap.add_argument("--experts", type=int, default=SHAPE_20B["experts"])
    ap.add_argument("--width", type=int, default=SHAPE_20B["width"])
    ap.add_argument("--vocab", type=int, default=SHAPE_20B["vocab"])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (generation and audit)")
    ap.add_argument("--trap-rule", default="tw", choices=("ww", "tw"))
    ap.add_argument("--precision", default="auto", help="passed to audit() (if it knows it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.5)
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds this script may take; the audit is stopped in time to "
                         "report (0: no limit)")
    ap.add_argument("--progress-every", type=float, default=20.0, help="seconds between lines")
    args = ap.parse_args()
    t_start = time.perf_counter()
    shape = {"layers": args.layers, "experts": args.experts, "width": args.width,
             "vocab": args.vocab}
    if args.width % 32 or min(shape.values()) < 1:
        ap.error("--width must be a positive multiple of 32 (MXFP4 blocks of 32)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here (use --device cpu)")
    gen_device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if args.device == "auto" else args.device))
    need = checkpoint_bytes(shape)
    folder = Path(args.out) if args.out else pick_folder(need)
    created = not folder.exists() or not any(folder.iterdir())
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < need * 1.02:
        print(f"error: {folder} has {free / GB:.1f} GB free, the checkpoint needs "
              f"{need / GB:.1f} GB", file=sys.stderr)
        return 1

    def on_term(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_term)
    mach = machine()
    print(f"gpu_gptoss: {shape}, {size(need)} into {folder} ({filesystem(folder.resolve())},"
          f" {free / GB:.0f} GB free); generating on {gen_device}; GPU {mach['gpu']}", flush=True)
    out, code = None, 0
    try:
        gen_info = generate(folder, shape, gen_device, args.seed, int(args.shard_gb * GB))
        if gen_device.type == "cuda":
            torch.cuda.empty_cache()
        resident = resident_fraction(gen_info["files"])
        deadline = t_start + args.budget - 25 if args.budget > 0 else None
        observer = Observer(deadline, args.progress_every)
        res, wall, note, stop = run_audit(folder, args, observer)
        code = 3 if res is None else 0
        out = report(args, shape, mach, gen_info, resident, res, observer, wall, note, stop,
                     folder)
    except Interrupted as e:  # before the audit started
        print(f"gpu_gptoss: stopped before the audit finished: {e}", file=sys.stderr)
        code = 3
    finally:
        if not args.keep and (created or not args.out):
            shutil.rmtree(folder, ignore_errors=True)
    if out is not None and args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(jsonable(out), indent=1))
        print(f"JSON written to {args.json}")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a background reader thread left by a stopped audit must not keep us alive
