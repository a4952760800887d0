"""Executors (llm_audit.executors): processes and Ray give the serial tables exactly, both trap
rules, on an MoE and a dense checkpoint; a killed worker's unit is run again, nothing lost or
counted twice; resume works under every executor."""

import os
import signal

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import executors
from llm_audit.errors import UsageError
from llm_audit.options import AuditOptions, ExecutorSpec, parse_executor
from llm_audit.plan import plan_checkpoint
from llm_audit.progress import JobDone
from llm_audit.records import TIMING_COLUMNS
from llm_audit.source import open_checkpoint

from .checkpoints import write_gpt_oss
from .synth_matrices import heavy_tailed_stack


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return write_gpt_oss(tmp_path_factory.mktemp("moe"), layers=2, width=64, experts=4)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    W = heavy_tailed_stack(6, 96, 160, seed=3)
    f = tmp_path_factory.mktemp("dense") / "model.safetensors"
    save_file({f"layers.{b}.mlp.up_proj.weight": W[b].contiguous() for b in range(6)}, f)
    return f


def _values(res) -> pd.DataFrame:
    return res.details.drop(columns=list(TIMING_COLUMNS)).reset_index(drop=True)


def test_parse_executor():
    assert parse_executor("serial") == ExecutorSpec("serial")
    assert parse_executor("auto") == ExecutorSpec("auto")
    assert parse_executor("threads") == ExecutorSpec("threads")
    assert parse_executor("threads:2") == ExecutorSpec("threads", workers=2)
    assert parse_executor("processes") == ExecutorSpec("processes")
    assert parse_executor("processes:3") == ExecutorSpec("processes", workers=3)
    assert parse_executor("ray") == ExecutorSpec("ray")
    assert parse_executor("ray:10.0.0.1:6379") == ExecutorSpec("ray", address="10.0.0.1:6379")
    for bad in ("thread", "threads:0", "processes:0", "processes:x", "serial:2", "auto:2"):
        with pytest.raises(UsageError) as e:
            AuditOptions(executor=bad)
        assert str(e.value) == (f"--executor {bad!r} is not an executor: use auto, serial, "
                                "threads[:N], processes[:N] (N >= 1) or ray[:ADDRESS]")


def test_units_keep_stacks_together_largest_first(moe):
    ck = open_checkpoint(moe)
    jobs, _ = plan_checkpoint(ck.tensors, ck.config_dict)
    us = executors.units(jobs)
    assert sorted(i for u in us for i in u.indices) == list(range(len(jobs)))
    assert [u.nbytes for u in us] == sorted((u.nbytes for u in us), reverse=True)
    for u in us:  # one stack key per unit, and all of that key's jobs in it
        keys = {executors.stack_key(jobs[i]) for i in u.indices}
        assert len(keys) == 1
        if None not in keys:
            assert len(u.indices) == sum(executors.stack_key(j) in keys for j in jobs)
        else:
            assert len(u.indices) == 1


@pytest.mark.parametrize("rule", ["ww", "tw"])
@pytest.mark.parametrize("which", ["moe", "dense"])
def test_processes_equal_serial(which, rule, request):
    src = request.getfixturevalue(which)
    serial = llm_audit.audit(src, trap_rule=rule, device="cpu", max_spectra=0)
    par = llm_audit.audit(src, trap_rule=rule, device="cpu", max_spectra=0,
                          executor="processes:2")
    pd.testing.assert_frame_equal(_values(par), _values(serial), check_exact=True)
    assert par.summary.options["executor"] == "processes:2"


@pytest.mark.parametrize("rule", ["ww", "tw"])
@pytest.mark.parametrize("which", ["moe", "dense"])
def test_threads_equal_serial(which, rule, request):
    """threads:3 (more threads than cores here: batches really overlap) gives the serial
    tables exactly on matrices too small for torch to split a sum across its threads."""
    src = request.getfixturevalue(which)
    serial = llm_audit.audit(src, trap_rule=rule, device="cpu", max_spectra=0,
                             executor="serial")
    before = torch.get_num_threads()
    par = llm_audit.audit(src, trap_rule=rule, device="cpu", max_spectra=0,
                          executor="threads:3")
    pd.testing.assert_frame_equal(_values(par), _values(serial), check_exact=True)
    assert par.summary.options["executor"] == "threads:3"
    assert torch.get_num_threads() == before  # the intra-op threads are restored


def test_auto_is_threads_on_cpu_serial_on_cuda(monkeypatch):
    monkeypatch.setattr(executors, "cores", lambda: 16)
    auto = ExecutorSpec("auto")
    assert executors.thread_workers(auto, torch.device("cpu")) == executors.AUTO_MAX_THREADS
    assert executors.thread_workers(auto, torch.device("cuda")) == 1
    assert executors.thread_workers(ExecutorSpec("threads", workers=3),
                                    torch.device("cpu")) == 3
    monkeypatch.setattr(executors, "cores", lambda: 2)
    assert executors.thread_workers(auto, torch.device("cpu")) == 2


def test_in_threads_keeps_at_most_workers_batches_in_flight(dense, monkeypatch):
    """Memory stays as the serial path's: never more than N batches analysed at once."""
    import threading
    import time

    from llm_audit import batching

    real, lock, live, peak = batching._analyse_batch, threading.Lock(), [0], [0]

    def slow(batch, opts):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        try:
            yield from real(batch, opts)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(batching, "_analyse_batch", slow)
    res = llm_audit.audit(dense, device="cpu", max_spectra=0, executor="threads:2")
    assert len(res.details) == 6 and (res.details.status == "ok").all()
    assert peak[0] == 2


def test_killed_worker_is_rerun_nothing_lost_or_twice(dense):
    """The first finished job's callback kills a worker mid-audit (SIGKILL): the units in
    flight run again, one at a time, and every job is reported once."""
    import multiprocessing

    serial = llm_audit.audit(dense, device="cpu", max_spectra=0)
    seen, killed = [], []

    def progress(ev):
        if isinstance(ev, JobDone):
            seen.append(ev.name)
            kids = multiprocessing.active_children()
            if not killed and kids:
                os.kill(kids[0].pid, signal.SIGKILL)
                killed.append(kids[0].pid)

    par = llm_audit.audit(dense, device="cpu", max_spectra=0, executor="processes:2",
                          progress=progress)
    assert killed
    assert sorted(seen) == sorted(serial.details.name)  # each job once
    assert (par.details.status == "ok").all()
    pd.testing.assert_frame_equal(_values(par), _values(serial), check_exact=True)


def test_a_unit_that_always_kills_its_worker_is_a_failed_row(dense, monkeypatch):
    """A unit whose worker dies MAX_ATTEMPTS times becomes failed rows; the rest are kept."""
    ck = open_checkpoint(dense)
    all_jobs, _ = plan_checkpoint(ck.tensors, ck.config_dict)
    victim = all_jobs[2].name
    opts = AuditOptions(device="cpu", executor="processes:2")
    monkeypatch.setattr(executors, "analyse_unit", _dies_on(victim))
    out = dict(executors.run_processes(all_jobs, opts, torch.device("cpu"),
                                       ExecutorSpec("processes", workers=2)))
    assert sorted(out) == list(range(len(all_jobs)))
    failed = [i for i, rows in out.items() if rows[0].status == "failed"]
    assert failed == [2]
    assert out[2][0].warning == (f"failed: its worker process died {executors.MAX_ATTEMPTS} "
                                 "times (out of memory?)")


def _dies_on(name):
    return _Killer(name)


class _Killer:
    """A picklable stand-in for analyse_unit that kills its worker on one job's unit."""

    def __init__(self, name):
        self.name = name

    def __call__(self, jobs, opts, device=None):
        if any(j.name == self.name for j in jobs):
            os.kill(os.getpid(), signal.SIGKILL)
        return executors.analyse_unit(jobs, opts, device)


def test_resume_under_processes(dense, tmp_path):
    first = llm_audit.audit(dense, device="cpu", max_spectra=0, executor="processes:2",
                            workdir=tmp_path)
    calls = []
    again = llm_audit.audit(dense, device="cpu", max_spectra=0, executor="processes:2",
                            workdir=tmp_path, resume=True,
                            progress=lambda ev: calls.append(getattr(ev, "cached", None)))
    assert all(c for c in calls if c is not None)  # every job came from the journal
    pd.testing.assert_frame_equal(_values(again), _values(first), check_exact=True)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_ray_equals_serial(moe, dense, rule, ray_cluster):
    for src in (moe, dense):
        serial = llm_audit.audit(src, trap_rule=rule, device="cpu", max_spectra=0)
        par = llm_audit.audit(src, trap_rule=rule, device="cpu", max_spectra=0,
                              executor="ray")
        pd.testing.assert_frame_equal(_values(par), _values(serial), check_exact=True)


def _ray_workers_running_units() -> list[int]:
    """PIDs of Ray worker processes running a unit (their title: ray::analyse_unit)."""
    from pathlib import Path

    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if b"ray::analyse_unit" in (p / "cmdline").read_bytes():
                out.append(int(p.name))
        except OSError:
            continue
    return out


def test_ray_worker_killed_mid_audit_is_retried(dense, ray_cluster):
    serial = llm_audit.audit(dense, device="cpu", max_spectra=0)
    seen, killed = [], []

    def progress(ev):
        if isinstance(ev, JobDone):
            seen.append(ev.name)
            pids = _ray_workers_running_units()
            if not killed and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    par = llm_audit.audit(dense, device="cpu", max_spectra=0, executor="ray", progress=progress)
    assert killed
    assert sorted(seen) == sorted(serial.details.name)
    pd.testing.assert_frame_equal(_values(par), _values(serial), check_exact=True)
