"""Eigenvalue spectra of the most suspicious matrices, for the report's figures.

The result table holds no eigenvalues; a report recomputes them for at most `MAX_SPECTRA`
matrices (traps, α < 2, failed fits), so memory stays bounded and layers.csv stays small. The
shuffles use the same per-matrix seeds as the audit, so the pictures show the audited spectra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from . import spectral
from .analysis import matrix_generator
from .options import AuditOptions
from .rules import RULES

MAX_SPECTRA = 12


@dataclass(frozen=True)
class Spectra:
    """One matrix's ESD and shuffled ESD with the fitted quantities the figures mark."""

    name: str
    N: int
    M: int
    reason: str  # why it was picked: "3 traps", "alpha 1.52 < 2", "failed: ..."
    evals: tuple[float, ...]  # ESD of W (eigenvalues of WᵀW), ascending
    rand_evals: tuple[float, ...]  # ESD of the element-shuffled W (pooled shuffles), ascending
    alpha: float
    xmin: float
    num_pl_spikes: int
    rand_bulk_max: float  # MP edge of the shuffled ESD
    trap_threshold: float
    rand_num_spikes: int
    shape: tuple[int, int] = (0, 0)  # (rows, cols) as stored: where trap entries sit
    trap_classes: tuple[tuple[float, str], ...] = ()  # (eigenvalue, class) per trap
    trap_locations: tuple[tuple[int, int, str], ...] = ()  # (row, col, class) of listed entries


def suspicious(details: pd.DataFrame, limit: int = MAX_SPECTRA) -> list[tuple[str, str]]:
    """(name, reason) of the most suspicious matrices: most traps, then lowest α < 2, then
    failed fits; at most `limit`."""
    d = details.reset_index(drop=True)
    traps = d[d["rand_num_spikes"].fillna(0) > 0].sort_values("rand_num_spikes", ascending=False,
                                                               kind="stable")
    low = d[(d["alpha"] < 2) & (d["rand_num_spikes"].fillna(0) == 0)].sort_values(
        "alpha", kind="stable")
    failed = d[d["status"] != "ok"]
    picked: dict[str, str] = {}
    for r in traps.itertuples():
        picked.setdefault(r.name, f"{int(r.rand_num_spikes)} correlation trap(s)")
    for r in low.itertuples():
        picked.setdefault(r.name, f"alpha {r.alpha:.2f} < 2")
    for r in failed.itertuples():
        picked.setdefault(r.name, str(r.warning))
    return list(picked.items())[:limit]


def compute_spectra(W: torch.Tensor, row: pd.Series, reason: str, opts: AuditOptions, *,
                    shuffle_key: str | None = None, traps: pd.DataFrame | None = None
                    ) -> Spectra:
    """The ESD and shuffled ESD of W, and the row's fitted marks; empty spectra if W is not
    finite (a failed matrix). `traps`: this matrix's rows of traps.csv (classes, entries)."""
    evals: tuple[float, ...] = ()
    rand: tuple[float, ...] = ()
    if bool(torch.isfinite(W).all()) and bool((W != 0).any()):
        evals = tuple(spectral.esd(W).cpu().tolist())
        if opts.randomize:
            rand = tuple(_shuffled_esd(W, shuffle_key or str(row["name"]), opts))
    return spectra_record(evals, rand, tuple(W.shape), row, reason, traps)


def spectra_record(evals: tuple[float, ...], rand: tuple[float, ...], shape: tuple[int, ...],
                   row: pd.Series, reason: str, traps: pd.DataFrame | None) -> Spectra:
    """A `Spectra` from given ESDs (ascending) and the matrix's result row."""
    N, M = max(shape), min(shape)
    return Spectra(name=str(row["name"]), N=N, M=M, reason=reason, evals=evals, rand_evals=rand,
                   alpha=_f(row["alpha"]), xmin=_f(row["xmin"]),
                   num_pl_spikes=int(row["num_pl_spikes"]),
                   rand_bulk_max=_f(row["rand_bulk_max"]),
                   trap_threshold=_f(row["trap_threshold"]),
                   rand_num_spikes=int(row["rand_num_spikes"]), shape=shape,
                   **_trap_marks(traps))


def _trap_marks(traps: pd.DataFrame | None) -> dict:
    if traps is None or not len(traps):
        return {}
    recs = traps.to_dict("records")
    locs = tuple((int(r), int(c), str(t["class"])) for t in recs
                 for r, c in (e.split(":") for e in str(t["entries"]).split()))
    return dict(trap_classes=tuple((float(t["eigenvalue"]), str(t["class"])) for t in recs),
                trap_locations=locs)


def _shuffled_esd(W: torch.Tensor, name: str, opts: AuditOptions) -> list[float]:
    """The shuffled ESD the rule counted traps in (its own shuffle: the same seeded draws)."""
    return RULES[opts.trap_rule].shuffled_esd(W, matrix_generator(opts.seed, name))


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
