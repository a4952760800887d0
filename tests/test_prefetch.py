"""The background reader (prefetch.py): jobs come back in order, decoded; a job that cannot be
decoded carries its error; any other exception reaches the consumer; leaving early stops the
thread."""

import dataclasses
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import prefetch as prefetch_module
from llm_audit.errors import DecodeError
from llm_audit.options import AuditOptions
from llm_audit.pipeline import plan
from llm_audit.prefetch import DecodedJob, prefetch
from llm_audit.source import open_checkpoint

CPU = torch.device("cpu")
N_JOBS = 12


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i:02d}.mlp.down_proj.weight": torch.randn(24, 16, generator=g)
            for i in range(N_JOBS)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tensors):
    d = tmp_path_factory.mktemp("prefetch")
    save_file(tensors, d / "model.safetensors")
    return d


@pytest.fixture
def jobs(folder):
    jobs, _ = plan(open_checkpoint(folder), AuditOptions())
    assert len(jobs) == N_JOBS
    return jobs


JOB_BYTES = 24 * 16 * 4  # one decoded job (float32)


@pytest.mark.parametrize("budget", [1, 3 * JOB_BYTES, 100 * JOB_BYTES])
def test_jobs_come_back_in_order_decoded(jobs, tensors, budget):
    before = threading.active_count()
    with prefetch(jobs, CPU, budget) as decoded:
        got = list(decoded)
    assert threading.active_count() == before  # joined when the block ends
    assert [d.job for d in got] == jobs
    for d in got:
        assert isinstance(d, DecodedJob) and d.error is None
        (m,) = d.matrices
        assert m.name == d.job.name and torch.equal(m.W, tensors[d.job.name])
        assert d.read_seconds >= 0 and d.decode_seconds >= 0 and d.wait_seconds >= 0


def test_undecodable_job_carries_its_error(jobs, tensors):
    jobs[4] = dataclasses.replace(jobs[4], scheme="nonsense")  # no decoder: a DecodeError
    with prefetch(jobs, CPU, 2) as decoded:
        got = list(decoded)
    assert [d.job for d in got] == jobs
    bad = got[4]
    assert bad.matrices == () and isinstance(bad.error, DecodeError)
    assert str(bad.error) == f"tensor {jobs[4].name!r}: no decoder for scheme 'nonsense'"
    for d in got[:4] + got[5:]:
        assert d.error is None and torch.equal(d.matrices[0].W, tensors[d.job.name])


def test_undecodable_job_is_a_failed_row_in_the_audit(folder, monkeypatch):
    real = prefetch_module.decode

    def decode(job, reader, device):
        if job.name == "model.layers.03.mlp.down_proj.weight":
            raise DecodeError("scales do not fit")
        return real(job, reader, device)

    monkeypatch.setattr(prefetch_module, "decode", decode)
    d = llm_audit.audit(folder, max_spectra=0).details.set_index("name")
    assert len(d) == N_JOBS
    bad = d.loc["model.layers.03.mlp.down_proj.weight"]
    assert (bad.status, bad.warning, bad.N, bad.M) == \
        ("failed", "failed: scales do not fit", 24, 16)
    assert (d.drop(index=bad.name).status == "ok").all()


def test_unexpected_error_reaches_the_consumer(jobs, monkeypatch):
    real = prefetch_module.decode

    def decode(job, reader, device):
        if job is jobs[5]:
            raise RuntimeError("disk on fire")
        return real(job, reader, device)

    monkeypatch.setattr(prefetch_module, "decode", decode)
    before = threading.active_count()
    seen = []
    with pytest.raises(RuntimeError, match="^disk on fire$"):
        with prefetch(jobs, CPU, 2) as decoded:
            for d in decoded:
                seen.append(d.job)
    assert seen == jobs[:5]  # everything before the failing job, in order
    assert threading.active_count() == before  # the reader was joined


def test_leaving_early_stops_the_thread(jobs, monkeypatch):
    real = prefetch_module.decode
    calls = []

    def decode(job, reader, device):
        calls.append(job.name)
        return real(job, reader, device)

    monkeypatch.setattr(prefetch_module, "decode", decode)
    before = threading.active_count()
    t0 = time.perf_counter()
    with prefetch(jobs, CPU, 1) as decoded:
        for d in decoded:
            assert d.job is jobs[0]
            time.sleep(0.05)  # let the reader run ahead and block on the full queue
            break
    assert time.perf_counter() - t0 < 2.0  # did not hang
    assert threading.active_count() == before  # the reader was joined on leaving the block
    assert len(calls) <= 4 < N_JOBS  # it stopped instead of decoding everything
    # leaving through an exception in the consumer stops it too
    with pytest.raises(KeyError):
        with prefetch(jobs, CPU, 1) as decoded:
            next(iter(decoded))
            raise KeyError("consumer failed")
    assert threading.active_count() == before


@pytest.mark.parametrize("ahead", [1, 3])
def test_waiting_jobs_stay_within_the_byte_budget(jobs, monkeypatch, ahead):
    """A slow consumer: the reader never has more than `budget` bytes decoded and not yet
    taken (one job always), whatever the number of jobs: memory does not grow with them."""
    real = prefetch_module.decode
    taken, most = [0], [0]

    def decode(job, reader, device):
        out = real(job, reader, device)
        most[0] = max(most[0], calls.__len__() + 1 - taken[0])
        calls.append(job.name)
        return out

    calls: list[str] = []
    monkeypatch.setattr(prefetch_module, "decode", decode)
    with prefetch(jobs, CPU, ahead * JOB_BYTES) as decoded:
        for _ in decoded:
            time.sleep(0.02)  # the reader would run ahead of this consumer
            taken[0] += 1
    assert len(calls) == N_JOBS
    assert most[0] <= ahead + 1  # `ahead` waiting + the one being handed over


def test_wait_and_decode_seconds_are_measured(jobs, monkeypatch):
    real = prefetch_module.decode

    def slow(job, reader, device):
        time.sleep(0.1)  # decoding work (no file reading): counted as decode time
        return real(job, reader, device)

    monkeypatch.setattr(prefetch_module, "decode", slow)
    with prefetch(jobs[:2], CPU, 1) as decoded:
        first = next(iter(decoded))
    assert first.decode_seconds >= 0.09
    assert first.wait_seconds >= 0.05  # the consumer waited for it
    assert first.read_seconds < first.decode_seconds
