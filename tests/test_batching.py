"""Batched analysis: a matrix's results do not depend on the stack it is analysed in
(analysis.analyse_stack), nor on how the pipeline cuts experts into batches (BATCH_BYTES)."""

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import analysis, batching, detect, pipeline, spectral, summary
from llm_audit.analysis import MatrixMeta, analyse_stack, matrix_generator
from llm_audit.options import AuditOptions
from llm_audit.records import COLUMNS, TIMING_COLUMNS
from llm_audit.source import open_checkpoint

from .checkpoints import write_gpt_oss
from .synth_matrices import heavy_tailed_stack

VALUES = [c for c in COLUMNS if c not in TIMING_COLUMNS]


def _metas(n, module="down_proj"):
    return [MatrixMeta(f"model.layers.3.mlp.experts.{module}[{b}]", 3, module, b, "F32")
            for b in range(n)]


def assert_same_row(a, b, rel=1e-9):
    """Every non-timing column equal: exactly for ints and strings, to `rel` for floats."""
    for col in VALUES:
        x, y = getattr(a, col), getattr(b, col)
        if isinstance(x, float) and isinstance(y, float):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel), \
                (a.name, col, x, y)
        else:
            assert x == y, (a.name, col, x, y)


def test_matrix_generator_is_a_seeded_cpu_generator():
    g = matrix_generator(0, "a.weight")
    assert g.device.type == "cpu"
    x = torch.randn(4, generator=g)
    assert torch.equal(x, torch.randn(4, generator=matrix_generator(0, "a.weight")))
    assert not torch.equal(x, torch.randn(4, generator=matrix_generator(0, "b.weight")))
    assert not torch.equal(x, torch.randn(4, generator=matrix_generator(1, "a.weight")))


@pytest.mark.parametrize("rule, shape, sketch", [
    ("ww", (160, 120), False),
    ("tw", (160, 120), False),
    ("tw", (480, 400), True),  # the randomized sketch: matrix b's Ω comes from its own name
])
def test_stack_member_equals_the_matrix_alone(rule, shape, sketch, monkeypatch):
    if sketch:
        monkeypatch.setattr(detect, "RSVD_MIN_M", 256)
    W = heavy_tailed_stack(3, *shape, seed=1)
    metas = _metas(3)
    opts = AuditOptions(trap_rule=rule, precision="float64")
    stack = analyse_stack(W, metas, opts, key="model.layers.3.mlp.experts.down_proj")
    assert [r.status for r in stack] == ["ok"] * 3
    assert [r.rand_num_spikes for r in stack] == [1, 2, 3]  # the planted entries
    assert [r.precision for r in stack] == ["float64"] * 3
    for b in range(3):
        alone = analyse_stack(W[b:b + 1], [metas[b]], opts,
                              key="model.layers.3.mlp.experts.down_proj")[0]
        assert_same_row(stack[b], alone)
        # and in the other order, in a stack of two
        pair = analyse_stack(W[[b, (b + 1) % 3]], [metas[b], metas[(b + 1) % 3]], opts,
                             key="model.layers.3.mlp.experts.down_proj")
        assert_same_row(stack[b], pair[0])
    other = analyse_stack(W[:1], metas[:1], opts, key="another.tensor")[0]
    assert other.max_rand_eval != stack[0].max_rand_eval  # the key seeds the shuffle
    assert other.alpha == pytest.approx(stack[0].alpha, rel=1e-12)  # and nothing else


def test_stack_timing_columns(monkeypatch):
    W = heavy_tailed_stack(2, 160, 120)
    rows = analyse_stack(W, _metas(2), AuditOptions(), key="k")
    for r in rows:
        for col in ("eigen_seconds", "fit_seconds", "trap_seconds"):
            assert getattr(r, col) >= 0
        assert r.seconds == pytest.approx(r.eigen_seconds + r.fit_seconds + r.trap_seconds)
        for col in ("read_seconds", "decode_seconds", "wait_seconds"):  # set by the pipeline
            assert math.isnan(getattr(r, col))
    assert rows[0].eigen_seconds == rows[1].eigen_seconds  # the shared work split evenly


def test_bad_matrix_in_a_stack_fails_alone():
    W = heavy_tailed_stack(3, 160, 120)
    bad = W.clone()
    bad[1] = float("nan")
    metas = _metas(3)
    opts = AuditOptions(precision="float64")
    rows = analyse_stack(bad, metas, opts, key="k")
    assert [r.status for r in rows] == ["ok", "failed", "ok"]
    assert rows[1].warning == f"failed: non-finite entries ({160 * 120} NaN, 0 Inf)"
    assert (rows[1].name, rows[1].N, rows[1].M, rows[1].precision) == (metas[1].name, 160, 120, "")
    assert math.isnan(rows[1].alpha) and rows[1].rand_num_spikes == 0
    good = analyse_stack(W[[0, 2]], [metas[0], metas[2]], opts, key="k")
    assert_same_row(rows[0], good[0])
    assert_same_row(rows[2], good[1])
    zero = W.clone()
    zero[0] = 0.0
    assert analyse_stack(zero, metas, opts, key="k")[0].warning == "failed: all entries are zero"


@pytest.mark.parametrize("error", [RuntimeError, torch.linalg.LinAlgError])
def test_eigensolver_failure_is_isolated_to_its_matrix(monkeypatch, error):
    W = heavy_tailed_stack(3, 160, 120)
    W[2, 0, 0] = 12345.0  # the matrix the fake eigensolver chokes on
    real = spectral.esd

    def esd(X, **kw):
        if X.ndim == 3 and bool((X[:, 0, 0] == 12345.0).any()):
            raise error("boom")
        return real(X, **kw)

    monkeypatch.setattr(spectral, "esd", esd)
    rows = analyse_stack(W, _metas(3), AuditOptions(precision="float64"), key="k")
    assert [r.status for r in rows] == ["ok", "ok", "failed"]
    assert rows[2].warning == f"failed: {error.__name__.lstrip('_')}: boom"  # not _LinAlgError
    assert math.isnan(rows[2].seconds) and rows[2].name == _metas(3)[2].name
    monkeypatch.setattr(spectral, "esd", real)
    alone = analyse_stack(W[:1], _metas(3)[:1], AuditOptions(precision="float64"), key="k")
    assert_same_row(rows[0], alone[0])


def test_auto_fallback_matrix_traps_do_not_depend_on_its_stack(monkeypatch):
    decided = analysis._float32_decided
    monkeypatch.setattr(analysis, "_float32_decided", lambda evals, fit, thr, opts, name:
                        False if name.endswith("[0]") else decided(evals, fit, thr, opts, name))
    W = heavy_tailed_stack(2, 160, 120)
    metas = _metas(2)
    stack = analyse_stack(W, metas, AuditOptions(), key="k")
    alone = analyse_stack(W[:1], metas[:1], AuditOptions(), key="k")[0]
    assert (stack[0].precision, stack[1].precision, alone.precision) == \
        ("float64", "float32", "float64")
    assert stack[0].max_rand_eval == alone.max_rand_eval  # float32-rounded in the stack


# -- the pipeline ------------------------------------------------------------------------------

def _mixtral(folder, gen, modules=("w1", "w2")):
    """A Mixtral-layout checkpoint: one tensor per expert and module (4 experts)."""
    def w(*s):
        return (torch.randn(*s, generator=gen) / 8).to(torch.bfloat16)

    tensors = {"model.layers.0.self_attn.q_proj.weight": w(48, 48)}
    for e in range(4):
        for m in modules:
            tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{m}.weight"] = \
                w(64, 48) if m == "w1" else w(48, 64)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    return folder


def test_stack_keys(tmp_path, gen):
    ck = open_checkpoint(write_gpt_oss(tmp_path / "g", layers=1, experts=2, shards=1))
    keys = {j.name: batching.stack_key(j) for j in pipeline.plan(ck, AuditOptions())[0]}
    # the logical name, whatever the storage (an MXFP4 checkpoint and its BF16 copy agree)
    assert keys["model.layers.0.mlp.experts.gate_up_proj[1]"] == \
        "model.layers.0.mlp.experts.gate_up_proj"
    assert keys["model.layers.0.mlp.experts.down_proj[0]"] == \
        "model.layers.0.mlp.experts.down_proj"
    assert keys["model.layers.0.self_attn.q_proj.weight"] is None
    ck = open_checkpoint(_mixtral(tmp_path / "m", gen))
    keys = {j.name: batching.stack_key(j) for j in pipeline.plan(ck, AuditOptions())[0]}
    assert keys["model.layers.0.block_sparse_moe.experts.3.w2.weight"] == \
        "model.layers.0.block_sparse_moe.experts.*.w2.weight"
    assert keys["model.layers.0.self_attn.q_proj.weight"] is None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("batching")
    return {"gpt_oss": write_gpt_oss(d / "gpt-oss", seed=3),
            # file order: expert 0's w1, w2, expert 1's ...: batching regroups them
            "mixtral": _mixtral(d / "mixtral", torch.Generator().manual_seed(4))}


@pytest.fixture
def stack_sizes(monkeypatch):
    """The batch size of every analyse_stack call the pipeline makes, in order."""
    sizes = []
    real = batching.analyse_stack

    def spy(W, metas, opts, *, key):
        sizes.append(W.shape[0])
        return real(W, metas, opts, key=key)

    monkeypatch.setattr(batching, "analyse_stack", spy)
    return sizes


@pytest.mark.parametrize("kind, rule", [("gpt_oss", "ww"), ("gpt_oss", "tw"),
                                        ("mixtral", "ww")])
def test_batching_does_not_change_answers(checkpoints, kind, rule, stack_sizes, monkeypatch):
    sizes = stack_sizes
    batched = llm_audit.audit(checkpoints[kind], trap_rule=rule, max_spectra=0)
    assert max(sizes) == 4  # the four experts of a tensor in one stack
    sizes.clear()
    monkeypatch.setattr(batching, "BATCH_BYTES", {"cpu": 1, "cuda": 1})
    single = llm_audit.audit(checkpoints[kind], trap_rule=rule, max_spectra=0)
    assert set(sizes) == {1}
    a, b = (r.details.drop(columns=list(TIMING_COLUMNS)) for r in (batched, single))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert (a.status == "ok").sum() >= 5


def test_per_expert_tensors_are_batched(tmp_path, gen, stack_sizes):
    sizes = stack_sizes
    llm_audit.audit(_mixtral(tmp_path / "m", gen), randomize=False, max_spectra=0)
    assert sorted(sizes) == [1, 4, 4]  # q_proj; the four w1; the four w2


def test_stage_seconds(checkpoints):
    res = llm_audit.audit(checkpoints["gpt_oss"], max_spectra=0)
    stages = res.summary.stage_seconds
    assert set(stages) == {"read", "decode", "eigen", "fit", "traps", "wait"}
    assert all(isinstance(v, float) and v >= 0 for v in stages.values())
    d = res.details
    for stage, col in summary.STAGE_COLUMNS.items():
        assert stages[stage] == pytest.approx(float(d[col].fillna(0).sum()))
    ok = d[d.status == "ok"]
    for col in TIMING_COLUMNS:
        assert (ok[col] >= 0).all(), col
    assert stages["eigen"] > 0 and stages["read"] > 0


def test_analyse_jobs_pairs_each_job_index_with_its_rows(checkpoints, monkeypatch):
    monkeypatch.setattr(batching, "BATCH_BYTES", {"cpu": 3 * 4 * 64 * 64 * 2})  # 3 experts
    opts = AuditOptions(include=r"layers\.1\.mlp\.experts\.gate_up", randomize=False)
    jobs, _ = pipeline.plan(open_checkpoint(checkpoints["gpt_oss"]), opts)
    out = list(batching.analyse_jobs(jobs, opts, torch.device("cpu")))
    assert sorted(i for i, _ in out) == list(range(len(jobs)))
    for i, rows in out:
        job = jobs[i]
        assert [r.name for r in rows] == [f"{job.name}.gate", f"{job.name}.up"]
        assert all(dataclasses.is_dataclass(r) and r.read_seconds >= 0 for r in rows)


def test_figure_spectra_use_the_audits_shuffle(checkpoints):
    """The shuffled ESD drawn for an expert is the one its traps were counted on (the stack's
    shared permutation), so the figure shows exactly rand_num_spikes values above the line."""
    res = llm_audit.audit(checkpoints["gpt_oss"], precision="float64", max_spectra=40)
    experts = [s for s in res.spectra if "[" in s.name]
    assert experts and any(s.rand_num_spikes > 0 for s in experts)
    for s in experts:
        above = sum(v > s.trap_threshold for v in s.rand_evals)
        assert above == s.rand_num_spikes, s.name
