import math

import pytest
import torch

from llm_audit import detect
from llm_audit.detect import correlation_traps, js_distance, shuffle, stack_traps
from llm_audit.mp import tw_edge
from llm_audit.rsvd import top_singular_values
from llm_audit.spectral import entry_moments, esd


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


# -- stacks: one shuffle permutation for every matrix, per-matrix sketches ----------------------

def test_shuffle_of_a_stack_applies_one_permutation_to_every_matrix():
    W = torch.arange(20.0).reshape(1, 4, 5) + 100.0 * torch.arange(3.0).reshape(3, 1, 1)
    S = shuffle(W, torch.Generator().manual_seed(5))
    assert S.shape == (3, 4, 5) and S.dtype == W.dtype
    assert sorted(S[0].reshape(-1).tolist()) == list(range(20))  # values kept
    assert not torch.equal(S[0], W[0])  # and moved
    for b in (1, 2):
        assert torch.equal(S[b] - 100.0 * b, S[0])  # the same permutation for each matrix
    assert torch.equal(S, shuffle(W, torch.Generator().manual_seed(5)))  # seeded
    # a matrix shuffled alone with the same generator gets the permutation it gets in a stack
    assert torch.equal(shuffle(W[2], torch.Generator().manual_seed(5)), S[2])
    assert not torch.equal(S, shuffle(W, torch.Generator().manual_seed(6)))


def _planted_stack(gen, B, rows, cols, entries):
    """B Gaussian matrices (scale 0.05) with entries[b] huge planted entries in matrix b."""
    W = torch.randn(B, rows, cols, generator=gen) * 0.05
    for b, n in enumerate(entries):
        for k in range(n):
            W[b, (37 * k + 11 * b) % rows, (53 * k + 5) % cols] = 20.0 + k
    return W


def _same_traps(a, b, rel=1e-12):
    assert a.num_traps == b.num_traps and len(a.trap_evals) == len(b.trap_evals)
    for x, y in [(a.max_rand_eval, b.max_rand_eval), (a.threshold, b.threshold),
                 (a.bulk_max, b.bulk_max), *zip(a.trap_evals, b.trap_evals, strict=True)]:
        assert x == pytest.approx(y, rel=rel)
    for x, y in [(a.sigma_mp, b.sigma_mp), (a.distance, b.distance)]:
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9)


@pytest.mark.parametrize("rule", ["ww", "tw"])
@pytest.mark.parametrize("cols", [60, 150])  # ww pools 5 shuffles below M = 100
def test_stack_traps_equal_each_matrix_alone(gen, rule, cols):
    W = _planted_stack(gen, 3, 200, cols, entries=(0, 2, 3))
    evals = esd(W)
    stack = stack_traps(W, evals, rule=rule, generator=torch.Generator().manual_seed(3),
                        generators=[torch.Generator().manual_seed(b) for b in range(3)],
                        moments=[entry_moments(W[b]) for b in range(3)])
    reps = detect.WW_SMALL_REPS if rule == "ww" and cols < detect.WW_SMALL_M else 1
    assert [t.num_traps for t in stack] == [0, 2 * reps, 3 * reps]  # pooled shuffles count each
    for b in range(3):
        alone = correlation_traps(W[b], evals[b], rule=rule,
                                  generator=torch.Generator().manual_seed(3))
        _same_traps(stack[b], alone)


def test_stack_traps_rejects_unknown_rule(gen):
    W = torch.randn(1, 20, 10, generator=gen)
    with pytest.raises(ValueError) as e:
        stack_traps(W, esd(W), rule="xx", generator=gen, generators=[gen], moments=[(0.0, 1.0)])
    assert str(e.value) == "unknown trap rule 'xx'"


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_float32_trap_counts_equal_float64(gen, rule):
    W = _planted_stack(gen, 1, 600, 300, entries=(3,))[0]
    r64 = correlation_traps(W, esd(W), rule=rule, generator=torch.Generator().manual_seed(1))
    r32 = correlation_traps(W, esd(W), rule=rule, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float32)
    assert r32.num_traps == r64.num_traps == 3
    assert list(r32.trap_evals) == pytest.approx(list(r64.trap_evals), rel=1e-5)


def test_tw_batched_sketch_per_matrix_generators_and_more_than_top_k_traps(gen, monkeypatch):
    # the randomized path on small matrices: one batched sketch, Ω of matrix b from generators[b]
    monkeypatch.setattr(detect, "RSVD_MIN_M", 256)
    n_traps = (3, detect.TW_TOP_K + 4, 0)  # the second needs a second, wider sketch
    W = _planted_stack(gen, 3, 500, 400, entries=n_traps)
    evals = esd(W)

    def run(idx):
        return stack_traps(W[idx], evals[idx], rule="tw",
                           generator=torch.Generator().manual_seed(3),
                           generators=[torch.Generator().manual_seed(100 + b) for b in idx],
                           moments=[entry_moments(W[b]) for b in idx])

    stack = run([0, 1, 2])
    assert [t.num_traps for t in stack] == list(n_traps)
    assert stack[1].trap_evals[0] == pytest.approx((20.0 + n_traps[1] - 1) ** 2, rel=0.05)
    assert stack[2].max_rand_eval < stack[2].threshold  # the bulk edge: depends on Ω
    for b in range(3):
        _same_traps(stack[b], run([b])[0], rel=1e-9)
