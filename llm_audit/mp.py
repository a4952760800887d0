"""Marchenko–Pastur fits of an ESD (stage 3, pure functions).

`mp_fit` reproduces WeightWatcher 0.7.7's fit: eigenvalues rescaled to mean 1, σ chosen by a grid
search refined with Nelder–Mead, minimising the squared error between the MP density and a
linear-kernel KDE (bandwidth 0.1) of the eigenvalues; spikes are eigenvalues above
bulk_max + sqrt(s_TW). `tw_edge` is the better-founded alternative used for traps: the exact MP
edge of an i.i.d. matrix with known entry variance plus a Tracy–Widom quantile.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

KDE_BANDWIDTH = 0.1
KDE_POINTS = 1000
KDE_FLOOR = 0.01
SIGMA_GRID = (0.05, 2.0, 0.01)  # × the initial guess σ0
TW1_QUANTILES = {0.90: 0.450, 0.95: 0.979, 0.99: 2.023, 0.999: 3.272}


@dataclass(frozen=True)
class MPFit:
    num_spikes: int  # eigenvalues above the threshold
    sigma_mp: float  # fitted σ, in units where the eigenvalues have mean 1
    bulk_max: float  # MP edge in the ESD's own (unrescaled) units
    bulk_min: float
    threshold: float  # spike threshold in the ESD's own units
    max_eval: float
    scale: float  # the factor (W_scale²) that rescales the ESD to mean 1


def mp_fit(evals: torch.Tensor, N: int, M: int) -> MPFit:
    """Fit an MP bulk to eigenvalues of WᵀW (any order, possibly pooled from several shuffles)."""
    lam0 = evals.detach().to("cpu", torch.float64).numpy()
    Q = N / M
    scale = len(lam0) / float(lam0.sum())  # W_scale²: rescaled eigenvalues have mean 1
    lam = lam0 * scale
    sigma0 = math.sqrt(float(lam.max())) / (1 + 1 / math.sqrt(Q))
    data = np.sqrt(lam) if Q == 1 else lam  # Q = 1: fit the quarter circle of singular values
    x = np.linspace(0.0, float(data.max()) + 0.5, KDE_POINTS)
    y = _linear_kde(data, x, KDE_BANDWIDTH)
    keep = y > KDE_FLOOR
    x, y = x[keep], y[keep]
    lo, hi, step = SIGMA_GRID
    grid = np.arange(lo * sigma0, hi * sigma0, step * sigma0)
    losses = _mp_losses(grid, Q, x, y)
    s_grid = grid[int(np.argmin(losses))]
    sigma = nelder_mead_1d(lambda s: float(_mp_losses(np.array([s]), Q, x, y)[0]), s_grid)
    bulk_max = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    bulk_min = (sigma * (1 - 1 / math.sqrt(Q))) ** 2
    tw = Q ** -0.5 * bulk_max ** (2 / 3) * M ** (-2 / 3)
    threshold = bulk_max + math.sqrt(tw)  # WW's rule: √ of the TW scale
    return MPFit(num_spikes=int((lam > threshold).sum()), sigma_mp=sigma,
                 bulk_max=bulk_max / scale, bulk_min=bulk_min / scale,
                 threshold=threshold / scale, max_eval=float(lam0.max()), scale=scale)


class _MaxEvals(Exception):
    pass


def nelder_mead_1d(f, x0: float, xatol: float = 1e-4, fatol: float = 1e-4,
                   maxfun: int = 200) -> float:
    """``scipy.optimize.fmin(f, x0)[0]`` for one variable, step for step (its coefficients
    ρ=1, χ=2, ψ=σ=½, initial simplex x0·1.05, tolerances, and its 200-evaluation cap with
    the same half-finished last step), so the MP fit keeps WeightWatcher's σ to the last
    digit (tests/test_mp.py compares them). Written out because importing scipy.optimize
    cost 0.5-0.8 s of every start-up, for this one call."""
    calls = [0]

    def fun(v: float) -> float:
        if calls[0] >= maxfun:
            raise _MaxEvals
        calls[0] += 1
        return float(f(v))

    x0 = float(x0)
    sim = [x0, 1.05 * x0 if x0 != 0 else 0.00025]
    fsim = [math.inf, math.inf]
    with contextlib.suppress(_MaxEvals):
        for k in range(2):
            fsim[k] = fun(sim[k])
    sim, fsim = _sorted2(sim, fsim)
    iterations = 1
    while calls[0] < maxfun and iterations < maxfun:
        try:
            if abs(sim[1] - sim[0]) <= xatol and abs(fsim[0] - fsim[1]) <= fatol:
                break
            xbar = sim[0]
            xr = 2 * xbar - sim[1]
            fxr = fun(xr)
            if fxr < fsim[0]:
                xe = 3 * xbar - 2 * sim[1]
                fxe = fun(xe)
                sim[1], fsim[1] = (xe, fxe) if fxe < fxr else (xr, fxr)
            else:  # with one variable fsim[-2] is fsim[0]: never a plain reflection here
                shrink = False
                if fxr < fsim[1]:
                    xc = 1.5 * xbar - 0.5 * sim[1]
                    fxc = fun(xc)
                    if fxc <= fxr:
                        sim[1], fsim[1] = xc, fxc
                    else:
                        shrink = True
                else:
                    xcc = 0.5 * xbar + 0.5 * sim[1]
                    fxcc = fun(xcc)
                    if fxcc < fsim[1]:
                        sim[1], fsim[1] = xcc, fxcc
                    else:
                        shrink = True
                if shrink:
                    sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
                    fsim[1] = fun(sim[1])
            iterations += 1
        except _MaxEvals:
            pass
        sim, fsim = _sorted2(sim, fsim)
    return sim[0]


def _sorted2(sim: list[float], fsim: list[float]) -> tuple[list[float], list[float]]:
    """np.argsort order of two values (ties keep their order)."""
    return (sim[::-1], fsim[::-1]) if fsim[1] < fsim[0] else (sim, fsim)


def _linear_kde(data: np.ndarray, x: np.ndarray, h: float) -> np.ndarray:
    """(1/n) Σ_i (1/h) max(0, 1 - |x - x_i|/h) on the grid x, via prefix sums: O((n + |x|) log n).

    Within the window (x-h, x+h): Σ (1 - |x - x_i|/h) = count - Σ|x - x_i| / h.
    """
    d = np.sort(data)
    csum = np.concatenate([[0.0], np.cumsum(d)])
    lo = np.searchsorted(d, x - h, side="right")
    mid = np.searchsorted(d, x, side="right")
    hi = np.searchsorted(d, x + h, side="left")
    n_left, s_left = mid - lo, csum[mid] - csum[lo]  # x_i in (x-h, x]
    n_right, s_right = hi - mid, csum[hi] - csum[mid]  # x_i in (x, x+h)
    total = (n_left - (n_left * x - s_left) / h) + (n_right - (s_right - n_right * x) / h)
    return total / (len(d) * h)


def _mp_losses(sigmas: np.ndarray, Q: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared error between the MP density with each σ and the KDE (x, y); vectorised in σ."""
    s = sigmas[:, None]  # (S, 1)
    with np.errstate(all="ignore"):
        if Q == 1:  # quarter circle of singular values
            dens = np.nan_to_num(1 / (np.pi * s**2) * np.sqrt(4 - x[None, :] ** 2))
            return ((dens - y[None, :]) ** 2).sum(axis=1)
        a = (s * (1 - math.sqrt(1 / Q))) ** 2
        b = (s * (1 + math.sqrt(1 / Q))) ** 2
        dens = np.nan_to_num(Q / (2 * np.pi * s**2 * x[None, :])
                             * np.sqrt((b - x[None, :]) * (x[None, :] - a)))
        loss = ((dens - y[None, :]) ** 2).sum(axis=1)
    xpeak = x[int(np.argmax(y))]
    bad = (b[:, 0] < xpeak) | (b[:, 0] > x.max()) | (a[:, 0] > xpeak)
    return np.where(bad, 1e6 * len(y), loss)


def tw_edge(var: float, N: int, M: int, quantile: float = 0.999) -> tuple[float, float]:
    """(MP edge, spike threshold) for eigenvalues of XᵀX, X (N, M) i.i.d. with variance `var`.

    Johnstone's centring and scaling of the largest eigenvalue (real case):
    μ = (√(N-1) + √M)², s = (√(N-1) + √M)(1/√(N-1) + 1/√M)^(1/3); threshold = var·(μ + q·s)
    with q the TW₁ quantile.
    """
    a, b = math.sqrt(N - 1), math.sqrt(M)
    mu = (a + b) ** 2
    s = (a + b) * (1 / a + 1 / b) ** (1 / 3)
    return var * mu, var * (mu + TW1_QUANTILES[quantile] * s)
