import math

import pytest
import torch

from llm_audit import spectral
from llm_audit.spectral import esd, fit_power_law, float32_eig_err, gram, spectral_norms


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


# -- Gram matrices and batched ESDs -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(50, 50), (30, 70), (3, 40, 25), (3, 22, 45)])
def test_gram_lower_triangle_is_the_gram_matrix(gen, shape):
    W = torch.randn(*shape, generator=gen)
    A = W.double() if shape[-2] >= shape[-1] else W.double().mT  # the taller orientation
    M = min(shape[-2:])
    G = gram(W)
    assert G.shape == (*shape[:-2], M, M) and G.dtype == torch.float64
    ref = torch.tril(A.mT @ A)
    assert torch.allclose(G, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert bool((torch.triu(G, 1) == 0).all())  # on CPU only the lower triangle is computed
    assert gram(W, dtype=torch.float32).dtype == torch.float32


def test_gram_of_tall_matrix_accumulates_row_chunks(gen, monkeypatch):
    monkeypatch.setattr(spectral, "GRAM_CHUNK_ROWS", 16)
    W = torch.randn(100, 12, generator=gen)  # 100 rows > 16, float32 -> float64: chunked
    ref = W.double().T @ W.double()
    assert torch.allclose(gram(W), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert torch.allclose(esd(W), esd(W.double()), rtol=1e-10)


@pytest.mark.parametrize("shape", [(4, 60, 40), (4, 40, 60)])
def test_batched_esd_equals_each_matrix_alone(gen, shape):
    W = torch.randn(*shape, generator=gen)
    lam = esd(W)
    assert lam.shape == (4, 40)
    for b in range(4):
        alone = esd(W[b])
        assert torch.allclose(lam[b], alone, rtol=0, atol=1e-12 * float(alone.max()))
        assert bool((lam[b][1:] >= lam[b][:-1]).all()) and float(lam[b].min()) >= 0
    assert esd(W, dtype=torch.float32).shape == (4, 40)


def test_float32_round_off_constants():
    eps32 = 2.0 ** -23
    assert spectral.FLOAT32_ROUND_OFF == 64 * eps32
    assert float32_eig_err(3.0) == 64 * eps32 * 3.0


# -- alpha_spread: how far float32 round-off could move alpha through the xmin choice -----------

def _heavy_spectrum(seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(150, generator=g, dtype=torch.float64)
    bulk = torch.rand(100, generator=g, dtype=torch.float64) * 2 + 0.1
    return torch.cat([bulk, 2.0 * (1 - u) ** (-1 / 1.5)])  # bulk + Pareto(α = 2.5) tail


def _spread_by_hand(lam, r):
    """(α, alpha_spread) in plain Python: candidates j with finite D, x_j >= 100·r·λ_max and
    D_j - D_i <= r(α_j-1)λ_max/x_j + r(α_i-1)λ_max/x_i; inf if the best x_i is below that."""
    lam = sorted(lam)
    n, top = len(lam), lam[-1]
    alphas, Ds = [], []
    for i in range(n - 1):
        tail = lam[i:]
        a = 1 + len(tail) / sum(math.log(t / tail[0]) for t in tail)
        D = max(abs((1 - (t / tail[0]) ** (1 - a)) - k / len(tail)) for k, t in enumerate(tail))
        alphas.append(a)
        Ds.append(D if a > 1 else 1.0)
    i = min(range(n - 1), key=lambda j: (Ds[j], j))
    floor = 100 * r * top
    if lam[i] < floor:
        return alphas[i], math.inf

    def dD(j):
        return r * max(alphas[j] - 1, 0) * top / lam[j]

    near = [j for j in range(n - 1) if lam[j] >= floor and Ds[j] - Ds[i] <= dD(j) + dD(i)]
    return alphas[i], max(abs(alphas[j] - alphas[i]) for j in near)


def test_alpha_spread_is_zero_without_round_off():
    lam = _heavy_spectrum()
    assert fit_power_law(lam).alpha_spread == 0.0
    assert fit_power_law(lam, round_off=0.0).alpha_spread == 0.0


@pytest.mark.parametrize("round_off", [spectral.FLOAT32_ROUND_OFF, 1e-4])
def test_alpha_spread_matches_its_definition(round_off):
    lam = _heavy_spectrum()
    fit = fit_power_law(lam, round_off=round_off)
    alpha, spread = _spread_by_hand(lam.tolist(), round_off)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert math.isfinite(fit.alpha_spread) and fit.alpha_spread > 0
    assert fit.alpha_spread == pytest.approx(spread, rel=1e-9)
    assert fit.alpha == fit_power_law(lam).alpha  # round_off changes the spread, not the fit


def test_alpha_spread_is_inf_when_xmin_is_below_the_round_off_floor():
    lam = _heavy_spectrum()
    fit = fit_power_law(lam)
    edge = fit.xmin / (spectral.ROUND_OFF_FLOOR * float(lam.max()))  # floor == xmin here
    assert math.isfinite(fit_power_law(lam, round_off=0.99 * edge).alpha_spread)
    assert fit_power_law(lam, round_off=1.01 * edge).alpha_spread == math.inf
    assert fit_power_law(lam, round_off=1e-2).alpha_spread == math.inf
