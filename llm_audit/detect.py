"""Stage 4: correlation traps (spikes that survive element-shuffling) and verdicts.

A trap is an eigenvalue of the element-shuffled matrix beyond its Marchenko–Pastur bulk:
shuffling keeps the entry distribution and destroys correlations, so a trained layer without
traps shuffles into a clean MP bulk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import mp, rsvd, spectral
from .spectral import PowerLawFit

WW_SMALL_M = 100  # WeightWatcher pools 5 shuffles when M < 100
WW_SMALL_REPS = 5
TW_TOP_K = 16
RSVD_MIN_M = 1024  # below this, exact eigenvalues of the shuffled Gram matrix are cheaper


@dataclass(frozen=True)
class TrapResult:
    num_traps: int  # rand_num_spikes
    max_rand_eval: float
    bulk_max: float  # rand_bulk_max, the shuffled ESD's MP edge (unrescaled units)
    sigma_mp: float  # rand_sigma_mp (ww rule only)
    threshold: float  # eigenvalues of the shuffled matrix above this are traps
    distance: float  # rand_distance: Jensen–Shannon distance of sorted ESDs (ww rule only)
    trap_evals: tuple[float, ...]  # the trap eigenvalues, largest first


def shuffle(W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of W's entries, same shape: correlations destroyed, values kept."""
    flat = W.reshape(-1)
    index = torch.int32 if flat.numel() < 2**31 else torch.int64  # halves a 579M-entry perm
    perm = torch.randperm(flat.numel(), generator=generator, device=generator.device,
                          dtype=index)
    return flat[perm.to(W.device)].reshape(W.shape)


def correlation_traps(W: torch.Tensor, evals: torch.Tensor, *, rule: str,
                      generator: torch.Generator) -> TrapResult:
    """Count correlation traps of W (rows, cols); `evals` is W's own ESD (for rand_distance)."""
    if rule == "ww":
        return _traps_ww(W, evals, generator)
    if rule == "tw":
        return _traps_tw(W, generator)
    raise ValueError(f"unknown trap rule {rule!r}")


def _traps_ww(W: torch.Tensor, evals: torch.Tensor, generator: torch.Generator) -> TrapResult:
    """WeightWatcher's rule: MP fit of the shuffled ESD, traps above bulk_max + √s_TW."""
    N, M = max(W.shape), min(W.shape)
    reps = WW_SMALL_REPS if M < WW_SMALL_M else 1
    shuffled = [spectral.esd(shuffle(W, generator)) for _ in range(reps)]
    pooled = torch.cat(shuffled)
    fit = mp.mp_fit(pooled, N, M)
    lam = pooled.cpu().numpy()
    traps = tuple(sorted((float(v) for v in lam[lam > fit.threshold]), reverse=True))
    return TrapResult(num_traps=fit.num_spikes, max_rand_eval=fit.max_eval,
                      bulk_max=fit.bulk_max, sigma_mp=fit.sigma_mp, threshold=fit.threshold,
                      distance=js_distance(evals, shuffled[0]), trap_evals=traps)


def _traps_tw(W: torch.Tensor, generator: torch.Generator) -> TrapResult:
    """Tracy–Widom rule: exact MP edge from the entries' variance (known for a shuffled matrix),
    traps above the TW₁ 99.9% quantile; the mean is removed first (its rank-1 spike is reported
    separately as `mean_spike`). Only the top of the spectrum is needed: for M >= RSVD_MIN_M a
    randomized SVD computes it, below that the exact Gram route is cheaper."""
    N, M = max(W.shape), min(W.shape)
    mean, var = spectral.entry_moments(W)
    X = W - mean  # (rows, cols), W's dtype
    edge, threshold = mp.tw_edge(var, N, M)
    S = shuffle(X, generator)
    del X
    if M < RSVD_MIN_M:
        top = torch.flip(spectral.esd(S), [0])
    else:
        k = TW_TOP_K
        while True:
            top = rsvd.top_eigenvalues(S, k, generator=generator)
            if float(top[-1]) <= threshold or k >= M:
                break
            k = min(2 * k, M)
    traps = tuple(float(v) for v in top if float(v) > threshold)
    return TrapResult(num_traps=len(traps), max_rand_eval=float(top[0]), bulk_max=edge,
                      sigma_mp=math.nan, threshold=threshold, distance=math.nan,
                      trap_evals=traps)


def js_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jensen–Shannon distance (natural log) of two sorted eigenvalue vectors, each as a
    distribution summing to 1."""
    p = np.sort(a.detach().cpu().double().numpy())
    q = np.sort(b.detach().cpu().double().numpy())
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(math.sqrt(max(0.0, (_kl(p, m) + _kl(q, m)) / 2)))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q[nz])).sum())


def warning_for(fit: PowerLawFit) -> str:
    """WeightWatcher's labels, except that a failed fit says so instead of 'over-trained'."""
    if not fit.ok:
        return f"failed: {fit.failed}"
    if fit.alpha < 2:
        return "over-trained"
    if fit.alpha > 6:
        return "under-trained"
    return ""
