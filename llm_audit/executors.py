"""Executors: who analyses the matrix jobs (stage 4 scaled out). Each one has the signature of
`batching.analyse_jobs` (the serial executor) and yields (job index, rows) pairs in the order
they finish; the pipeline puts them back in order, journals and reports them.

- ``serial``: `batching.analyse_jobs` in this process, one batch after another.
- ``threads[:N]``: the same, N batches at once in threads (`batching.in_threads`), cores/N of
  torch's threads each. ``auto`` (the default): threads on CPU (N = the cores, at most
  AUTO_MAX_THREADS), serial on CUDA.
- ``processes[:N]``: N local worker processes (`concurrent.futures`, spawned: no forked torch
  state), one work unit at a time each; with ``--device cuda`` and several GPUs worker i uses
  ``cuda:i``. Default N: the GPUs, or the CPU cores.
- ``ray[:ADDRESS]``: the same units as Ray tasks (``ray.init(address=ADDRESS)``; no address: a
  local cluster). Ray is an extra (``pip install llm-audit[ray]``), imported only here.

A work unit is one stack (the experts of one tensor: analysed as one batch) or one other
matrix, described by its `MatrixJob`s (names, files, byte ranges): workers read the tensors
from the checkpoint's path themselves, nothing but job descriptions and result rows crosses
between processes. Units are submitted largest first (a long matrix does not finish last)
with at most IN_FLIGHT_PER_WORKER per worker in flight, so the driver's memory stays flat.
Results equal the serial ones whatever the executor: every shuffle is seeded by its matrix
or stack name (`analysis.matrix_generator`), not by order or process.

A worker that dies (killed, out of memory) has its unit retried on a new worker, up to
MAX_ATTEMPTS times; a unit is yielded once, when it completes, so nothing is counted twice.
After MAX_ATTEMPTS its jobs become failed rows ("worker died") and the audit goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

from .batching import analyse_jobs, cores, failed_job, grouped, stack_key
from .errors import AuditError, UsageError
from .options import AuditOptions, ExecutorSpec, parse_executor
from .records import MatrixResult
from .routing import MatrixJob

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # tries of one unit before its jobs are failed rows
IN_FLIGHT_PER_WORKER = 2
AUTO_MAX_THREADS = 8  # threads of `auto` on a many-core CPU (each gets cores/8 of torch's)
Rows = tuple[MatrixResult, ...]
Executor = Callable[[list[MatrixJob], AuditOptions, torch.device],
                    Iterator[tuple[int, Rows]]]


@dataclass(frozen=True)
class Unit:
    """Jobs analysed together by one worker: indices into the executor's job list."""

    indices: tuple[int, ...]
    nbytes: int


def executor_for(opts: AuditOptions) -> Executor:
    """The executor `opts.executor` names (auto, serial, threads[:N], processes[:N],
    ray[:ADDRESS])."""
    spec = parse_executor(opts.executor)
    if spec.kind in ("auto", "threads"):
        return lambda jobs, o, device: analyse_jobs(jobs, o, device,
                                                    workers=thread_workers(spec, device))
    if spec.kind == "serial":
        return analyse_jobs
    if spec.kind == "processes":
        return lambda jobs, o, device: run_processes(jobs, o, device, spec)
    return lambda jobs, o, device: run_ray(jobs, o, device, spec)


def thread_workers(spec: ExecutorSpec, device: torch.device) -> int:
    """How many matrices `threads[:N]` / `auto` analyse at once: N; by default the cores (at
    most AUTO_MAX_THREADS) on CPU, and one on CUDA (the GPU is the bottleneck there)."""
    if spec.workers:
        return spec.workers
    if device.type != "cpu":
        return 1
    return max(1, min(AUTO_MAX_THREADS, cores()))


def units(jobs: list[MatrixJob]) -> list[Unit]:
    """The work units of `jobs`, largest first: each stack's jobs together, others alone."""
    out: dict[object, list[int]] = {}
    for i in grouped(jobs):
        key = stack_key(jobs[i])
        out.setdefault(("stack", key) if key is not None else ("job", i), []).append(i)
    made = [Unit(tuple(ix), sum(jobs[i].nbytes for i in ix)) for ix in out.values()]
    return sorted(made, key=lambda u: (-u.nbytes, u.indices[0]))


def analyse_unit(jobs: list[MatrixJob], opts: AuditOptions,
                 device: str | None = None) -> list[tuple[int, Rows]]:
    """What a worker runs: the serial executor on one unit's jobs (indices local to `jobs`).
    `device` None: the worker's own (set by its initializer) or the options'."""
    dev = torch.device(device or os.environ.get("LLM_AUDIT_WORKER_DEVICE") or
                       opts.torch_device())
    return list(analyse_jobs(jobs, opts, dev))


def run_processes(jobs: list[MatrixJob], opts: AuditOptions, device: torch.device,
                  spec: ExecutorSpec) -> Iterator[tuple[int, Rows]]:
    """The ``processes[:N]`` executor. When a worker dies, the pool breaks and every unit in
    flight fails with it, so blame is found by running those units again one at a time on a
    pool of one worker (a unit that kills that worker is the culprit: it gets MAX_ATTEMPTS
    tries in all); the units never started go back to the queue."""
    n, devices = _local_workers(spec.workers, device)
    threads = max(1, (os.cpu_count() or 1) // n)
    todo, suspects, tries = units(jobs), [], {}
    while todo or suspects:
        solo = bool(suspects)
        batch = [suspects.pop(0)] if solo else todo
        pool, clean = _pool(1 if solo else n, devices, threads), False
        try:
            flying, queue = yield from _drain(pool, batch, jobs, opts, 1 if solo else n)
            clean = not flying
        finally:
            _close(pool, clean)
        if not solo:
            todo, suspects = queue, flying
        elif flying:
            u = flying[0]
            tries[u] = tries.get(u, 1) + 1
            if tries[u] < MAX_ATTEMPTS:
                suspects.insert(0, u)
            else:
                yield from _give_up(u, jobs, f"its worker process died {MAX_ATTEMPTS} times "
                                             "(out of memory?)")


def _drain(pool: ProcessPoolExecutor, todo: list[Unit], jobs: list[MatrixJob],
           opts: AuditOptions, n: int):
    """Run `todo` on `pool`, yielding each finished unit's rows once. Returns (the units in
    flight when a worker died, the units not yet submitted); both empty when all ran."""
    queue = list(todo)
    flying: dict[Future, Unit] = {}
    while queue or flying:
        while queue and len(flying) < IN_FLIGHT_PER_WORKER * n:
            u = queue.pop(0)
            flying[pool.submit(analyse_unit, [jobs[i] for i in u.indices], opts)] = u
        wait(flying, return_when=FIRST_COMPLETED)
        broken = False
        for f in [f for f in flying if f.done()]:
            if isinstance(f.exception(), BrokenProcessPool):
                broken = True
                continue
            u = flying.pop(f)
            if f.exception() is not None:  # not a death: an error the unit itself raised
                yield from _give_up(u, jobs, f"worker error: {f.exception()}")
                continue
            yield from ((u.indices[local], rows) for local, rows in f.result())
        if broken:
            log.warning("a worker process died; %d unit(s) in flight run again, one at a "
                        "time", len(flying))
            return list(flying.values()), queue
    return [], []


def _give_up(u: Unit, jobs: list[MatrixJob], why: str) -> Iterator[tuple[int, Rows]]:
    for i in u.indices:
        yield i, (failed_job(jobs[i], AuditError(why)),)


def _close(pool: ProcessPoolExecutor, clean: bool) -> None:
    """Shut the pool down; on an error or an interrupt its workers are stopped at once (the
    executor has no public way to do so: its process table is read)."""
    if not clean:
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()
    pool.shutdown(wait=clean, cancel_futures=True)


def _pool(n: int, devices: list[str | None], threads: int) -> ProcessPoolExecutor:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for d in devices:
        slots.put(d)
    return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                               initargs=(slots, threads))


def _init_worker(slots, threads: int) -> None:
    """Each worker: its device (one GPU each when there are several) and its thread share."""
    device = slots.get()
    if device is not None:
        os.environ["LLM_AUDIT_WORKER_DEVICE"] = device
    torch.set_num_threads(threads)


def _local_workers(workers: int | None, device: torch.device) -> tuple[int, list[str | None]]:
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        n = workers or torch.cuda.device_count()
        return n, [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    n = workers or os.cpu_count() or 1
    return n, [str(device)] * n


def run_ray(jobs: list[MatrixJob], opts: AuditOptions, device: torch.device,
            spec: ExecutorSpec) -> Iterator[tuple[int, Rows]]:
    """The ``ray[:ADDRESS]`` executor: one Ray task per unit (one CPU, or one GPU with
    ``--device cuda``), retried by Ray when its worker dies (``max_retries``), at most
    IN_FLIGHT_PER_WORKER per worker slot of the cluster in flight."""
    with _connected(spec.address) as ray:
        gpu = device.type == "cuda"
        task = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
                          max_retries=MAX_ATTEMPTS - 1)(analyse_unit)
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)) or 1
        queue, flying = units(jobs), {}
        while queue or flying:
            while queue and len(flying) < IN_FLIGHT_PER_WORKER * slots:
                u = queue.pop(0)
                ref = task.remote([jobs[i] for i in u.indices], opts, "cuda" if gpu else "cpu")
                flying[ref] = u
            ready, _ = ray.wait(list(flying), num_returns=1)
            for ref in ready:
                u = flying.pop(ref)
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayError as e:  # retries spent, or the task raised
                    yield from _give_up(u, jobs, f"Ray task failed: {str(e).splitlines()[0]}")
                    continue
                yield from ((u.indices[local], rows) for local, rows in got)


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise UsageError("--executor ray needs Ray: pip install 'llm-audit[ray]'") from e
    return ray


@contextlib.contextmanager
def session(opts: AuditOptions) -> Iterator[None]:
    """Keep an executor's workers up across several audits (a sweep): for ``ray`` the local
    cluster (or the connection) is started once, not once per checkpoint (~15 s each here)."""
    spec = parse_executor(opts.executor)
    if spec.kind != "ray":
        yield
        return
    with _connected(spec.address):
        yield


@contextlib.contextmanager
def _connected(address: str | None):
    """Ray, initialised for the block (cluster at `address`, or a local one) unless it already
    is (then left as it was)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def map_in_processes(fn: Callable, items: list, n: int,
                     size: Callable[[object], int]) -> Iterator[tuple[object, object]]:
    """(item, fn(item)) for each item, on n spawned workers (cores/n threads each), largest
    `size` first, as they finish. When a worker dies the pool breaks: the unfinished items
    are run again on a new pool, up to MAX_ATTEMPTS rounds; then AuditError."""
    done: set[int] = set()
    for _ in range(MAX_ATTEMPTS):
        todo = sorted((i for i in range(len(items)) if i not in done),
                      key=lambda i: -size(items[i]))
        if not todo:
            return
        pool = _pool(min(n, len(todo)), [None] * n, max(1, (os.cpu_count() or 1) // n))
        try:
            futs = {pool.submit(fn, items[i]): i for i in todo}
            for f in as_completed(futs):
                done.add(futs[f])
                yield items[futs[f]], f.result()
        except BrokenProcessPool:
            log.warning("a worker process died; its items are run again")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if len(done) < len(items):
        raise AuditError(f"worker processes died {MAX_ATTEMPTS} times running "
                         f"{', '.join(str(items[i]) for i in range(len(items)) if i not in done)}")
