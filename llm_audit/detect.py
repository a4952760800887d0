"""Stage 4: correlation traps (spikes that survive element-shuffling) and verdicts.

A trap is an eigenvalue of the element-shuffled matrix beyond its Marchenko–Pastur bulk:
shuffling keeps the entry distribution and destroys correlations, so a trained layer without
traps shuffles into a clean MP bulk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import anatomy, rsvd, spectral
from .anatomy import Anatomy
from .precision import PrecisionPolicy
from .spectral import PowerLawFit

WW_SMALL_M = 100  # WeightWatcher pools 5 shuffles when M < 100
WW_SMALL_REPS = 5
TW_TOP_K = 16
DEVICE_PERM_NUMEL = 1 << 24
AUTO = PrecisionPolicy("auto")
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
    anatomy: Anatomy = anatomy.NO_TRAPS  # what each trap is made of (anatomy.py)
    precision: str = "float64"  # trap_precision: what the count was decided in


def shuffle(W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of W's entries, same shape: correlations destroyed, values kept.

    W: (rows, cols), or (B, rows, cols) where every matrix gets the same permutation (one
    uniformly random permutation per matrix, drawn once for the stack). The permutation is
    drawn with the (CPU) generator, so results do not depend on the device, except for
    matrices of DEVICE_PERM_NUMEL entries or more on CUDA (embeddings, lm_head): their
    permutation is drawn on the GPU, from a seed the generator gives (another random shuffle
    than on CPU, same statistics; a CPU randperm of 579M entries takes ~15 s).
    """
    return apply_permutation(W, permutation(W, generator))


def permutation(W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The flat permutation `shuffle` applies to W (rows, cols) or a stack (B, rows, cols)."""
    n = W.shape[-2] * W.shape[-1]
    if W.is_cuda and n >= DEVICE_PERM_NUMEL:
        g = torch.Generator(W.device)
        g.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return torch.randperm(n, generator=g, device=W.device)
    index = torch.int32 if n < 2**31 else torch.int64  # halves a 579M-entry perm
    perm = torch.randperm(n, generator=generator, device=generator.device, dtype=index)
    return perm.to(W.device, torch.int64 if W.is_cuda else index)


def apply_permutation(W: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    flat = W.reshape(*W.shape[:-2], -1)
    return flat.index_select(-1, perm).reshape(W.shape)


def correlation_traps(W: torch.Tensor, evals: torch.Tensor, *, rule: str,
                      generator: torch.Generator, dtype: torch.dtype = torch.float64,
                      policy: PrecisionPolicy = AUTO) -> TrapResult:
    """Count correlation traps of W (rows, cols); `evals` is W's own ESD (for rand_distance)."""
    mean, var = spectral.entry_moments(W)
    return stack_traps(W[None], evals[None], rule=rule, generator=generator,
                       generators=(generator,), moments=((mean, var),), dtype=dtype,
                       policy=policy)[0]


def stack_traps(W: torch.Tensor, evals: torch.Tensor, *, rule: str, generator: torch.Generator,
                generators: Sequence[torch.Generator],
                moments: Sequence[tuple[float, float]],
                dtype: torch.dtype = torch.float64,
                policy: PrecisionPolicy = AUTO, anatomy: bool = True) -> list[TrapResult]:
    """Traps of B equal-shaped matrices W (B, rows, cols) at once. `evals` (B, M): their ESDs;
    `generator` draws the shuffle shared by the stack, `generators[b]` matrix b's sketches;
    `moments[b]` = (mean, variance) of matrix b's entries; `dtype`: the eigen precision;
    `policy` decides whether a float32 count within round-off of its threshold is redone in
    float64 (``auto`` only); `anatomy`: class and locate the traps (else `unclassified`)."""
    from .rules import RULES  # the registry; its rules use this module's helpers

    if rule not in RULES:
        raise ValueError(f"unknown trap rule {rule!r}")
    return RULES[rule].traps(W, evals, generator=generator, generators=generators,
                             moments=moments, dtype=dtype, policy=policy, anatomy=anatomy)


def trap_anatomy(W: torch.Tensor, perms: Sequence[torch.Tensor], num_traps: int, threshold: float,
                 generator: torch.Generator, moments: tuple[float, float], *,
                 remove_mean: bool, triplets: tuple | None = None,
                 top: torch.Tensor | None = None) -> Anatomy:
    """The anatomy of a matrix's traps (none: nothing to compute), counted in float64 against
    the rule's threshold; `triplets`: the rule's own top singular triplets of its one shuffle
    (`top_above_triplets`), not sketched again; `top`: the rule's own top eigenvalues of it
    (descending)."""
    if num_traps == 0:
        return anatomy.NO_TRAPS

    def count(S: torch.Tensor) -> int:
        return int((top_above(S, threshold, generator, torch.float64) > threshold).sum())

    def count_triplets(S: torch.Tensor) -> tuple[int, tuple | None]:
        if min(S.shape) < RSVD_MIN_M:
            return count(S), None
        # the centred count is within one of the rule's: one sketch wide enough for it
        vals, trip = top_above_triplets(S, threshold, generator, torch.float64,
                                        k=max(TW_TOP_K, num_traps + 2))
        return int((vals > threshold).sum()), trip()
    return anatomy.trap_anatomy(W, perms, count=count, threshold=threshold, mean=moments[0],
                                known=num_traps, remove_mean=remove_mean, generator=generator,
                                triplets=triplets, top=top, count_triplets=count_triplets)


def top_above(S: torch.Tensor, threshold: float, generator: torch.Generator,
               dtype: torch.dtype, k: int = TW_TOP_K) -> torch.Tensor:
    """Descending top eigenvalues of SᵀS, enough of them to include one at or below
    `threshold` (or all M), starting from the top k."""
    if min(S.shape) < RSVD_MIN_M:
        return torch.flip(spectral.esd(S, dtype=dtype), [0]).double()
    return top_above_triplets(S, threshold, generator, dtype, k)[0]


def top_above_triplets(S: torch.Tensor, threshold: float, generator: torch.Generator,
                       dtype: torch.dtype, k: int = TW_TOP_K):
    """`top_above` for a matrix of M >= RSVD_MIN_M, sketched with k, 2k, ... until a value
    falls at or below the threshold, and a function giving the singular triplets (U, s, V) of
    S that came with the values (`rsvd.top_triplets_above`; nothing computed unless called)."""
    M = min(S.shape)
    while True:
        top, triplets = rsvd.top_triplets_above(S, k, generator=generator, dtype=dtype,
                                                threshold=threshold)
        if float(top[-1]) <= threshold or k >= M:
            return top, triplets
        k = min(2 * k, M)


def eig_err(lam: torch.Tensor) -> float:
    return spectral.float32_eig_err(float(lam.max()))


def near(lam: torch.Tensor, threshold: float, err: float) -> bool:
    """Whether some eigenvalue is within `err` of the threshold (its side is uncertain)."""
    return bool(((lam - threshold).abs() <= err).any())


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
