import math

import pytest
import torch

from llm_audit.detect import correlation_traps, js_distance, shuffle
from llm_audit.mp import tw_edge
from llm_audit.rsvd import top_singular_values
from llm_audit.spectral import esd


def test_shuffle_is_a_permutation_and_seeded(gen):
    W = torch.arange(12.0).reshape(3, 4)
    S = shuffle(W, torch.Generator().manual_seed(5))
    assert S.shape == W.shape and sorted(S.reshape(-1).tolist()) == list(range(12))
    assert torch.equal(S, shuffle(W, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_gaussian_matrix_has_no_traps(gen, rule):
    W = torch.randn(600, 300, generator=gen)
    r = correlation_traps(W, esd(W), rule=rule, generator=gen)
    assert r.num_traps == 0
    assert r.max_rand_eval < r.threshold


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_planted_large_entries_are_found_and_counted(gen, rule):
    # three huge entries survive shuffling: each is a rank-1 spike of size ~w² in WᵀW
    W = torch.randn(600, 300, generator=gen) * 0.05
    W[3, 7], W[100, 200], W[500, 42] = 30.0, 25.0, 20.0
    r = correlation_traps(W, esd(W), rule=rule, generator=gen)
    assert r.num_traps == 3
    assert sorted(r.trap_evals, reverse=True)[0] == pytest.approx(900.0, rel=0.05)


def test_structured_low_rank_signal_is_not_a_trap(gen):
    # a rank-1 correlation (not a large entry) is destroyed by shuffling
    u, v = torch.randn(600, 1, generator=gen), torch.randn(1, 300, generator=gen)
    W = torch.randn(600, 300, generator=gen) * 0.1 + 0.05 * (u @ v)
    assert float(esd(W).max()) > 2 * float(esd(torch.randn(600, 300) * 0.1).max())
    r = correlation_traps(W, esd(W), rule="tw", generator=gen)
    assert r.num_traps == 0


def test_tw_edge_matches_gaussian_largest_eigenvalue(gen):
    N, M = 800, 400
    tops = [float(esd(torch.randn(N, M, generator=gen, dtype=torch.float64)).max())
            for _ in range(5)]
    edge, thr = tw_edge(1.0, N, M)
    assert all(edge * 0.97 < t < thr for t in tops)


def test_rsvd_top_k_matches_exact_on_spiked_matrix(gen):
    W = torch.randn(1000, 500, generator=gen, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(1000, 3, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(500, 3, generator=gen, dtype=torch.float64))
    W += U @ torch.diag(torch.tensor([400.0, 300.0, 200.0], dtype=torch.float64)) @ V.T
    exact = torch.linalg.svdvals(W)[:5]
    approx = top_singular_values(W, 5, generator=gen)
    assert torch.allclose(approx[:3], exact[:3], rtol=1e-10)
    assert torch.allclose(approx, exact, rtol=2e-2)  # bulk values below the spikes


def test_rsvd_on_pure_mp_matrix_top_value(gen):
    W = torch.randn(2000, 400, generator=gen, dtype=torch.float64)
    exact = float(torch.linalg.svdvals(W)[0])
    approx = float(top_singular_values(W, 8, generator=gen)[0])
    assert approx == pytest.approx(exact, rel=5e-3)  # the bulk edge is not gapped: slowest case


def test_js_distance_identical_is_zero_and_bounded():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert js_distance(a, a) == 0.0
    assert 0 < js_distance(a, torch.tensor([0.0, 0.0, 6.0])) <= math.sqrt(math.log(2)) + 1e-12


def test_tw_rule_randomized_path_counts_planted_entries(gen):
    # M >= RSVD_MIN_M: the top of the shuffled spectrum comes from the randomized SVD
    W = torch.randn(1200, 1024, generator=gen) * 0.05
    W[3, 7], W[100, 200], W[500, 42] = 30.0, 25.0, 20.0
    r = correlation_traps(W, esd(W), rule="tw", generator=gen)
    assert r.num_traps == 3
    assert r.trap_evals[0] == pytest.approx(900.0, rel=0.05)
