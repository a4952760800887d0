"""Stage 3: spectra of weight matrices and the HTSR metrics on them. Pure functions on tensors.

Conventions (WeightWatcher 0.7.x, whose column names users know): W has shape (rows, cols),
N = max, M = min, Q = N/M; the ESD is the M eigenvalues λ = s(W)² of WᵀW with no 1/N factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EVALS_THRESH = 1e-5  # eigenvalues at or below this are ignored by the power-law fit
GRAM_CHUNK_ROWS = 16384  # rows per chunk when accumulating WᵀW of a tall matrix
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


def esd(W: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Ascending eigenvalues λ = s(W)² of WᵀW, M = min(W.shape) of them.

    Computed as eigvalsh of the (M, M) Gram matrix in `dtype` (float64 by default): 3-4x cheaper
    than an SVD; clamped at 0 since round-off can make the smallest ones slightly negative. Tall
    matrices are converted chunk by chunk, so a 201088 x 2880 embedding never exists in float64.
    """
    A = W if W.shape[0] >= W.shape[1] else W.T  # (N, M), N >= M
    if A.dtype == dtype or A.shape[0] <= GRAM_CHUNK_ROWS:
        A = A.to(dtype)
        G = A.T @ A  # (M, M)
    else:  # tall (embeddings, lm_head): accumulate in row chunks, no full copy in `dtype`
        G = torch.zeros(A.shape[1], A.shape[1], dtype=dtype, device=A.device)
        for rows in A.split(GRAM_CHUNK_ROWS):
            c = rows.to(dtype)
            G.addmm_(c.T, c)
    return torch.linalg.eigvalsh(G).clamp_min_(0.0)


def fit_power_law(evals: torch.Tensor, *, fix_fingers: str = "none") -> PowerLawFit:
    """Fit the ESD tail. `evals`: 1-D eigenvalues, any order. See NOTES.md §1."""
    lam = torch.sort(evals.to(torch.float64)).values
    lam = lam[lam > EVALS_THRESH]
    raw = _fit_sorted(lam)
    if fix_fingers == "none" or not raw.ok:
        return raw
    if fix_fingers != "clip_xmax":
        raise ValueError(f"fix_fingers must be 'none' or 'clip_xmax', got {fix_fingers!r}")
    return _clip_xmax(lam, raw)


def _fit_sorted(lam: torch.Tensor) -> PowerLawFit:
    n = lam.numel()
    if n < 3:
        return _failed(f"only {n} eigenvalues above {EVALS_THRESH:g}; need at least 3")
    alphas, D = _candidate_fits(lam) if n >= SMALL_N else _candidate_fits_small(lam)
    if not torch.isfinite(D).any():
        return _failed("no candidate xmin gives a finite fit (eigenvalues all equal?)")
    i = int(torch.argmin(D))  # first minimum: the smallest xmin among ties
    alpha, n_tail = float(alphas[i]), n - i
    return PowerLawFit(alpha=alpha, xmin=float(lam[i]), D=float(D[i]),
                       num_pl_spikes=int((lam >= lam[i]).sum()),
                       sigma=(alpha - 1) / math.sqrt(n_tail), raw_alpha=alpha)


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
    j = torch.arange(n, device=lam.device)
    for a in range(0, n - 1, chunk):
        b = min(a + chunk, n - 1)
        i = cand[a:b, None]  # (c, 1)
        diff = L[None, :] - L[a:b, None]  # (c, n): ln(λ_j / xmin)
        theory = 1 - torch.exp((1 - alphas[a:b, None]) * diff)  # power-law CDF at λ_j
        emp = (j[None, :] - i).to(lam.dtype) / n_tail[a:b, None]  # k / n_i, k = j - i
        dist = torch.where(j[None, :] >= i, (theory - emp).abs(), torch.zeros_like(theory))
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


def _clip_xmax(lam: torch.Tensor, raw: PowerLawFit) -> PowerLawFit:
    """fix_fingers='clip_xmax' (WeightWatcher's): refit without the top k = 2..9 eigenvalues; keep
    the first refit whose α is lower than the raw α by more than 1.0, and stop early once a
    refit reaches α <= 2. num_fingers is the number of eigenvalues clipped."""
    for k in range(CLIP_XMAX_FIRST, CLIP_XMAX_LAST + 1):
        if lam.numel() - k < 3:
            break
        fit = _fit_sorted(lam[:-k])
        if not fit.ok:
            break
        if fit.alpha + CLIP_XMAX_MIN_GAIN < raw.alpha:
            return PowerLawFit(fit.alpha, fit.xmin, fit.D, fit.num_pl_spikes, fit.sigma,
                               num_fingers=k, raw_alpha=raw.alpha)
        if fit.alpha <= 2.0:
            break
    return raw


def _failed(reason: str) -> PowerLawFit:
    return PowerLawFit(math.nan, math.nan, math.nan, 0, failed=reason)


def spectral_norms(evals: torch.Tensor) -> SpectralNorms:
    """Norm-based metrics of an ESD (eigenvalues of WᵀW, any order)."""
    lam = evals.to(torch.float64).clamp_min(0)
    total, lmax = float(lam.sum()), float(lam.max())
    # numerical rank of the Gram matrix (what its eigenvalues can resolve), as numpy.matrix_rank
    rank = int((lam > lmax * lam.numel() * torch.finfo(torch.float64).eps).sum())
    p = lam[lam > 0] / total
    ent = float(-(p * p.log()).sum() / math.log(rank)) if rank > 1 else 0.0
    return SpectralNorms(lambda_max=lmax, log_norm=math.log10(total),
                         log_spectral_norm=math.log10(lmax), stable_rank=total / lmax,
                         entropy=ent, rank=rank)


def entry_moments(W: torch.Tensor) -> tuple[float, float]:
    """(mean, population variance) of W's entries, accumulated in float64 chunk by chunk (no
    float64 copy of a 579M-entry embedding)."""
    n = W.numel()
    mean = float(W.sum(dtype=torch.float64)) / n
    sq = sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2
             for c in W.reshape(-1).split(1 << 24))
    return mean, max(sq / n - mean * mean, 0.0)


def alpha_weighted(alpha: float, lambda_max: float) -> float:
    return alpha * math.log10(lambda_max)
