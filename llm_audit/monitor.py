"""A data-free training monitor: audit the weight matrices of an in-memory model.

The paper's early-stopping criterion (Prakash & Martin 2026) as a function you can call from a
training loop: no files, no data. Give it a ``torch.nn.Module`` (a transformers model too) or a
state dict; every weight matrix, as ``memory.py`` finds them, goes through
``analysis.analyse_stack`` (eigenvalues at the options' precision, traps with a generator seeded
from (seed, tensor name)). The alert fires when any matrix has a correlation trap, or when the
mean α falls below ``alpha_floor``.

    report = llm_audit.monitor_weights(model, alpha_floor=2.0)
    if report.triggered:
        logger.warning("step %d: %s", step, report.alert)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from .memory import analyse_weights
from .options import AuditOptions, resolve_options
from .records import COLUMNS, MatrixResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorReport:
    """The audit of one set of weights: per-matrix results and the verdict."""

    layers: tuple[MatrixResult, ...]
    mean_alpha: float  # mean α over matrices whose fit succeeded (NaN if none)
    total_traps: int  # correlation traps summed over matrices
    alert: str  # "" when healthy, else why (traps per matrix, low mean α)

    @property
    def triggered(self) -> bool:
        return bool(self.alert)

    @property
    def details(self) -> pd.DataFrame:
        """One row per matrix, the columns of ``layers.csv``."""
        return pd.DataFrame([r.as_row() for r in self.layers], columns=list(COLUMNS))

    def traps_by_layer(self) -> dict[str, int]:
        return {r.name: r.rand_num_spikes for r in self.layers}

    def alpha_by_layer(self) -> dict[str, float]:
        return {r.name: r.alpha for r in self.layers}


def weight_matrices(weights: torch.nn.Module | Mapping[str, torch.Tensor],
                    min_evals: int = 1) -> dict[str, torch.Tensor]:
    """The 2-D floating-point tensors of a module or state dict with min(shape) >= min_evals."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            continue
        if min(t.shape) >= min_evals:
            out[name] = t.detach()
    return out


def monitor_weights(weights: torch.nn.Module | Mapping[str, torch.Tensor], *,
                    options: AuditOptions | None = None, alpha_floor: float | None = 2.0,
                    min_evals: int = 1, **option_fields) -> MonitorReport:
    """Audit every weight matrix of ``weights`` (a module or a state dict) in memory.

    The rows are those a checkpoint file of the same weights gives (``memory.py``): named by
    ``named_parameters()`` (a state dict: its keys), biases, norms and 1-D tensors left out,
    expert stacks split one row per expert (gpt-oss's and transformers 5's fused gate_up
    into ``.gate``/``.up``), each matrix read where it lies, one at a time.

    ``options`` (an AuditOptions, and/or its fields as keywords, as ``audit`` takes them) gives
    the seed, device, trap rule, finger clipping, include/exclude regexes and whether traps
    are computed (``randomize``); ``min_evals`` skips matrices with fewer
    eigenvalues (WeightWatcher skips M < 50 by default); ``alpha_floor=None`` disables the α
    part of the alert.
    """
    opts = resolve_options(options, option_fields)
    rows, _, _ = analyse_weights(weights, opts, min_evals=min_evals)
    return _report(tuple(rows), alpha_floor)


def _report(rows: tuple[MatrixResult, ...], alpha_floor: float | None) -> MonitorReport:
    alphas = [r.alpha for r in rows if r.status == "ok" and math.isfinite(r.alpha)]
    mean_alpha = sum(alphas) / len(alphas) if alphas else math.nan
    total = sum(r.rand_num_spikes for r in rows)
    reasons = [f"{r.name}: {r.rand_num_spikes} trap(s)" for r in rows if r.rand_num_spikes > 0]
    if alpha_floor is not None and alphas and mean_alpha < alpha_floor:
        reasons.append(f"mean alpha {mean_alpha:.2f} < {alpha_floor:g}")
    if reasons:
        log.info("monitor alert: %s", "; ".join(reasons))
    return MonitorReport(layers=rows, mean_alpha=mean_alpha, total_traps=total,
                         alert="; ".join(reasons))
