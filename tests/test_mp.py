"""mp.nelder_mead_1d is scipy.optimize.fmin for one variable, step for step."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from llm_audit import mp
from llm_audit.mp import nelder_mead_1d


def _fmin(f, x0):
    return float(scipy.optimize.fmin(lambda v: f(float(np.atleast_1d(v)[0])), x0, disp=0)[0])


FUNCTIONS = {
    "quadratic": (lambda x: (x - 3.7) ** 2, 1.0),
    "zero start": (lambda x: (x + 0.2) ** 2 + 1, 0.0),
    "flat then steep": (lambda x: max(0.0, abs(x) - 1) ** 3, 5.0),
    "runs off (hits the 200-evaluation cap)": (lambda x: -x, 1.0),
    "noisy": (lambda x: math.sin(37 * x) * 0.01 + (x - 0.5) ** 2, 2.0),
    "negative start": (lambda x: abs(x + 4.0), -1.0),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_equals_scipy_fmin(name):
    f, x0 = FUNCTIONS[name]
    assert nelder_mead_1d(f, x0) == _fmin(f, x0)


@pytest.mark.parametrize("seed", range(6))
def test_mp_fit_sigma_equals_the_scipy_route(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(300 + 50 * seed, 120, generator=g, dtype=torch.float64)
    W[0, 0] = 8.0 * (seed % 3)  # some with a spike
    lam0 = torch.linalg.eigvalsh(W.T @ W).numpy()
    N, M = W.shape
    Q = N / M
    lam = lam0 * len(lam0) / lam0.sum()
    sigma0 = math.sqrt(float(lam.max())) / (1 + 1 / math.sqrt(Q))
    x = np.linspace(0.0, float(lam.max()) + 0.5, mp.KDE_POINTS)
    y = mp._linear_kde(lam, x, mp.KDE_BANDWIDTH)
    keep = y > mp.KDE_FLOOR
    x, y = x[keep], y[keep]
    for s0 in (sigma0, 0.7 * sigma0, 1.3 * sigma0):
        def loss(s):
            return float(mp._mp_losses(np.array([s]), Q, x, y)[0])
        assert nelder_mead_1d(loss, s0) == _fmin(loss, s0)
