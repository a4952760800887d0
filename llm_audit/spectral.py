"""Stage 3: spectra of weight matrices and the HTSR metrics on them. Pure functions on tensors.

Conventions (WeightWatcher 0.7.x, whose column names users know): W has shape (rows, cols),
N = max, M = min, Q = N/M; the ESD is the M eigenvalues λ = s(W)² of WᵀW with no 1/N factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# eigenvalues at or below this are ignored by the power-law fit (WeightWatcher's floor), taken
# relative to λ_max when λ_max < 1, so that α of c·W does not depend on c
EVALS_THRESH = 1e-5
GRAM_CHUNK_ROWS = 16384  # rows per chunk when accumulating WᵀW of a tall matrix
# column blocks of the lower-triangle Gram product on CPU (8: 10% faster than 4 at 2880²,
# float64, one thread)
GRAM_BLOCKS = 8
F32_ERR_ULPS = 64  # float32 eigenvalue round-off bound in ulps of λ_max (measured <= 30)
# |D_f32 - D_f64| of a candidate <= C·eps32·(α-1)·λ_max/xmin with C <= 30 measured on
# all-MiniLM-L6-v2 and 2880² experts (benchmarks/RESULTS.md); 64 leaves a factor 2
FLOAT32_ROUND_OFF = 64 * 1.1920928955078125e-07
ROUND_OFF_FLOOR = 100  # eigenvalues below 100 x the round-off bound are not trusted as xmin
SMALL_N = 20  # below this many eigenvalues the small-sample fit is used
SMALL_N_MIN_TAIL = 8
CLIP_XMAX_FIRST, CLIP_XMAX_LAST = 2, 9  # eigenvalues clipped by fix_fingers='clip_xmax'
CLIP_XMAX_MIN_GAIN = 1.0


@dataclass(frozen=True)
class PowerLawFit:
    """Continuous power-law fit p(λ) ∝ λ^-α of the ESD tail λ >= xmin (KS-selected xmin)."""

    alpha: float
    xmin: float
    D: float
    num_pl_spikes: int
    sigma: float = math.nan  # standard error of α: (α - 1) / sqrt(n)
    num_fingers: int = 0
    raw_alpha: float = math.nan  # α before fix_fingers; equals alpha when none were clipped
    failed: str = ""  # reason the fit failed, empty when it succeeded
    # how far α could move if eigenvalue round-off (the fit's `round_off`) changed the xmin
    # choice: the largest |α' - α| over candidates whose D is within round-off of the best
    alpha_spread: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class SpectralNorms:
    lambda_max: float
    log_norm: float  # log10 ||W||_F^2 = log10 Σλ
    log_spectral_norm: float  # log10 λ_max
    stable_rank: float  # Σλ / λ_max
    entropy: float  # matrix entropy −Σ p ln p / ln(rank), p = λ/Σλ
    rank: int

RANK_MARGIN = 16.0  # full_rank: Cholesky shift in units of the rank threshold


def esd(W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Ascending eigenvalues λ = s(W)² of WᵀW in float64: M = min(rows, cols) of them, for one
    matrix (rows, cols) -> (M,) or a batch of equal-shaped matrices (B, rows, cols) -> (B, M).

    Computed as eigvalsh of the (M, M) Gram matrix in `dtype` (float64 by default): 3-4x cheaper
    than an SVD; clamped at 0 since round-off can make the smallest ones slightly negative. Tall
    matrices are converted chunk by chunk, so a 201088 x 2880 embedding never exists in float64.
    Scale-invariant: W is multiplied by a power of two c (exact) that brings max|W| into [1, 2)
    first and the eigenvalues divided by c² after, so a float32 Gram matrix of entries ~2⁻¹²⁰
    does not underflow to 0, nor one of entries ~2¹⁰⁰ overflow.
    """
    c = pow2_scale(W)
    lam = torch.linalg.eigvalsh(gram(W, dtype=dtype, scale=c)).clamp_min_(0.0)
    return lam.to(torch.float64) / (c.reshape(c.shape[:-2] + (1,)) ** 2)


def pow2_scale(W: torch.Tensor) -> torch.Tensor:
    """(..., 1, 1) float64 powers of two c with max|c·W| in [1, 2) per matrix (1 for a matrix
    of zeros or non-finite entries)."""
    lo, hi = W.reshape(*W.shape[:-2], -1).aminmax(dim=-1)
    amax = torch.maximum(-lo, hi).to(torch.float64)
    ok = (amax > 0) & torch.isfinite(amax)
    e = torch.where(ok, torch.floor(torch.log2(torch.where(ok, amax, 1.0))), 0.0)
    return torch.exp2(-e)[..., None, None]


def gram(W: torch.Tensor, *, dtype: torch.dtype = torch.float64,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """AᵀA for A = W or Wᵀ, whichever is taller (times `scale`, see `pow2_scale`, if given):
    (..., M, M) in `dtype`.

    On CPU only the lower triangle (all `eigvalsh` reads) is computed, in column blocks: 40%
    fewer flops than a full product. Tall single matrices accumulate over row chunks.
    """
    A = W if W.shape[-2] >= W.shape[-1] else W.mT  # (..., N, M), N >= M
    c = None if scale is None or bool((scale == 1).all()) else scale.to(A.device, dtype)
    if A.ndim == 2 and A.dtype != dtype and A.shape[0] > GRAM_CHUNK_ROWS:
        G = torch.zeros(A.shape[1], A.shape[1], dtype=dtype, device=A.device)
        for rows in A.split(GRAM_CHUNK_ROWS):  # tall (embeddings): no full copy in `dtype`
            ch = rows.to(dtype) if c is None else rows.to(dtype).mul_(c)
            G.addmm_(ch.T, ch)
        return G
    A = A.to(dtype) if c is None else A.to(dtype) * c
    if A.device.type != "cpu":
        return A.mT @ A
    M = A.shape[-1]
    G = torch.empty(*A.shape[:-2], M, M, dtype=dtype)
    step = -(-M // GRAM_BLOCKS)
    for j in range(0, M, step):  # block column j: rows j.. of the lower triangle
        G[..., j:, j:j + step] = A[..., j:].mT @ A[..., j:j + step]
    return G.tril_()

def fit_power_law(evals: torch.Tensor, *, fix_fingers: str = "none",
                  round_off: float = 0.0) -> PowerLawFit:
    """Fit the ESD tail. `evals`: 1-D eigenvalues, any order. See NOTES.md §1.

    `round_off` (e.g. FLOAT32_ROUND_OFF for eigenvalues computed in float32) sets the
    `alpha_spread` the fit reports: each candidate's D is taken as uncertain by
    round_off·(α_i - 1)·λ_max/xmin_i (the measured size of float32's effect on D).
    """
    lam = torch.sort(evals.to(torch.float64)).values
    if lam.numel():
        lam = lam[lam > EVALS_THRESH * min(1.0, float(lam[-1]))]
    raw = _fit_sorted(lam, round_off)
    if fix_fingers == "none" or not raw.ok:
        return raw
    if fix_fingers != "clip_xmax":
        raise ValueError(f"fix_fingers must be 'none' or 'clip_xmax', got {fix_fingers!r}")
    return _clip_xmax(lam, raw, round_off)


def _fit_sorted(lam: torch.Tensor, round_off: float = 0.0) -> PowerLawFit:
    n = lam.numel()
    if n < 3:
        return _failed(f"only {n} eigenvalues above {EVALS_THRESH:g}; need at least 3")
    alphas, D = _candidate_fits(lam) if n >= SMALL_N else _candidate_fits_small(lam)
    if not torch.isfinite(D).any():
        return _failed("no candidate xmin gives a finite fit (eigenvalues all equal?)")
    i = int(torch.argmin(D))  # first minimum: the smallest xmin among ties
    alpha, n_tail = float(alphas[i]), n - i
    spread = _alpha_spread(lam, alphas, D, i, round_off) if round_off > 0 else 0.0
    return PowerLawFit(alpha=alpha, xmin=float(lam[i]), D=float(D[i]),
                       num_pl_spikes=int((lam >= lam[i]).sum()),
                       sigma=(alpha - 1) / math.sqrt(n_tail), raw_alpha=alpha,
                       alpha_spread=spread)


def _alpha_spread(lam: torch.Tensor, alphas: torch.Tensor, D: torch.Tensor, i: int,
                  round_off: float) -> float:
    """Largest |α_j - α_i| over candidates j that round-off could make the best:
    D_j - D_i <= dD_j + dD_i with dD_j = round_off·(α_j - 1)·λ_max/λ_j. Candidates below
    ROUND_OFF_FLOOR·round_off·λ_max (where eigenvalues are mostly round-off) are not
    considered; a best xmin there gives an infinite spread."""
    floor = ROUND_OFF_FLOOR * round_off * lam[-1]
    if lam[i] < floor:
        return math.inf
    dD = round_off * (alphas - 1).clamp_min(0) * lam[-1] / lam[:-1]
    near = torch.isfinite(D) & (lam[:-1] >= floor) & (D - D[i] <= dD + dD[i])
    return float((alphas[near] - alphas[i]).abs().max())


def _candidate_fits(lam: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """MLE α_i and KS distance D_i for every candidate xmin = lam[i], i < n-1 (lam ascending).

    A candidate with α_i <= 1 (not a normalisable power law) gets D = 1, as in WeightWatcher.
    """
    n = lam.numel()
    L = torch.log(lam)  # (n,)
    suffix = torch.flip(torch.cumsum(torch.flip(L, [0]), 0), [0])  # Σ_{j>=i} ln λ_j
    cand = torch.arange(n - 1, device=lam.device)
    n_tail = (n - cand).to(lam.dtype)  # (n-1,)
    denom = suffix[:-1] - n_tail * L[:-1]  # Σ_{j>=i} ln(λ_j/λ_i)
    alphas = torch.where(denom > 0, 1 + n_tail / denom, torch.full_like(denom, math.inf))
    D = torch.ones(n - 1, dtype=lam.dtype, device=lam.device)
    for a in range(0, n - 1, chunk):
        b = min(a + chunk, n - 1)
        i = cand[a:b, None]  # (c, 1)
        j = torch.arange(a, n, device=lam.device)[None, :]  # only j >= a can be in a tail
        diff = L[None, a:] - L[a:b, None]  # (c, n-a): ln(λ_j / xmin)
        theory = 1 - torch.exp((1 - alphas[a:b, None]) * diff)  # power-law CDF at λ_j
        emp = (j - i).to(lam.dtype) / n_tail[a:b, None]  # k / n_i, k = j - i
        dist = torch.where(j >= i, (theory - emp).abs(), torch.zeros_like(theory))
        D[a:b] = torch.where(alphas[a:b] > 1, dist.amax(dim=1), D[a:b])
    D = torch.where(torch.isfinite(alphas), D, torch.full_like(D, math.inf))
    return alphas, D


def _candidate_fits_small(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WeightWatcher's small-sample path (n < 20): unbiased MLE 1 + (n-1)/Σ ln(λ/xmin), only
    tails of at least 8 eigenvalues; if there is none, the whole ESD is the tail."""
    n = lam.numel()
    alphas = torch.zeros(n - 1, dtype=lam.dtype)
    D = torch.full((n - 1,), math.inf, dtype=lam.dtype)
    starts = [i for i in range(n - 1) if n - i >= SMALL_N_MIN_TAIL] or [0]
    for i in starts:
        tail = lam[i:]
        s = float(torch.log(tail / tail[0]).sum())
        if s <= 1e-12:
            continue
        a = 1 + (len(tail) - 1) / s
        alphas[i] = a
        if a > 1:
            k = torch.arange(len(tail), dtype=lam.dtype)
            D[i] = ((k / len(tail)) - (1 - (tail / tail[0]) ** (1 - a))).abs().max()
    return alphas, D


def _clip_xmax(lam: torch.Tensor, raw: PowerLawFit, round_off: float) -> PowerLawFit:
    """fix_fingers='clip_xmax' (WeightWatcher's): refit without the top k = 2..9 eigenvalues; keep
    the first refit whose α is lower than the raw α by more than 1.0, and stop early once a
    refit reaches α <= 2. num_fingers is the number of eigenvalues clipped."""
    for k in range(CLIP_XMAX_FIRST, CLIP_XMAX_LAST + 1):
        if lam.numel() - k < 3:
            break
        fit = _fit_sorted(lam[:-k], round_off)
        if not fit.ok:
            break
        if fit.alpha + CLIP_XMAX_MIN_GAIN < raw.alpha:
            return PowerLawFit(fit.alpha, fit.xmin, fit.D, fit.num_pl_spikes, fit.sigma,
                               num_fingers=k, raw_alpha=raw.alpha,
                               alpha_spread=fit.alpha_spread)
        if fit.alpha <= 2.0:
            break
    return raw


def _failed(reason: str) -> PowerLawFit:
    return PowerLawFit(math.nan, math.nan, math.nan, 0, failed=reason)


def spectral_norms(evals: torch.Tensor, *, full_rank: bool = False) -> SpectralNorms:
    """Norm-based metrics of an ESD (eigenvalues of WᵀW, any order); ``full_rank``: the rank is
    known to be full (`full_rank` below) whatever the eigenvalues read."""
    lam = evals.to(torch.float64).clamp_min(0)
    total, lmax = float(lam.sum()), float(lam.max())
    # numerical rank of the Gram matrix (what float64 eigenvalues can resolve)
    rank = lam.numel() if full_rank else int((lam > lmax * _rank_tol(lam.numel())).sum())
    p = lam[lam > 0] / total
    ent = float(-(p * p.log()).sum() / math.log(rank)) if rank > 1 else 0.0
    return SpectralNorms(lambda_max=lmax, log_norm=math.log10(total),
                         log_spectral_norm=math.log10(lmax), stable_rank=total / lmax,
                         entropy=ent, rank=rank)


def _rank_tol(M: int) -> float:
    """The rank threshold relative to λ_max: M·ε₆₄ (numpy's matrix_rank on the Gram)."""
    return M * torch.finfo(torch.float64).eps


def full_rank(W: torch.Tensor, lmax: float) -> bool:
    """Whether every eigenvalue of WᵀW lies above the rank threshold λ_max·M·ε₆₄, decided by a
    float64 Cholesky of G − RANK_MARGIN·threshold·I (G the float64 Gram; λ_max may come from a
    float32 spectrum). Success proves G − shift positive definite up to Cholesky's backward
    error (≲ M·ε₆₄·λ_max, the threshold's own size, hence the margin); failure says nothing
    (the caller recomputes the spectrum in float64). A third of a float64 eigvalsh's cost."""
    c = pow2_scale(W)
    G = gram(W, dtype=torch.float64, scale=c)  # lower triangle, all Cholesky reads
    shift = RANK_MARGIN * lmax * float(c.reshape(-1)[0]) ** 2 * _rank_tol(G.shape[-1])
    G.diagonal().sub_(shift)
    return int(torch.linalg.cholesky_ex(G).info) == 0


def entry_moments(W: torch.Tensor) -> tuple[float, float]:
    """(mean, population variance) of W's entries, accumulated in float64 chunk by chunk (no
    float64 copy of a 579M-entry embedding)."""
    n = W.numel()
    mean = float(W.sum(dtype=torch.float64)) / n
    sq = sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2
             for c in W.reshape(-1).split(1 << 24))
    return mean, max(sq / n - mean * mean, 0.0)


def float32_eig_err(lambda_max: float) -> float:
    """Bound on the absolute round-off of float32 eigenvalues of a Gram matrix: 64 ulps of
    λ_max (measured: at most 3.6e-6·λ_max, ~30 ulps, on 2880² gpt-oss-like experts)."""
    return F32_ERR_ULPS * torch.finfo(torch.float32).eps * lambda_max


def alpha_weighted(alpha: float, lambda_max: float) -> float:
    return alpha * math.log10(lambda_max)
