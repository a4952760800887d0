import math

import pytest
import torch

from llm_audit.spectral import esd, fit_power_law, spectral_norms


def test_esd_matches_squared_singular_values(gen):
    W = torch.randn(300, 120, generator=gen, dtype=torch.float64)
    expected = torch.sort(torch.linalg.svdvals(W) ** 2).values
    assert torch.allclose(esd(W), expected, rtol=1e-10)
    assert torch.allclose(esd(W.T), expected, rtol=1e-10)  # orientation does not matter


def test_mp_edge_of_gaussian_matrix(gen):
    N, M, s = 2000, 500, 0.5
    W = s * torch.randn(N, M, generator=gen, dtype=torch.float64)
    lam = esd(W)
    edge_hi = s**2 * (math.sqrt(N) + math.sqrt(M)) ** 2
    edge_lo = s**2 * (math.sqrt(N) - math.sqrt(M)) ** 2
    assert abs(float(lam.max()) / edge_hi - 1) < 0.02
    assert abs(float(lam.min()) / edge_lo - 1) < 0.05


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 5.0])
def test_alpha_of_synthetic_power_law(gen, alpha):
    u = torch.rand(4000, generator=gen, dtype=torch.float64)
    x = 3.0 * (1 - u) ** (-1 / (alpha - 1))  # Pareto with xmin 3
    fit = fit_power_law(x)
    assert fit.ok
    assert abs(fit.alpha - alpha) < 4 * fit.sigma + 0.02
    assert fit.xmin >= 3.0


def _by_hand(lam, small):
    """Reference fit in plain Python loops (NOTES.md §1; WeightWatcher's small-N variant)."""
    lam = sorted(lam)
    best = None
    starts = range(len(lam) - 1)
    if small:
        starts = [i for i in starts if len(lam) - i >= 8] or [0]
    for i in starts:
        tail = lam[i:]
        n = len(tail)
        s = sum(math.log(t / tail[0]) for t in tail)
        a = 1 + (n - 1 if small else n) / s
        D = max(abs((1 - (t / tail[0]) ** (1 - a)) - k / n) for k, t in enumerate(tail))
        if best is None or D < best[1]:
            best = (a, D, tail[0], n)
    return best


@pytest.mark.parametrize("n", [12, 40])
def test_power_law_fit_formula_by_hand(gen, n):
    lam = torch.rand(n, generator=gen, dtype=torch.float64).exp() ** 3
    fit = fit_power_law(lam)
    a, D, xmin, n_tail = _by_hand(lam.tolist(), small=n < 20)
    assert fit.alpha == pytest.approx(a, rel=1e-12)
    assert fit.D == pytest.approx(D, rel=1e-12)
    assert (fit.xmin, fit.num_pl_spikes) == (xmin, n_tail)


def test_failed_fit_reports_reason_not_minus_one():
    fit = fit_power_law(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert not fit.ok and math.isnan(fit.alpha)
    assert fit.failed == "no candidate xmin gives a finite fit (eigenvalues all equal?)"
    fit = fit_power_law(torch.tensor([1e-9, 2.0], dtype=torch.float64))  # 1e-9 is ignored
    assert fit.failed == "only 1 eigenvalues above 1e-05; need at least 3"


def test_clip_xmax_keeps_clean_fit(gen):
    u = torch.rand(400, generator=gen, dtype=torch.float64)
    x = (1 - u) ** (-1 / (3.0 - 1))
    fixed = fit_power_law(x, fix_fingers="clip_xmax")
    assert fixed.num_fingers == 0 and fixed.alpha == fixed.raw_alpha


def test_norms_known_values():
    lam = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    n = spectral_norms(lam)
    assert n.lambda_max == 2.0 and n.stable_rank == 2.0
    assert n.log_norm == pytest.approx(math.log10(4.0))
    p = torch.tensor([0.25, 0.25, 0.5])
    assert n.entropy == pytest.approx(float(-(p * p.log()).sum()) / math.log(3))
