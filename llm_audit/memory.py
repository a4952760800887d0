"""In-memory weights (a ``torch.nn.Module``, e.g. a transformers model, or a state dict): the
rows a checkpoint file of the same weights gives, without writing one.

- Rows are named by ``named_parameters()`` (tied weights once; a state dict: its keys) and
  routed by ``routing.py`` as file tensors are (layer, module, expert; biases, norms and 1-D
  tensors left out, a tensor with no matrix layout listed in ``skipped``).
- An expert stack (E, ...) under ``.experts.`` gives one row per expert, ``<param>[e]``; a
  fused ``gate_up_proj`` gives ``<param>[e].gate`` / ``.up`` (modules ``gate_proj``,
  ``up_proj``), in the canonical (out, in) orientation. The stack's layout is read from the
  module that holds it (transformers 5's experts modules say ``is_transposed``,
  ``is_concatenated``, ``has_gate``), else it is gpt-oss's when ``config.model_type`` is
  ``gpt_oss`` (stored (in, out), gate/up interleaved, as ``plan.py`` reads its files). Nothing
  here imports transformers.
- Memory: one parameter at a time, through views: a float32 (float64) matrix on the analysis
  device is analysed where it lies, never copied; other dtypes, other devices and strided
  views (transposed or interleaved experts) are converted one matrix, or one batch of at most
  ``batching.BATCH_BYTES`` of experts, at a time. The weights are only read.
- Shuffles are seeded as the file path seeds them (``batching.shuffle_key``): the same names
  give the same traps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .analysis import MatrixMeta, analyse_stack
from .batching import BATCH_BYTES, stack_key
from .decode import TORCH_DTYPES
from .options import AuditOptions
from .plan import GATE_UP
from .progress import AuditStarted, JobDone, Observer
from .records import MatrixResult
from .routing import (
    FLOAT_DTYPES,
    MatrixJob,
    Skipped,
    is_ignored,
    parse_expert,
    parse_layer,
    parse_module,
)
from .source import TensorInfo
from .spectra import MAX_SPECTRA, Spectra, compute_spectra, suspicious

Weights = torch.nn.Module | Mapping[str, torch.Tensor]
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class ParamPlan:
    """How one parameter becomes matrices: a 2-D weight, or a stack of `experts` matrices."""

    param: str  # the parameter's name
    layer: int | None
    module: str  # the row's module (a fused stack: one per part, `fused`)
    dtype: str  # stored dtype as files name it (F32, BF16, ...)
    shape: tuple[int, ...]
    expert: int | None = None  # a 2-D per-expert weight (`...experts.7.w1.weight`)
    experts: int = 0  # > 0: the parameter is a stack (E, ...) of this many experts
    transposed: bool = False  # stored (in, out)
    fused: tuple[str, ...] = ()  # modules whose rows alternate (or follow each other)
    interleaved: bool = True  # fused rows alternate (gpt-oss) or are concatenated [gate; up]

    @property
    def base(self) -> str:
        return self.param.removesuffix(".weight")

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of one matrix, after transposition and the fused split."""
        r, c = self.shape[-2:]
        r, c = (c, r) if self.transposed else (r, c)
        return (r // len(self.fused), c) if self.fused else (r, c)

    def parts(self) -> tuple[str, ...]:
        return self.fused or (self.module,)

    def row_name(self, e: int | None, part: int) -> str:
        if not self.experts:
            return self.param
        name = f"{self.base}[{e}]"
        return f"{name}.{self.fused[part].removesuffix('_proj')}" if self.fused else name

    def key(self, e: int | None, part: int) -> str:
        """What seeds the shuffle of that matrix: as ``batching.shuffle_key`` for files."""
        name = f"{self.base}[{e}]" if self.experts else self.param
        expert = e if self.experts else self.expert
        k = stack_key(MatrixJob(name, self.layer, self.module, "dense", (), expert=expert))
        return self.row_name(e, part) if k is None else f"{k}/{self.parts()[part]}"

    def meta(self, e: int | None, part: int) -> MatrixMeta:
        return MatrixMeta(self.row_name(e, part), self.layer, self.parts()[part],
                          e if self.experts else self.expert, self.dtype)


@dataclass(frozen=True)
class Batch:
    """Equal-shaped matrices (B, rows, cols) of one parameter, ready for ``analyse_stack``."""

    W: torch.Tensor
    metas: tuple[MatrixMeta, ...]
    key: str
    order: tuple[int, ...]  # position of each matrix among its parameter's rows


@dataclass(frozen=True)
class ModelSource:
    """What ``pipeline.assemble`` reads of a ``Checkpoint``, for in-memory weights."""

    name: str
    root: str
    revision: str | None
    total_bytes: int


def named_tensors(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    """(name, detached tensor): a module's ``named_parameters()``, or a state dict's items."""
    items = weights.named_parameters() if isinstance(weights, torch.nn.Module) else \
        weights.items()
    return [(n, t.detach()) for n, t in items if isinstance(t, torch.Tensor)]


def plan_weights(weights: Weights, min_evals: int = 1) -> tuple[list[ParamPlan], list[Skipped]]:
    """The parameters to analyse (matrices with min(shape) >= min_evals) and those skipped."""
    cfg = getattr(weights, "config", None)
    gpt_oss = getattr(cfg, "model_type", None) == "gpt_oss"
    plans, skipped = [], []
    for name, t in named_tensors(weights):
        shape = tuple(t.shape)
        dtype = _DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
        if is_ignored(TensorInfo(name, dtype, shape, Path(), 0, 0)):
            continue
        if dtype not in FLOAT_DTYPES:
            skipped.append(Skipped(name, dtype, shape, f"dtype {dtype}: in-memory quantized or "
                                   "integer tensors are not decoded (audit the checkpoint files)"))
            continue
        plan, why = _plan_tensor(weights, name, dtype, shape, gpt_oss)
        if why:
            skipped.append(Skipped(name, dtype, shape, why))
        elif min(plan.matrix_shape) >= min_evals:
            plans.append(plan)
    return plans, skipped


def _plan_tensor(weights: Weights, name: str, dtype: str, shape: tuple[int, ...],
                 gpt_oss: bool) -> tuple[ParamPlan | None, str | None]:
    if min(shape[-2:]) < 2:
        return None, "fewer than 2 rows or columns"
    layer = parse_layer(name)
    if len(shape) == 2:
        return ParamPlan(name, layer, parse_module(name), dtype, shape,
                         expert=parse_expert(name)), None
    if len(shape) != 3 or ".experts." not in f".{name}":
        return None, f"{len(shape)}-D tensor with no known expert layout"
    transposed, interleaved, gated = _expert_layout(weights, name, gpt_oss)
    base = name.removesuffix(".weight")
    fused = GATE_UP if gated and base.endswith("gate_up_proj") else ()
    rows = shape[2] if transposed else shape[1]
    if fused and rows % len(fused):
        return None, f"fused {base.rsplit('.', 1)[-1]} {list(shape)}: odd number of rows"
    return ParamPlan(name, layer, base.rsplit(".", 1)[-1], dtype, shape, experts=shape[0],
                     transposed=transposed, fused=fused, interleaved=interleaved), None


def _expert_layout(weights: Weights, name: str, gpt_oss: bool) -> tuple[bool, bool, bool]:
    """(stored (in, out), gate/up interleaved, has a fused gate) of an expert stack."""
    owner = None
    if isinstance(weights, torch.nn.Module) and "." in name:
        try:
            owner = weights.get_submodule(name.rsplit(".", 1)[0])
        except AttributeError:
            owner = None
    transposed = getattr(owner, "is_transposed", gpt_oss)
    concatenated = getattr(owner, "is_concatenated", not gpt_oss)
    # without layout attributes only gpt-oss's gate_up is known to be fused (as plan.py)
    gated = getattr(owner, "has_gate", gpt_oss)
    return bool(transposed), not bool(concatenated), bool(gated)


def batches(t: torch.Tensor, plan: ParamPlan, device: torch.device,
            limit: int | None = None) -> Iterator[Batch]:
    """The matrices of one parameter in batches: experts of one part together (at most
    `limit` float32 bytes converted at a time), then put back in row order by `order`."""
    if not plan.experts:
        yield Batch(_ready(t[None], device), (plan.meta(None, 0),), plan.key(None, 0), (0,))
        return
    k = len(plan.parts())
    rows, cols = plan.matrix_shape
    limit = BATCH_BYTES.get(device.type, BATCH_BYTES["cpu"]) if limit is None else limit
    step = max(1, limit // (4 * rows * cols))
    for lo in range(0, plan.experts, step):
        hi = min(lo + step, plan.experts)
        for part in range(k):
            W = _ready(_view(t, plan, lo, hi, part), device)
            yield Batch(W, tuple(plan.meta(e, part) for e in range(lo, hi)),
                        plan.key(lo, part), tuple(e * k + part for e in range(lo, hi)))


def _view(t: torch.Tensor, plan: ParamPlan, lo: int, hi: int, part: int) -> torch.Tensor:
    """Experts lo..hi of a stack (one part of a fused split) as a (B, out, in) view."""
    W = t[lo:hi].mT if plan.transposed else t[lo:hi]
    if not plan.fused:
        return W
    k, n = len(plan.fused), plan.matrix_shape[0]
    return W[:, part::k] if plan.interleaved else W[:, part * n:(part + 1) * n]


def _ready(W: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 (float64 stays) on `device`, each matrix contiguous: a no-op, not a copy, for
    a float32 matrix that already is."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(device=device, dtype=dtype)
    return W if W[0].is_contiguous() else W.contiguous()


def analyse_weights(weights: Weights, opts: AuditOptions, *, min_evals: int = 1,
                    progress: Observer | None = None, model: str = ""
                    ) -> tuple[list[MatrixResult], list[Skipped], list[ParamPlan]]:
    """Rows of every matrix of `weights` in parameter order, the skipped tensors, the plans."""
    plans, skipped = plan_weights(weights, min_evals)
    plans = [p for p in plans if opts.wants(p.param)]
    skipped = [s for s in skipped if opts.wants(s.name)]
    tensors = dict(named_tensors(weights))
    device = opts.torch_device()
    total = sum(_nbytes(tensors[p.param]) for p in plans)
    if progress is not None:
        progress(AuditStarted(model, len(plans), total, 0))
    rows: list[MatrixResult] = []
    done = 0
    with torch.no_grad():
        for i, plan in enumerate(plans):
            got: dict[int, MatrixResult] = {}
            for b in batches(tensors[plan.param], plan, device):
                got.update(zip(b.order, analyse_stack(b.W, b.metas, opts, key=b.key),
                               strict=True))
            new = tuple(got[j] for j in sorted(got))
            rows.extend(new)
            done += _nbytes(tensors[plan.param])
            if progress is not None:
                progress(JobDone(plan.param, new, i + 1, len(plans), done, total, False))
    return rows, skipped, plans


def audit_weights(weights: Weights, opts: AuditOptions, *, progress: Observer | None = None,
                  max_spectra: int = MAX_SPECTRA):
    """``llm_audit.audit`` of in-memory weights: the AuditResult a checkpoint file gives."""
    from .pipeline import assemble  # the pipeline imports this module lazily

    t0 = time.perf_counter()
    src = model_source(weights)
    rows, skipped, plans = analyse_weights(weights, opts, progress=progress, model=src.name)
    result = assemble(src, opts, rows, skipped, time.perf_counter() - t0)
    if max_spectra > 0:
        spectra = collect_spectra(weights, plans, result.details, opts, max_spectra,
                                  result.traps)
        result = dataclasses.replace(result, spectra=spectra)
    return result


def model_source(weights: Weights) -> ModelSource:
    cfg = getattr(weights, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or type(weights).__name__)
    total = sum(_nbytes(t) for _, t in named_tensors(weights))
    return ModelSource(name=Path(name).name or name, root=f"<in-memory {type(weights).__name__}>",
                       revision=None, total_bytes=total)


def collect_spectra(weights: Weights, plans: list[ParamPlan], details: pd.DataFrame,
                    opts: AuditOptions, limit: int = MAX_SPECTRA,
                    traps: pd.DataFrame | None = None) -> tuple[Spectra, ...]:
    """The spectra of the most suspicious matrices (the figures), one matrix at a time."""
    wanted = dict(suspicious(details, limit))
    if not wanted:
        return ()
    rows = {r["name"]: r for _, r in details[details["name"].isin(list(wanted))].iterrows()}
    tensors = dict(named_tensors(weights))
    device, found = opts.torch_device(), {}
    with torch.no_grad():
        for plan in plans:
            for b in batches(tensors[plan.param], plan, device, limit=1):
                name = b.metas[0].name
                if name in wanted:
                    found[name] = compute_spectra(
                        b.W[0], rows[name], wanted[name], opts, shuffle_key=b.key,
                        traps=None if traps is None else traps[traps["name"] == name])
    return tuple(found[n] for n in wanted if n in found)


def _nbytes(t: torch.Tensor) -> int:
    return math.prod(t.shape) * t.element_size()
