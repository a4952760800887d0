"""Trap anatomy (llm_audit.anatomy): known answers for each class, and the report columns."""

import math

import pytest
import torch

from llm_audit import AuditOptions, monitor_weights
from llm_audit.anatomy import CLIP_K, clip_level
from llm_audit.records import TRAP_COLUMNS, trap_table_rows

PLANTED = {(3, 5): 50.0, (10, 700): 55.0, (150, 20): 60.0, (199, 300): 65.0, (50, 50): 70.0}


def _row(W: torch.Tensor, rule: str, seed: int = 0):
    opts = AuditOptions(trap_rule=rule, device="cpu", seed=seed)
    return monitor_weights({"w.weight": W}, options=opts).layers[0]


def _bbp(theta2: float, rows: int, cols: int) -> float:
    """Where a rank-1 spike θ²·(unit u vᵀ) lands in the Gram spectrum of unit-variance noise."""
    return (theta2 + rows) * (theta2 + cols) / theta2


def _classes(r) -> tuple[int, int, int]:
    return r.traps_mean, r.traps_entries, r.traps_tail


@pytest.fixture
def gauss(gen):
    return torch.randn(200, 784, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_gaussian_has_no_traps(gauss, rule):
    r = _row(gauss, rule)
    assert r.rand_num_spikes == 0 and _classes(r) == (0, 0, 0) and r.traps == ()
    assert (r.trap_entries, r.trap_rows, r.trap_cols) == (0, 0, 0)


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_low_rank_signal_of_bulk_sized_entries_is_no_trap(gauss, gen, rule):
    u = torch.randn(200, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 784, generator=gen, dtype=torch.float64)
    W = gauss + 0.5 * u @ v  # entries O(σ); a strong spike of W itself, destroyed by shuffling
    assert float(torch.linalg.svdvals(W)[0]) > 2 * float(torch.linalg.svdvals(gauss)[0])
    r = _row(W, rule)
    assert r.rand_num_spikes == 0 and _classes(r) == (0, 0, 0)


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_planted_entries_are_entries_traps_naming_them(gauss, rule):
    W = gauss.clone()
    for (i, j), value in PLANTED.items():
        W[i, j] = value
    r = _row(W, rule)
    assert r.rand_num_spikes == 5 and _classes(r) == (0, 5, 0)
    assert set(r.outliers) == set(PLANTED) and r.trap_entries == 5
    assert (r.trap_rows, r.trap_cols) == (5, 5)
    # distinct sizes: each trap is carried by its own entry, the largest trap by the largest
    firsts = [t.entries[0] for t in r.traps]
    assert firsts == sorted(PLANTED, key=PLANTED.get, reverse=True)
    assert [t.trap for t in r.traps] == [1, 2, 3, 4, 5]
    assert all(t.half_mass_entries == 1 for t in r.traps)
    assert r.traps[0].eigenvalue == pytest.approx(_bbp(70.0 ** 2, 200, 784), rel=0.03)


def test_mean_shift_is_one_mean_trap_under_ww_and_none_under_tw(gauss):
    W = gauss + 0.1
    r = _row(W, "ww")
    assert r.rand_num_spikes == 1 and _classes(r) == (1, 0, 0)
    assert r.traps[0].cls == "mean" and r.traps[0].half_mass_entries > 1000  # spread out
    assert len(r.traps[0].entries) == CLIP_K
    assert r.traps[0].eigenvalue == pytest.approx(_bbp(r.mean_spike, 200, 784), rel=0.03)
    assert _row(W, "tw").rand_num_spikes == 0  # tw removes the mean itself


def test_mean_and_outliers_together(gauss):
    W = gauss + 0.1
    W[7, 9] = 60.0
    r = _row(W, "ww")
    assert _classes(r) == (1, 1, 0) and r.outliers == ((7, 9),)
    assert [t.cls for t in r.traps] == ["entries", "mean"]  # 60² > mean spike ≈ 0.01·N·M


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_student_t_entries_make_tail_traps(gen, rule):
    t = torch.distributions.StudentT(2.5)
    torch.manual_seed(0)  # torch.distributions has no generator argument
    W = t.sample((200, 784)).double()
    r = _row(W, rule)
    assert r.rand_num_spikes >= 3
    assert _classes(r) == (0, 0, r.rand_num_spikes)
    assert r.trap_entries == 0  # no `entries` trap, no outliers listed


def test_small_matrix_pools_five_shuffles_under_ww(gen):
    W = torch.randn(200, 40, generator=gen, dtype=torch.float64)  # M < 100: 5 shuffles pooled
    W[4, 4] = 40.0
    r = _row(W, "ww")
    assert r.rand_num_spikes == 5  # the outlier makes one trap in each of the 5 shuffles
    assert _classes(r) == (0, 5, 0) and r.outliers == ((4, 4),)
    assert all(t.entries[0] == (4, 4) for t in r.traps)


def test_counts_and_table_rows(gauss):
    W = gauss.clone()
    W[1, 2], W[3, 4] = 60.0, 80.0
    r = _row(W, "tw")
    rows = trap_table_rows(r, "tw")
    assert [list(x) for x in rows] == [list(TRAP_COLUMNS)] * 2
    assert rows[0]["entries"].split()[0] == "3:4" and rows[1]["entries"].split()[0] == "1:2"
    assert len(rows[0]["entries"].split()) == 1  # the half-mass entries: one outlier each
    assert {x["class"] for x in rows} == {"entries"} and {x["rule"] for x in rows} == {"tw"}


def test_clip_level_is_the_gaussian_maximum(gen):
    W = torch.randn(1000, 1000, generator=gen, dtype=torch.float64) * 3
    W[0, :50] = 1e6  # outliers do not move the robust scale
    assert clip_level(W, gen) == pytest.approx(3 * math.sqrt(2 * math.log(1e6)), rel=0.01)
    assert float(W.abs().reshape(-1)[50:].max()) < clip_level(W, gen) * 1.1


def test_centring_that_adds_a_trap_does_not_break_the_anatomy(gauss):
    """A rank-1 change moves a count by at most one, either way: when subtracting the mean
    makes one more eigenvalue cross the threshold, the rule's own count is still classed
    (this crashed a training run with an IndexError)."""
    from llm_audit.anatomy import trap_anatomy

    calls = []

    def count(S):  # the rule sees 1 trap; the centred matrix would have 2
        calls.append(S)
        return 1 if len(calls) == 1 else 2

    perm = torch.randperm(gauss.numel(), generator=torch.Generator().manual_seed(0))
    # threshold 0: Weyl's shortcut cannot settle the centred count, so the fake counter is asked
    an = trap_anatomy(gauss, [perm], count=count, threshold=0.0, mean=0.0, remove_mean=False,
                      generator=torch.Generator().manual_seed(1))
    assert len(an.traps) == 1 and an.traps[0].cls == "tail"


def test_weyl_shortcut_skips_the_centred_count_and_changes_nothing(gauss, monkeypatch):
    """Under `ww` the centred matrix's count is skipped when no singular value lies within
    |mean|·√(N·M) of √τ (Weyl); the anatomy is then identical to always counting it."""
    from llm_audit import anatomy

    W = gauss + 0.002
    W[7, 9], W[100, 400] = 60.0, -58.0
    real, asked = anatomy._centred_count, []

    def spy(S0, s, n_all, count, mean, threshold):
        def counting(S):
            asked.append(1)
            return count(S)
        return real(S0, s, n_all, counting, mean, threshold)

    monkeypatch.setattr(anatomy, "_centred_count", spy)
    fast = _row(W, "ww")
    assert fast.rand_num_spikes == 2 and asked == []  # settled by Weyl every time
    monkeypatch.setattr(anatomy, "_centred_count",
                        lambda S0, s, n_all, count, mean, threshold: count(S0))
    slow = _row(W, "ww")
    assert fast.traps == slow.traps and _classes(fast) == _classes(slow) == (0, 2, 0)


SKETCH_PLANTED = {(3, 5): 150.0, (700, 10): 160.0, (20, 1000): 170.0}


def _planted_at_sketch_size(gen, mean: float = 0.0) -> torch.Tensor:
    """Gaussian (RSVD_MIN_M + 76, RSVD_MIN_M) + mean, with SKETCH_PLANTED's entries: at the
    size where the trap counts are sketched, not solved exactly."""
    from llm_audit.detect import RSVD_MIN_M
    W = torch.randn(RSVD_MIN_M + 76, RSVD_MIN_M, generator=gen, dtype=torch.float64) + mean
    for (i, j), value in SKETCH_PLANTED.items():
        W[i, j] = value
    return W


def test_tw_anatomy_at_sketch_size_reuses_the_counts_vectors(gen, monkeypatch):
    """M >= RSVD_MIN_M: the tw count's Krylov sketch also gives the anatomy's singular vectors
    (no second sketch: the anatomy's own is never called), so the largest trap's eigenvalue is
    the rule's max_rand_eval; the planted entries are still found and named."""
    from llm_audit import anatomy

    def no_sketch(*args, **kwargs):
        raise AssertionError("the anatomy sketched the shuffle again")
    monkeypatch.setattr(anatomy, "_triplets", no_sketch)
    r = _row(_planted_at_sketch_size(gen), "tw")
    assert r.rand_num_spikes == 3 and _classes(r) == (0, 3, 0)
    assert set(r.outliers) == set(SKETCH_PLANTED)
    assert r.traps[0].eigenvalue == pytest.approx(r.max_rand_eval, rel=1e-14)


def test_ww_anatomy_at_sketch_size_sketches_only_for_the_mean(gen, monkeypatch):
    """M >= RSVD_MIN_M under ww: the traps' eigenvalues come from the rule's shuffled ESD, the
    centred count's sketch gives the other traps' vectors, and the shuffle itself is sketched
    once, only to find the mean's trap; planted entries and the mean's spike are both found."""
    from llm_audit import anatomy
    calls = []
    real = anatomy._triplets

    def counted(S, k, generator):
        calls.append(k)
        return real(S, k, generator)
    monkeypatch.setattr(anatomy, "_triplets", counted)
    r = _row(_planted_at_sketch_size(gen, mean=0.1), "ww")
    assert r.rand_num_spikes == 4 and _classes(r) == (1, 3, 0)
    assert set(r.outliers) == set(SKETCH_PLANTED)
    assert calls == [5]  # S's top n_all + 1, for the mean; none for the entries traps
    assert r.traps[0].eigenvalue == pytest.approx(r.max_rand_eval, rel=1e-14)


@pytest.mark.parametrize("rule", ["ww", "tw", "perm"])
def test_no_anatomy_counts_the_same_traps_unclassified(gauss, rule):
    """--no-anatomy (AuditOptions(anatomy=False)): the same count and trap eigenvalues, every
    trap `unclassified`, no entries located, no class counted."""
    W = gauss.clone()
    for (i, j), value in PLANTED.items():
        W[i, j] = value
    full = _row(W, rule)
    opts = AuditOptions(trap_rule=rule, device="cpu", anatomy=False)
    bare = monitor_weights({"w.weight": W}, options=opts).layers[0]
    assert bare.rand_num_spikes == full.rand_num_spikes == 5
    assert [t.cls for t in bare.traps] == ["unclassified"] * 5
    assert _classes(bare) == (0, 0, 0) and bare.outliers == ()
    assert (bare.trap_entries, bare.trap_rows, bare.trap_cols) == (0, 0, 0)
    assert all(t.entries == () and t.half_mass_entries == 0 for t in bare.traps)
    if rule != "perm":  # perm's anatomy is of the first shuffle with the median count
        assert [t.eigenvalue for t in bare.traps] == pytest.approx(
            sorted((t.eigenvalue for t in full.traps), reverse=True), rel=1e-6)
