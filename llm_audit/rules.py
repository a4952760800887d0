"""The trap rules: one registry, one object per rule (name, help, what it counts, the shuffled
spectrum its figure draws, the columns it fills).

Adding a rule means adding one `TrapRule` here (and its tests); the CLI choices and help, the
option check, the journal key (the rule's name), the figures and the reports read `RULES`.
Nothing heavy is imported at module level (the CLI builds `--help` from this registry).

- ``ww``: WeightWatcher 0.7.7's rule (MP fit of the shuffled ESD, bulk_max + √s_TW).
- ``tw``: the mean removed, traps above the exact MP edge + the TW₁ 99.9% quantile.
- ``perm``: the ``tw`` count over PERM_SHUFFLES independent shuffles, the median of them (a
  permutation null: one shuffle's count of a borderline eigenvalue is a coin toss).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .precision import name as precision_name

if TYPE_CHECKING:  # for annotations only: torch loads when a rule runs
    import torch

    from .detect import TrapResult
    from .precision import PrecisionPolicy

PERM_SHUFFLES = 8


@dataclass(frozen=True)
class TrapRule:
    name: str
    help: str
    removes_mean: bool  # the shuffled matrix is centred first (no `mean` traps)
    fills: tuple[str, ...]  # rule-specific columns it fills (others stay empty)
    # (W, evals, *, generator, generators, moments, dtype, policy)
    traps: Callable[..., list[TrapResult]]
    shuffled_esd: Callable[..., list[float]]  # (W, generator) -> the ESD its figure draws
    # from whole shuffled spectra (a streamed matrix, streaming.py): how many shuffles for M
    # eigenvalues, and (esds, evals, N, M, (mean, var), precision) -> TrapResult (no anatomy)
    shuffles: Callable[[int], int] = lambda M: 1
    count_esd: Callable[..., TrapResult] | None = None
    figure_shuffles: Callable[[int], int] = lambda M: 1  # of those, the first n its figure pools


def _imports():
    import torch

    from . import detect, mp, rsvd, spectral
    return torch, detect, mp, rsvd, spectral


def _ww_traps(W: torch.Tensor, evals: torch.Tensor, *, generator: torch.Generator,
              generators: Sequence[torch.Generator], moments: Sequence[tuple[float, float]],
              dtype: torch.dtype, policy: PrecisionPolicy,
              anatomy: bool = True) -> list[TrapResult]:
    """WeightWatcher's rule: MP fit of the shuffled ESD, traps above bulk_max + √s_TW."""
    torch, detect, mp, rsvd, spectral = _imports()
    N, M = max(W.shape[-2:]), min(W.shape[-2:])
    reps = detect.WW_SMALL_REPS if M < detect.WW_SMALL_M else 1
    perms = [detect.permutation(W, generator) for _ in range(reps)]
    shuffled = [detect.apply_permutation(W, p) for p in perms]  # each (B, rows, cols)
    esds = [spectral.esd(S, dtype=dtype).double() for S in shuffled]  # each (B, M)
    out = []
    for b in range(W.shape[0]):
        pooled = torch.cat([e[b] for e in esds])
        fit = mp.mp_fit(pooled, N, M)
        decided_in = dtype
        if policy.redo(dtype, detect.near(pooled, fit.threshold, detect.eig_err(pooled))):
            pooled = torch.cat([spectral.esd(S[b]) for S in shuffled])  # exact in float64
            fit = mp.mp_fit(pooled, N, M)
            decided_in = torch.float64
        r = _ww_result(pooled, fit, evals[b], pooled[:M], precision_name(decided_in))
        top = torch.sort(pooled, descending=True).values if reps == 1 and anatomy else None
        out.append(dataclasses.replace(r, anatomy=detect.trap_anatomy(
            W[b], perms, fit.num_spikes, fit.threshold, generators[b], moments[b],
            remove_mean=False, top=top) if anatomy else _unclassified(r)))
    return out


def _unclassified(r: TrapResult):
    """`r`'s traps as counted, not classed (``--no-anatomy``)."""
    from .anatomy import unclassified  # torch: not at import (the CLI's --help uses this module)
    return unclassified(r.trap_evals[:r.num_traps])


def _ww_result(pooled: torch.Tensor, fit, evals: torch.Tensor, first: torch.Tensor,
               precision: str) -> TrapResult:
    """The ``ww`` count of pooled shuffled ESDs given their MP fit (`first`: the first
    shuffle's ESD, for rand_distance); no anatomy."""
    _, detect, _, _, _ = _imports()
    lam = pooled.cpu().numpy()
    traps = tuple(sorted((float(v) for v in lam[lam > fit.threshold]), reverse=True))
    return detect.TrapResult(num_traps=fit.num_spikes, max_rand_eval=fit.max_eval,
                             bulk_max=fit.bulk_max, sigma_mp=fit.sigma_mp,
                             threshold=fit.threshold, distance=detect.js_distance(evals, first),
                             trap_evals=traps, precision=precision)


def _tw_traps(W: torch.Tensor, evals: torch.Tensor, *, generator: torch.Generator,
              generators: Sequence[torch.Generator], moments: Sequence[tuple[float, float]],
              dtype: torch.dtype, policy: PrecisionPolicy,
              anatomy: bool = True) -> list[TrapResult]:
    """Tracy–Widom rule: exact MP edge from the entries' variance (known for a shuffled matrix),
    traps above the TW₁ 99.9% quantile; the mean is removed first (its rank-1 spike is reported
    separately as `mean_spike`). Only the top of the spectrum is needed: for M >= RSVD_MIN_M a
    randomized block-Krylov SVD computes it, below that the exact Gram route is cheaper."""
    torch, detect, mp, rsvd, spectral = _imports()
    N, M = max(W.shape[-2:]), min(W.shape[-2:])
    means = torch.tensor([m for m, _ in moments], dtype=W.dtype, device=W.device)
    perm = detect.permutation(W, generator)
    S = detect.apply_permutation(W, perm).sub_(means[:, None, None])  # (B, rows, cols), centred
    edges = [mp.tw_edge(var, N, M) for _, var in moments]
    # On CUDA the whole stack's top-k comes from one batched sketch (same values as one by
    # one); on CPU a batch saves nothing and keeps settled members iterating with the rest.
    first = None
    if M >= detect.RSVD_MIN_M and S.is_cuda:
        thresholds = torch.tensor([t for _, t in edges], dtype=torch.float64)
        first = rsvd.top_eigenvalues(S, detect.TW_TOP_K, generator=list(generators), dtype=dtype,
                                     threshold=thresholds).double()
    out = []
    for b, (edge, threshold) in enumerate(edges):
        top, trip = _tw_top(S[b], threshold, generators[b], dtype, None if first is None
                            else first[b], anatomy)
        decided_in = dtype
        if policy.redo(dtype, detect.near(top, threshold, detect.eig_err(top))):
            top, trip = _tw_top(S[b], threshold, generators[b], torch.float64, None, anatomy)
            decided_in = torch.float64
        r = _tw_result(top, edge, threshold, precision_name(decided_in))
        out.append(dataclasses.replace(r, anatomy=detect.trap_anatomy(
            W[b], [perm], r.num_traps, threshold, generators[b], moments[b], remove_mean=True,
            triplets=trip) if anatomy else _unclassified(r)))
    return out


def _tw_top(S: torch.Tensor, threshold: float, generator: torch.Generator, dtype: torch.dtype,
            first: torch.Tensor | None, vectors: bool = True):
    """(the top of SᵀS down past the threshold, its singular triplets or None) for one matrix:
    from the batch's sketch `first` when it reaches below the threshold; on CPU (`first` None)
    at M >= RSVD_MIN_M with the triplets (if `vectors`), which the anatomy then reuses."""
    _, detect, _, _, _ = _imports()
    if first is not None and float(first[-1]) <= threshold:
        return first, None
    if first is not None:  # more than TW_TOP_K traps: sketch wider
        return detect.top_above(S, threshold, generator, dtype, k=2 * detect.TW_TOP_K), None
    if min(S.shape) < detect.RSVD_MIN_M or not vectors:
        return detect.top_above(S, threshold, generator, dtype), None
    top, triplets = detect.top_above_triplets(S, threshold, generator, dtype)
    return top, triplets()


def _tw_result(top: torch.Tensor, edge: float, threshold: float, precision: str) -> TrapResult:
    """The ``tw`` count from the shuffled spectrum's top (descending); no anatomy."""
    _, detect, _, _, _ = _imports()
    traps = tuple(float(v) for v in top if float(v) > threshold)
    return detect.TrapResult(num_traps=len(traps), max_rand_eval=float(top[0]), bulk_max=edge,
                             sigma_mp=math.nan, threshold=threshold, distance=math.nan,
                             trap_evals=traps, precision=precision)


def _perm_traps(W: torch.Tensor, evals: torch.Tensor, *, generator: torch.Generator,
                generators: Sequence[torch.Generator], moments: Sequence[tuple[float, float]],
                dtype: torch.dtype, policy: PrecisionPolicy,
                anatomy: bool = True) -> list[TrapResult]:
    """The ``tw`` rule over PERM_SHUFFLES independent shuffles (drawn one after the other
    from `generator`): each matrix's count is the lower median of its counts; its other
    results (trap eigenvalues, anatomy) are those of the first shuffle with that count."""
    runs = [_tw_traps(W, evals, generator=generator, generators=generators, moments=moments,
                      dtype=dtype, policy=policy, anatomy=anatomy) for _ in range(PERM_SHUFFLES)]
    out = []
    for b in range(W.shape[0]):
        counts = [r[b].num_traps for r in runs]
        median = statistics.median_low(counts)
        out.append(runs[counts.index(median)][b])
    return out


def _ww_shuffles(M: int) -> int:
    from . import detect
    return detect.WW_SMALL_REPS if M < detect.WW_SMALL_M else 1


def _ww_count(esds: Sequence[torch.Tensor], evals: torch.Tensor, N: int, M: int,
              moments: tuple[float, float], precision: str) -> TrapResult:
    """`_ww_traps` on given shuffled ESDs (ascending, mean kept): pooled, MP-fitted."""
    torch, _, mp, _, _ = _imports()
    pooled = torch.cat([e.double() for e in esds])
    return _ww_result(pooled, mp.mp_fit(pooled, N, M), evals, esds[0], precision)


def _tw_count(esds: Sequence[torch.Tensor], evals: torch.Tensor, N: int, M: int,
              moments: tuple[float, float], precision: str) -> TrapResult:
    """`_tw_traps` on a given shuffled ESD of the centred matrix (one shuffle)."""
    torch, _, mp, _, _ = _imports()
    edge, threshold = mp.tw_edge(moments[1], N, M)
    return _tw_result(torch.flip(esds[0].double(), [0]), edge, threshold, precision)


def _perm_count(esds: Sequence[torch.Tensor], evals: torch.Tensor, N: int, M: int,
                moments: tuple[float, float], precision: str) -> TrapResult:
    """`_perm_traps` on PERM_SHUFFLES given shuffled ESDs: the lower median count."""
    runs = [_tw_count([e], evals, N, M, moments, precision) for e in esds]
    counts = [r.num_traps for r in runs]
    return runs[counts.index(statistics.median_low(counts))]


def _ww_esd(W: torch.Tensor, generator: torch.Generator) -> list[float]:
    torch, detect, _, _, spectral = _imports()
    reps = detect.WW_SMALL_REPS if min(W.shape) < detect.WW_SMALL_M else 1
    return sorted(torch.cat([spectral.esd(detect.shuffle(W, generator))
                             for _ in range(reps)]).cpu().tolist())


def _tw_esd(W: torch.Tensor, generator: torch.Generator) -> list[float]:
    torch, detect, _, _, spectral = _imports()
    X = W.to(torch.float64)
    return sorted(spectral.esd(detect.shuffle(X - X.mean(), generator)).cpu().tolist())


RULES: dict[str, TrapRule] = {r.name: r for r in (
    TrapRule("ww", "WeightWatcher's rule (counts agree with it)", removes_mean=False,
             fills=("rand_sigma_mp", "rand_distance"), traps=_ww_traps, shuffled_esd=_ww_esd,
             shuffles=_ww_shuffles, count_esd=_ww_count, figure_shuffles=_ww_shuffles),
    TrapRule("tw", "Tracy-Widom 99.9% above the exact MP edge, mean removed",
             removes_mean=True, fills=(), traps=_tw_traps, shuffled_esd=_tw_esd,
             count_esd=_tw_count),
    TrapRule("perm", f"the tw count, median over {PERM_SHUFFLES} shuffles", removes_mean=True,
             fills=(), traps=_perm_traps, shuffled_esd=_tw_esd,
             shuffles=lambda M: PERM_SHUFFLES, count_esd=_perm_count),
)}


def rules_help() -> str:
    return "; ".join(f"{r.name}: {r.help}" for r in RULES.values())
