"""What a correlation trap is made of (stage 4, pure functions on tensors).

A shuffled matrix S has no correlations left, so a trap (an eigenvalue of SᵀS above the rule's
threshold τ) can only come from the entry distribution. Each trap of one shuffle is classed:

- ``mean``: the rank-1 spike of a non-zero entry mean. The trap that disappears when the
  entries' mean is subtracted (at most one: a rank-1 change moves a count by at most one); it
  is the trap whose singular vectors overlap most with the constant vectors. Only under rules
  that do not remove the mean themselves (``ww``).
- ``entries``: a handful of outliers. With S₀ = S − mean, the trap's singular pair (u, v) and
  σ = uᵀS₀v = Σᵢⱼ uᵢ S₀ᵢⱼ vⱼ, entry (i, j) contributes cᵢⱼ = uᵢ S₀ᵢⱼ vⱼ to σ (the c's sum
  to σ exactly: a decomposition of the trap itself, weighting where the vectors point by the
  value found there). The trap is ``entries`` when clipping the CLIP_K entries of largest |c|
  to ±``clip_level`` (S₀ alone, one trap at a time) lowers the count above τ, *and* the
  matrix has no more outliers (entries beyond ±clip_level) than CLIP_K per trap: the traps
  are explained by a handful of entries that do not belong to the bulk.
- ``tail``: otherwise. Either the trap survives the clipping (its weight is spread over many
  entries), or the outliers are too many to be a handful: the traps are the top of a
  heavy-tailed entry distribution (i.i.d. Student-t entries, say), each one dominated by one
  of its largest entries but with as large ones behind it.

``clip_level`` = σ_rob · √(2 ln(rows·cols)), σ_rob = 1.4826·MAD of the entries (robust to the
outliers themselves): the largest |entry| expected among that many Gaussian entries, so a
clipped entry is no bigger than the biggest entry of a Gaussian matrix of the bulk's scale
(a single entry makes a spike only above ≈ σ·(rows·cols)^¼, the BBP transition).

Localisation: ``half_mass_entries`` = the fewest entries whose contributions, largest first,
reach σ/2; ``entries`` lists them (at most CLIP_K), as (row, col) of the *original* matrix (the
shuffle's permutation undone: one row = one output neuron, one column = one input feature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import rsvd

CLIP_K = 16  # entries clipped when testing the `entries` class, and listed per trap
TRAP_CLASSES = ("mean", "entries", "tail")
MAD_SAMPLE = 1 << 22  # entries the robust scale is estimated from (all when fewer)
FULL_SORT_MAX = 1 << 25  # larger matrices: half mass searched among the top HALF_MASS_TOP
HALF_MASS_TOP = 1 << 20
EXACT_MAX_M = 1024  # below this a full SVD of S is cheaper than a sketch

Counter = Callable[[torch.Tensor], int]  # number of eigenvalues of SᵀS above the threshold
# the same count and the top singular triplets (U, s, V) of S it found them with, or None
TripletCounter = Callable[[torch.Tensor], tuple[int, tuple | None]]


@dataclass(frozen=True)
class TrapInfo:
    """One trap: one row of ``traps.csv``."""

    trap: int  # 1 = the largest trap of the matrix
    eigenvalue: float  # of the shuffled matrix's Gram, in the units of trap_threshold
    cls: str  # mean | entries | tail
    half_mass_entries: int  # fewest original entries carrying half of the trap's σ
    entries: tuple[tuple[int, int], ...]  # the half-mass entries (at most CLIP_K), largest first


@dataclass(frozen=True)
class TrapComponent:
    """A trap as a rank-1 piece of its shuffled matrix: σ u vᵀ in the coordinates of shuffle
    ``perm`` (S = W.flatten()[perm]); what ``repair`` removes."""

    cls: str
    sigma: float
    u: torch.Tensor  # (rows,)
    v: torch.Tensor  # (cols,)
    perm: torch.Tensor  # the flat permutation of the shuffle it lives in
    outliers: tuple[int, ...]  # flat original indices clipped away by its `entries` test


@dataclass(frozen=True)
class Anatomy:
    traps: tuple[TrapInfo, ...]
    trap_entries: int  # distinct original entries behind the `entries` traps (the outliers)
    trap_rows: int  # distinct original rows those entries sit in
    trap_cols: int  # distinct original columns
    outliers: tuple[tuple[int, int], ...]  # those entries, (row, col)
    components: tuple[TrapComponent, ...] = ()  # one per trap, in the order of `traps`
    clip_level: float = math.nan  # the bulk scale the `entries` test clips to (± about mean)

    def count(self, cls: str) -> int:
        return sum(t.cls == cls for t in self.traps)


NO_TRAPS = Anatomy(traps=(), trap_entries=0, trap_rows=0, trap_cols=0, outliers=())


def unclassified(trap_evals: Sequence[float]) -> Anatomy:
    """The traps as counted, not classed or located (class ``unclassified``): a streamed
    matrix's, or any with ``--no-anatomy``. `trap_evals`: their eigenvalues, largest first."""
    traps = tuple(TrapInfo(trap=i + 1, eigenvalue=float(v), cls="unclassified",
                           half_mass_entries=0, entries=()) for i, v in enumerate(trap_evals))
    return Anatomy(traps=traps, trap_entries=0, trap_rows=0, trap_cols=0, outliers=())


@dataclass(frozen=True)
class _Found:
    eigenvalue: float
    cls: str
    half: int
    top: torch.Tensor  # flat shuffled indices of the listed entries
    sigma: float
    u: torch.Tensor
    v: torch.Tensor
    outliers: tuple[int, ...]  # flat shuffled indices changed by the clipping test


def clip_level(W: torch.Tensor, generator: torch.Generator) -> float:
    """σ_rob · √(2 ln n) of W's n entries, σ_rob = 1.4826 · median |w − median(w)| (from
    MAD_SAMPLE entries drawn with ``generator`` when there are more; medians are lower medians,
    as torch.median's)."""
    flat = W.reshape(-1)
    if flat.numel() > MAD_SAMPLE:
        idx = torch.randint(flat.numel(), (MAD_SAMPLE,), generator=generator)
        flat = flat.index_select(0, idx.to(flat.device))
    x = flat.to(torch.float64)
    mad = float(_lower_median((x - _lower_median(x)).abs_()))
    return 1.4826 * mad * math.sqrt(2 * math.log(max(W.numel(), 2)))


def _lower_median(x: torch.Tensor) -> float:
    """torch.median's value (the lower median) of a 1-D tensor, by numpy's introselect: 4x
    faster than torch's median at 4M entries (one thread, measured)."""
    k = (x.numel() - 1) // 2
    return float(np.partition(x.cpu().numpy(), k)[k])


def trap_anatomy(W: torch.Tensor, perms: Sequence[torch.Tensor], *, count: Counter,
                 threshold: float, mean: float, remove_mean: bool, generator: torch.Generator,
                 known: int | None = None, triplets: tuple | None = None,
                 top: torch.Tensor | None = None,
                 count_triplets: TripletCounter | None = None) -> Anatomy:
    """Anatomy of the traps of W (rows, cols) over its shuffles ``perms`` (flat permutations,
    one per shuffle: WeightWatcher pools several for small matrices). ``count(S)`` counts the
    eigenvalues of SᵀS above the rule's ``threshold``; ``remove_mean``: the rule subtracts the
    entries' mean before counting (then no trap is of class ``mean``); ``known``: the rule's
    own count when there is one shuffle (saves recounting it); ``triplets``: (U, s, V), at
    least ``known`` top singular triplets of that one shuffle as the rule counted it (centred
    when ``remove_mean``), so they are not sketched again; ``top``: the rule's top eigenvalues
    of that shuffle (descending; rules that keep the mean), at least ``known`` + 1 of them;
    ``count_triplets``: ``count`` that also returns the triplets it found them with."""
    level = clip_level(W, generator)
    found: list[tuple[_Found, torch.Tensor]] = []
    for perm in perms:
        # the rule's shuffle (index_select: 5x faster than W[perm] at 2880², same values), in
        # float32 unless W is float64: the contributions and their sort are memory-bound
        # passes over rows·cols values (float32 halves them; the vectors, the counts and the
        # sums that decide are float64)
        S = W.reshape(-1).index_select(0, perm.to(W.device)).to(_work_dtype(W)).view(W.shape)
        found += [(f, perm) for f in _one_shuffle(
            S, S - mean, count, level, remove_mean=remove_mean, generator=generator, mean=mean,
            threshold=threshold, known=known if len(perms) == 1 else None,
            triplets=triplets if len(perms) == 1 and remove_mean else None,
            top=top if len(perms) == 1 else None, count_triplets=count_triplets)]
    found.sort(key=lambda fp: -fp[0].eigenvalue)
    cols = W.shape[1]
    traps = tuple(TrapInfo(trap=n + 1, eigenvalue=f.eigenvalue, cls=f.cls,
                           half_mass_entries=f.half,
                           entries=tuple(divmod(int(perm[i]), cols) for i in f.top))
                  for n, (f, perm) in enumerate(found))
    comps = tuple(TrapComponent(cls=f.cls, sigma=f.sigma, u=f.u, v=f.v, perm=perm,
                                outliers=tuple(int(perm[i]) for i in f.outliers))
                  for f, perm in found)
    where = sorted({divmod(i, cols) for c in comps for i in c.outliers})
    return Anatomy(traps=traps, trap_entries=len(where), trap_rows=len({r for r, _ in where}),
                   trap_cols=len({c for _, c in where}), outliers=tuple(where),
                   components=comps, clip_level=level)


def _one_shuffle(S: torch.Tensor, S0: torch.Tensor, count: Counter, level: float, *,
                 remove_mean: bool, generator: torch.Generator, mean: float, threshold: float,
                 known: int | None = None, triplets: tuple | None = None,
                 top: torch.Tensor | None = None,
                 count_triplets: TripletCounter | None = None) -> list[_Found]:
    """The traps of one shuffle S (S0 = S − mean), classed and localised; ``known``: the rule's
    own count for this shuffle (not recounted); ``triplets``: base's top triplets, if known;
    ``top``: the rule's top eigenvalues of SᵀS (descending, mean kept), if known;
    ``count_triplets``: a count that also returns the triplets it found (or None)."""
    base = S0 if remove_mean else S
    n_all = count(base) if known is None else known
    if n_all == 0:
        return []
    if remove_mean:
        ok = triplets is not None and triplets[1].numel() >= n_all
        U, s, V = _as64(triplets, S) if ok else _triplets(S0, n_all, generator)
        U0, s0, V0 = U, s, V
        n_mean, n_rest, evs = 0, n_all, [float(x) ** 2 for x in s[:n_all]]
    else:
        (U, s, V), (U0, s0, V0), n_mean, n_rest, evs = _split_mean(
            S, S0, n_all, count, count_triplets, generator, mean, threshold, top)
    n_cls = n_all - n_mean  # traps classed entries / tail
    found = []
    handful = _count_beyond(S0, level) <= CLIP_K * max(n_cls, 1)
    buf = torch.empty_like(S0)  # every trap's contributions, in turn
    if n_mean:
        j = int(torch.argmax(U.sum(0).abs() * V.sum(0).abs()))
        found.append(_Found(evs.pop(j), "mean", *_localise(_contributions(base, U[:, j], V[:, j],
                                                                           buf)),
                            sigma=float(s[j]), u=U[:, j], v=V[:, j], outliers=()))
    for t in range(n_cls):  # the other traps' vectors come from S0, where the mean's is gone
        c = _contributions(S0, U0[:, t], V0[:, t], buf)
        half, top_idx = _localise(c)
        # the clipping test only when the outliers are a handful (otherwise `tail` anyway):
        # it costs a count, i.e. an eigen-solve, per trap
        drops = handful and count(clipped := _clip_top(S0, c, level)) < n_rest
        changed = tuple(int(i) for i in _changed(S0, clipped)) if drops else ()
        found.append(_Found(evs[t], "entries" if drops else "tail", half, top_idx,
                            sigma=float(s0[t]), u=U0[:, t], v=V0[:, t], outliers=changed))
    return found


def _split_mean(S, S0, n_all, count, count_triplets, generator, mean, threshold, top):
    """Under a rule that keeps the mean: ((U, s, V) of S's top n_all, or Nones when no trap is
    the mean's; (U0, s0, V0) of S0's top n_all − n_mean; n_mean; n_rest = count(S0); the traps'
    eigenvalues). S's own sketch is needed only to find the mean's trap: with the rule's `top`
    values the traps' eigenvalues and the Weyl test come from them; S0's vectors come from the
    centred count's sketch when it made one."""
    want = n_all + 1
    S_trip = (None, None, None)
    if top is not None and top.numel() >= want:
        s_top = top[:want].to(torch.float64).clamp_min(0).sqrt()
    else:
        S_trip = _triplets(S, want, generator)
        s_top = S_trip[1]
    n_rest, trip0 = _centred_count(S0, s_top, n_all, count_triplets or (lambda X: (count(X), None)),
                                   mean, threshold)
    # a rank-1 change (the mean) moves the count by at most one, either way: centring can even
    # add a trap; the rule's own count is n_all, of which at most one is the mean's
    n_mean = min(1, max(0, n_all - n_rest))
    if n_mean and S_trip[0] is None:
        S_trip = _triplets(S, want, generator)
    if S_trip[0] is not None:
        S_trip = (S_trip[0][:, :n_all], S_trip[1][:n_all], S_trip[2][:, :n_all])
    n_cls = n_all - n_mean
    if trip0 is not None and trip0[1].numel() >= n_cls:
        S0_trip = _as64(trip0, S)
    else:
        S0_trip = _triplets(S0, n_cls, generator) if n_cls else (None, None, None)
    return S_trip, S0_trip, n_mean, n_rest, [float(x) ** 2 for x in s_top[:n_all]]


def _as64(triplets: tuple, like: torch.Tensor) -> tuple:
    return tuple(t.to(like.device, torch.float64) for t in triplets)


def _centred_count(S0: torch.Tensor, s: torch.Tensor, n_all: int,
                   count_triplets: TripletCounter, mean: float,
                   threshold: float) -> tuple[int, tuple | None]:
    """count(S0) (and the triplets that count found, if any), skipped when Weyl's inequality
    settles it: S0 = S − mean·11ᵀ moves every singular value of S by at most
    ‖mean·11ᵀ‖₂ = |mean|·√(rows·cols), so when the smallest trap's s[n_all−1] and the largest
    non-trap's s[n_all] (s: S's top n_all + 1) are both farther than that from √τ, no
    eigenvalue of S0ᵀS0 crosses τ."""
    shift, edge = abs(mean) * math.sqrt(S0.numel()), math.sqrt(threshold)
    if len(s) > n_all and float(s[n_all - 1]) - shift > edge and float(s[n_all]) + shift < edge:
        return n_all, None
    return count_triplets(S0)


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _triplets(S: torch.Tensor, k: int, generator: torch.Generator):
    if min(S.shape) < EXACT_MAX_M:
        U, s, Vh = torch.linalg.svd(S.to(torch.float64), full_matrices=False)
        return U[:, :k], s[:k], Vh[:k].T
    return rsvd.top_singular_triplets(S, k, generator=generator)


def _contributions(S: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """c (rows·cols,): entry (i, j)'s share uᵢ Sᵢⱼ vⱼ of σ = uᵀSv, signed so that Σc = σ > 0;
    written into `out` (S's shape) if given: one buffer for all of a matrix's traps saves a
    fresh 66 MB allocation and its page faults per trap at 2880² (3-10x this step's time)."""
    c = torch.mul(S, u.to(S.dtype)[:, None], out=out).mul_(v.to(S.dtype)[None, :]).reshape(-1)
    return c if float(c.sum()) >= 0 else c.neg_()


def _localise(c: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(half_mass_entries, the CLIP_K largest contributions' flat indices, largest first), from
    the contributions c (Σc = σ > 0). Only the candidates above a level t are sorted: t starts
    at max(c)/8 and drops ×8 until the candidates' sum reaches σ/2, which then holds the
    half-mass entries exactly (a full sort of rows·cols values cost 1.5 s a trap at 2880²).
    Above FULL_SORT_MAX entries at most HALF_MASS_TOP candidates are kept (a lower bound).
    On CPU the masks and sums run in numpy: 2.8x faster than torch's boolean indexing at
    2880² (20 traps 1.30 s -> 0.47 s, one thread, identical answers); the candidates above a
    level are few (at most 25,000 of 8.3M at 2880²), which keeps a masked sum cheap."""
    x = c.numpy() if c.device.type == "cpu" else None
    half = float(c.sum()) / 2  # float32 c: torch's cascade sum
    top = t = float(c.max())
    while True:
        t /= 8
        mask = (x >= t) if x is not None else (c >= t)
        if float((x if x is not None else c)[mask].sum()) >= half or t < top * 1e-30:
            break
    if x is not None:
        idx = np.flatnonzero(mask)
        order = np.argsort(-x[idx], kind="stable")
        vals = x[idx][order]
        if c.numel() > FULL_SORT_MAX:
            vals, order = vals[:HALF_MASS_TOP], order[:HALF_MASS_TOP]
        reached = np.flatnonzero(np.cumsum(vals, dtype=np.float64) >= half)
        n_half = int(reached[0]) + 1 if len(reached) else len(vals)
        return n_half, torch.from_numpy(idx[order[:min(n_half, CLIP_K)]])
    idx = torch.nonzero(mask).flatten()
    vals, order = torch.sort(c[idx], descending=True, stable=True)
    if c.numel() > FULL_SORT_MAX:
        vals, order = vals[:HALF_MASS_TOP], order[:HALF_MASS_TOP]
    reached = torch.nonzero(torch.cumsum(vals, 0, dtype=torch.float64) >= half)
    n_half = int(reached[0]) + 1 if len(reached) else len(vals)
    return n_half, idx[order[:min(n_half, CLIP_K)]]


def _count_beyond(S: torch.Tensor, level: float) -> int:
    """#{entries with |s| > level} (numpy on CPU: torch's sum of a boolean mask is 7x slower)."""
    if S.device.type == "cpu":
        return int(np.count_nonzero(np.abs(S.numpy()) > level))
    return int((S.abs() > level).sum())


def _clip_top(S: torch.Tensor, c: torch.Tensor, level: float) -> torch.Tensor:
    """S with the CLIP_K entries of largest |contribution| (c) clipped to ±level."""
    idx = torch.topk(c.abs(), min(CLIP_K, S.numel())).indices
    out = S.clone().reshape(-1)
    out[idx] = out[idx].clamp(-level, level)
    return out.view(S.shape)


def _changed(S: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    return torch.nonzero((S != clipped).reshape(-1)).flatten()
