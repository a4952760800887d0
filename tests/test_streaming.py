"""Streamed analysis of matrices too large to decode whole (llm_audit/streaming.py): the same
spectral answers as the decoded path, an exact multiset shuffle, planted traps found."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import batching, streaming
from llm_audit.routing import MatrixJob
from llm_audit.source import open_checkpoint

ROWS, COLS = 3000, 200


def _heavy(gen: torch.Generator) -> torch.Tensor:
    """Gaussian over √uniform entries (heavy-tailed) plus a low-rank part."""
    g = torch.randn(ROWS, COLS, generator=gen) / torch.rand(ROWS, COLS, generator=gen).sqrt()
    u = torch.randn(ROWS, 3, generator=gen)
    v = torch.randn(3, COLS, generator=gen)
    return (0.05 * g + 0.3 * u @ v / COLS ** 0.5).to(torch.bfloat16)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(3)
    W = _heavy(gen)
    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": W, "model.layers.0.mlp.down_proj.weight":
               torch.randn(64, 32, generator=gen).to(torch.bfloat16)}, str(path))
    return path


def _job(path: Path) -> MatrixJob:
    (info,) = [t for t in open_checkpoint(path).tensors if t.name == "model.embed_tokens.weight"]
    return MatrixJob(name=info.name, layer=None, module="embed_tokens", scheme="dense",
                     parts=(info,))


def test_streams_decides_by_size_dtype_and_shape(ckpt, monkeypatch):
    job = _job(ckpt)
    assert not streaming.streams(job)  # 600k entries < STREAM_NUMEL
    monkeypatch.setattr(streaming, "STREAM_NUMEL", ROWS * COLS)
    assert streaming.streams(job)
    info = job.parts[0]
    f32 = dataclasses.replace(job, parts=(dataclasses.replace(info, dtype="F32"),))
    assert not streaming.streams(f32)  # 2^32 values: no small multiset


def test_histogram_is_the_multiset_of_entries(ckpt, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_NUMEL", 7 * COLS)  # several chunks, a short last one
    sm = streaming.StreamedMatrix(_job(ckpt), torch.device("cpu"))
    ms = sm.histogram()
    W = torch.cat(list(sm.chunks())).double()
    assert W.shape == (ROWS, COLS)
    vals, counts = torch.unique(W, return_counts=True)
    assert np.array_equal(np.sort(ms.values), vals.numpy())  # no -0.0 in this matrix
    assert np.array_equal(ms.counts[np.argsort(ms.values)], counts.numpy())
    mean, var = ms.moments()
    assert mean == pytest.approx(float(W.mean()), rel=1e-12, abs=1e-15)
    assert var == pytest.approx(float(W.var(unbiased=False)), rel=1e-12)


def test_shuffled_chunks_are_an_exact_permutation_and_uniform():
    ms = streaming.Multiset(values=np.array([-1.0, 0.5, 2.0, 7.0]),
                            counts=np.array([30, 50, 19, 1]))
    hits = np.zeros(100, dtype=int)
    for seed in range(2000):
        S = torch.cat(list(streaming.shuffled_chunks(ms, 10, 10, 3, seed,
                                                     torch.device("cpu")))).reshape(-1)
        assert S.shape == (100,)
        got, n = np.unique(S.numpy(), return_counts=True)
        assert got.tolist() == [-1.0, 0.5, 2.0, 7.0] and n.tolist() == [30, 50, 19, 1]
        hits[int(torch.nonzero(S == 7.0))] += 1
    # the single 7.0 lands in each of the 100 places with probability 1/100 (chi-square, 99 dof:
    # 99.9% quantile 148.2; the chunks (3 rows, last 1 row) must not bias it)
    chi2 = float(((hits - 20.0) ** 2 / 20.0).sum())
    assert chi2 < 148.2
    a = torch.cat(list(streaming.shuffled_chunks(ms, 10, 10, 3, 5, torch.device("cpu"))))
    b = torch.cat(list(streaming.shuffled_chunks(ms, 10, 10, 3, 5, torch.device("cpu"))))
    c = torch.cat(list(streaming.shuffled_chunks(ms, 10, 10, 3, 6, torch.device("cpu"))))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_streamed_rows_equal_the_decoded_rows(ckpt, monkeypatch, precision):
    opts = dict(device="cpu", randomize=False, precision=precision)
    decoded = llm_audit.audit(ckpt, max_spectra=0, **opts).details.set_index("name")
    monkeypatch.setattr(streaming, "STREAM_NUMEL", ROWS * COLS)
    # 7 rows a chunk: the last one (3000 = 428·7 + 4) has fewer rows than columns
    monkeypatch.setattr(streaming, "CHUNK_NUMEL", 7 * COLS)
    streamed = llm_audit.audit(ckpt, max_spectra=0, **opts).details.set_index("name")
    name = "model.embed_tokens.weight"
    a, b = decoded.loc[name], streamed.loc[name]
    assert b["status"] == "ok" and b["N"] == ROWS and b["M"] == COLS
    # float64: equal to round-off; auto (float32 products if decided): within float32 noise
    rel = 1e-9 if precision == "float64" else 1e-4
    for col in ("alpha", "xmin", "D", "lambda_max", "log_norm", "stable_rank", "entropy",
                "num_spikes", "bulk_max", "entry_mean", "entry_std", "max_abs_w_over_std"):
        assert b[col] == pytest.approx(a[col], rel=rel, abs=1e-12), col
    assert b["num_pl_spikes"] == a["num_pl_spikes"]
    assert b["matrix_rank"] == a["matrix_rank"]
    other = "model.layers.0.mlp.down_proj.weight"  # small matrices still go the decoded way
    assert streamed.loc[other, "alpha"] == decoded.loc[other, "alpha"]


def _planted(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(ROWS, COLS, generator=gen) * 0.02
    W[torch.randint(ROWS, (4,), generator=gen), torch.randint(COLS, (4,), generator=gen)] = 2.0
    path = tmp_path / "planted.safetensors"
    save_file({"model.embed_tokens.weight": W.to(torch.bfloat16)}, str(path))
    return path


@pytest.mark.parametrize("rule", ["tw", "ww", "perm"])
def test_planted_entries_give_the_same_trap_count_streamed(tmp_path, monkeypatch, rule):
    """4 entries at 100σ: 4 traps (each a rank-1 spike of its shuffled matrix) both ways."""
    path = _planted(tmp_path)
    decoded = llm_audit.audit(path, device="cpu", trap_rule=rule, max_spectra=0)
    monkeypatch.setattr(streaming, "STREAM_NUMEL", ROWS * COLS)
    res = llm_audit.audit(path, device="cpu", trap_rule=rule)
    a, b = decoded.details.iloc[0], res.details.iloc[0]
    assert a["rand_num_spikes"] == 4 and b["rand_num_spikes"] == 4
    # tw/perm: the threshold is the variance's (the same); ww: an MP fit of another shuffle
    rel = 1e-2 if rule == "ww" else 1e-9
    assert b["trap_threshold"] == pytest.approx(a["trap_threshold"], rel=rel)
    assert b["traps_entries"] + b["traps_tail"] + b["traps_mean"] == 0  # not classified
    assert list(res.traps["class"]) == ["unclassified"] * 4
    (spec,) = res.spectra  # the figure's spectra come streamed too
    assert len(spec.evals) == COLS and len(spec.rand_evals) == COLS
    assert sum(v > spec.trap_threshold for v in spec.rand_evals) == 4


def test_a_non_finite_streamed_matrix_is_a_failed_row(tmp_path, monkeypatch):
    W = torch.randn(ROWS, COLS) * 0.02
    W[5, 7], W[9, 1] = float("nan"), float("inf")
    path = tmp_path / "bad.safetensors"
    save_file({"model.embed_tokens.weight": W.to(torch.bfloat16)}, str(path))
    monkeypatch.setattr(streaming, "STREAM_NUMEL", ROWS * COLS)
    row = llm_audit.audit(path, device="cpu", max_spectra=0).details.iloc[0]
    assert row["status"] == "failed"
    assert row["warning"] == "failed: non-finite entries (1 NaN, 1 Inf)"


def test_streamed_jobs_come_first_through_the_seam(ckpt, monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_NUMEL", ROWS * COLS)
    ck = open_checkpoint(ckpt)
    from llm_audit.options import AuditOptions
    from llm_audit.pipeline import plan

    opts = AuditOptions(device="cpu", randomize=False)
    jobs, _ = plan(ck, opts)
    got = [i for i, _ in batching.analyse_jobs(jobs, opts)]
    first = [i for i, j in enumerate(jobs) if streaming.streams(j)]
    assert got[:len(first)] == first and sorted(got) == list(range(len(jobs)))
