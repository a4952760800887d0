"""Remove correlation traps from weights: a checkpoint written again without them.

Two methods, both acting on the traps of the chosen classes (see `anatomy`):

- ``clip`` winsorizes what the trap is made of to the bulk scale ``clip_level`` (σ_rob·√(2 ln n)
  around the entries' mean): an ``entries`` trap's outliers (the entries its clipping test
  changed), for a ``tail`` trap every entry beyond the bulk scale (the tail itself); a ``mean``
  trap is removed by subtracting the entries' mean.
- ``subtract`` removes the trap's rank-1 component from the matrix: with S = W.flatten()[π]
  the rule's shuffle and σ u vᵀ the trap's singular triplet of S (mean-removed for non-mean
  traps), W' = W − π⁻¹(σ u vᵀ), i.e. W'.flatten()[π] = S − σ u vᵀ. This is the smallest
  change (in Frobenius norm, ‖ΔW‖ = σ) that takes exactly that singular value out of the
  shuffled matrix (Eckart–Young), it leaves the rest of that shuffle's spectrum unchanged, and
  it is defined for every class; in the original coordinates it is spread over all entries,
  concentrated on the trap's entries when the trap is localised.

``repair_matrix`` and ``repair_weights`` are pure (tensors in, tensors out); ``repair`` writes
a local checkpoint again (same shard names, index, config and other files copied, each tensor
in its stored dtype) and re-audits it. 2-D float tensors are repaired; quantized tensors and
3-D expert stacks are copied unchanged and listed as not repaired.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import detect, spectral
from .analysis import MIN_EVALS, matrix_generator
from .anatomy import NO_TRAPS, TRAP_CLASSES, Anatomy
from .errors import UsageError
from .options import AuditOptions
from .report.writers import atomic_write, csv_text

log = logging.getLogger(__name__)
METHODS = ("clip", "subtract")
REPAIR_COLUMNS = ("name", "method", "classes", "traps_before", "traps_targeted", "traps_after",
                  "entries_touched", "rel_change", "alpha_before", "alpha_after", "note")


@dataclass(frozen=True)
class MatrixRepair:
    name: str
    method: str
    traps_before: int  # the rule's count (float64), all classes
    traps_targeted: int  # of those, the traps of the chosen classes
    entries_touched: int  # entries whose value changed
    rel_change: float  # ‖ΔW‖_F / ‖W‖_F


def parse_classes(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    chosen = tuple(dict.fromkeys(c.strip() for c in items if c.strip()))
    bad = [c for c in chosen if c not in TRAP_CLASSES]
    if bad or not chosen:
        raise UsageError(f"--classes: unknown trap class {bad[0] if bad else text!r}; choose "
                         f"from {','.join(TRAP_CLASSES)}")
    return chosen


def matrix_anatomy(W: torch.Tensor, opts: AuditOptions, *, name: str,
                   key: str | None = None) -> Anatomy:
    """The rule's traps of one matrix with their anatomy (float64; the audit's shuffles:
    seeded by (seed, key or name))."""
    W64 = W.to(torch.float64)
    moments = spectral.entry_moments(W64)
    res = detect.stack_traps(W64[None], spectral.esd(W64)[None], rule=opts.trap_rule,
                             generator=matrix_generator(opts.seed, key or name),
                             generators=[matrix_generator(opts.seed, name)],
                             moments=[moments], dtype=torch.float64)[0]
    return res.anatomy


def repair_matrix(W: torch.Tensor, opts: AuditOptions, *, name: str, method: str = "clip",
                  classes: Sequence[str] = ("entries", "tail"),
                  key: str | None = None) -> tuple[torch.Tensor, MatrixRepair]:
    """W (rows, cols) without its traps of ``classes``: (repaired W in W's dtype, record)."""
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    an = matrix_anatomy(W, opts, name=name, key=key) if min(W.shape) >= MIN_EVALS else NO_TRAPS
    targets = [c for c in an.components if c.cls in classes]
    W64 = W.to(torch.float64)
    new = W64.clone().reshape(-1)
    mean = float(W64.mean())
    for comp in targets:
        if method == "subtract":
            new[comp.perm] -= (comp.sigma * comp.u[:, None] * comp.v[None, :]).reshape(-1)
        elif comp.cls == "entries":
            idx = torch.tensor(comp.outliers, dtype=torch.int64, device=new.device)
            new[idx] = new[idx].sub(mean).clamp_(-an.clip_level, an.clip_level).add_(mean)
        elif comp.cls == "tail":
            new = new.sub(mean).clamp_(-an.clip_level, an.clip_level).add_(mean)
        else:  # mean
            new -= float(new.mean())
    new = new.view(W.shape)
    delta = new - W64
    rec = MatrixRepair(name=name, method=method, traps_before=len(an.traps),
                       traps_targeted=len(targets), entries_touched=int((delta != 0).sum()),
                       rel_change=float(delta.norm() / W64.norm()) if W64.norm() > 0 else 0.0)
    return (new.to(W.dtype) if targets else W), rec


def repair_weights(weights: torch.nn.Module | Mapping[str, torch.Tensor], *,
                   options: AuditOptions | None = None, method: str = "clip",
                   classes: Sequence[str] = ("entries", "tail"),
                   min_evals: int = MIN_EVALS) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """A state dict with the traps of every 2-D float matrix (≥ ``min_evals`` eigenvalues,
    kept by the options' include/exclude) removed, and one row per repaired matrix."""
    from .monitor import weight_matrices

    opts = options or AuditOptions()
    state = dict(weights.state_dict() if isinstance(weights, torch.nn.Module) else weights)
    rows = []
    for name, W in weight_matrices(state, min_evals).items():
        if opts.wants(name):
            state[name], rec = repair_matrix(W, opts, name=name, method=method,
                                             classes=classes)
            rows.append(rec.__dict__)
    return state, pd.DataFrame(rows, columns=list(MatrixRepair.__dataclass_fields__))


@dataclass(frozen=True)
class RepairResult:
    out: Path
    table: pd.DataFrame  # REPAIR_COLUMNS, one row per 2-D tensor considered


def repair(source: str | Path, out: str | Path, *, method: str = "clip",
           classes: Sequence[str] = ("entries", "tail"), **options) -> RepairResult:
    """Write ``source`` (a local checkpoint) to ``out`` with its traps of ``classes`` removed,
    re-audit it, and write ``out/repair.csv`` (+ the re-audit's reports in
    ``out/repair_audit/``). Never writes into the source."""
    from .pipeline import audit
    from .source import open_checkpoint

    opts = AuditOptions(**options)
    classes = parse_classes(classes)
    ckpt = open_checkpoint(source)
    out = _check_out(Path(source), Path(out))
    before = audit(source, **options, max_spectra=0).details.set_index("name")
    quantized = bool(ckpt.config_dict.get("quantization_config"))
    rows = []
    for f in ckpt.files:
        rows += _repair_file(f, out / f.relative_to(ckpt.root), opts, method, classes,
                             quantized)
    _copy_rest(Path(source), ckpt, out)
    after = audit(out, **options, max_spectra=0)
    after.write(out / "repair_audit")
    table = _table(rows, before, after.details.set_index("name"), method, classes)
    atomic_write(out / "repair.csv", csv_text(table))
    return RepairResult(out=out, table=table)


def _repair_file(src: Path, dst: Path, opts: AuditOptions, method: str,
                 classes: Sequence[str], quantized: bool) -> list[dict]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, rows = {}, []
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(name)
            tensors[name] = t
            if t.dim() != 2 or not t.is_floating_point() or not opts.wants(name):
                if t.dim() == 3 and t.is_floating_point() and opts.wants(name):
                    rows.append(dict(name=name, note="not repaired: 3-D expert stack"))
                continue
            if quantized and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                rows.append(dict(name=name, note="not repaired: quantized"))
                continue
            tensors[name], rec = repair_matrix(t, opts, name=name, method=method,
                                               classes=classes)
            rows.append({**rec.__dict__, "note": ""})
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)
    return rows


def _check_out(source: Path, out: Path) -> Path:
    src = source.resolve()
    root = src if src.is_dir() else src.parent
    o = out.resolve()
    if o == root or (src.is_dir() and o.is_relative_to(root)):
        raise UsageError(f"--out {out}: inside the source {source}; repair never writes into "
                         "the checkpoint it reads (choose a folder outside it)")
    if o.exists() and any(o.iterdir()) and not (o / "repair.csv").exists():
        raise UsageError(f"--out {out}: exists and is not empty (and holds no repair.csv of "
                         "an earlier repair); choose a new folder")
    o.mkdir(parents=True, exist_ok=True)
    return o


def _copy_rest(source: Path, ckpt, out: Path) -> None:
    """config.json, the index and the other small files of a model folder, unchanged."""
    if not source.is_dir():
        if (ckpt.root / "config.json").is_file():
            shutil.copy2(ckpt.root / "config.json", out / "config.json")
        return
    shards = {f.resolve() for f in ckpt.files}
    for p in source.iterdir():
        if p.is_file() and p.resolve() not in shards:
            shutil.copy2(p, out / p.name)


def _table(rows: list[dict], before: pd.DataFrame, after: pd.DataFrame, method: str,
           classes: Sequence[str]) -> pd.DataFrame:
    def get(df: pd.DataFrame, name: str, col: str):
        return df.at[name, col] if name in df.index else math.nan

    out = []
    for r in rows:
        name = r["name"]
        out.append(dict(name=name, method=method, classes=",".join(classes),
                        traps_before=get(before, name, "rand_num_spikes"),
                        traps_targeted=r.get("traps_targeted", 0),
                        traps_after=get(after, name, "rand_num_spikes"),
                        entries_touched=r.get("entries_touched", 0),
                        rel_change=r.get("rel_change", 0.0),
                        alpha_before=get(before, name, "alpha"),
                        alpha_after=get(after, name, "alpha"), note=r.get("note", "")))
    return pd.DataFrame(out, columns=list(REPAIR_COLUMNS))


def describe(table: pd.DataFrame) -> str:
    """One line for the CLI: matrices repaired and traps before/after."""
    done = int((table["traps_targeted"] > 0).sum())
    before = int(table["traps_before"].fillna(0).sum())
    after = int(table["traps_after"].fillna(0).sum())
    return (f"{done} of {len(table)} matrices repaired; traps {before} -> {after} "
            "(same seed and rule)")
