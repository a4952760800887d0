"""Overlap I/O with compute: read and decode the next jobs in a background thread.

The thread runs `decode` on its own CUDA stream (bytes go through pinned host memory), waits
for that stream, and hands finished jobs over a queue bounded in bytes: decoded jobs the
consumer has not taken yet hold at most `budget` bytes of float32 matrices (one job always,
however big), so what waits in memory does not grow with the model. The consumer times how
long it waits (the part of I/O compute did not hide).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .decode import DecodedMatrix, TensorReader, decode
from .errors import AuditError
from .routing import MatrixJob

_POLL = 0.1  # seconds between checks for a consumer that went away


@dataclass(frozen=True)
class DecodedJob:
    """One job's matrices (empty when `error` says why it could not be decoded)."""

    job: MatrixJob
    matrices: tuple[DecodedMatrix, ...]
    read_seconds: float
    decode_seconds: float
    wait_seconds: float = 0.0  # how long the consumer waited for it
    error: AuditError | None = None


def job_bytes(job: MatrixJob) -> int:
    """What a job's matrices take decoded (float32)."""
    return 4 * math.prod(job.matrix_shape)


class _Budget:
    """Bytes of decoded jobs handed over but not yet taken; `take` waits while a job would
    overflow the limit (unless nothing is waiting: one job always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.cv = threading.Condition()

    def take(self, n: int, stop: threading.Event) -> None:
        with self.cv:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self.cv.wait(_POLL)
            self.used += n

    def give_back(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


@contextlib.contextmanager
def prefetch(jobs: list[MatrixJob], device: torch.device,
             budget: int) -> Iterator[Iterator[DecodedJob]]:
    """``with prefetch(jobs, device, budget) as decoded: for d in decoded: ...`` — the jobs in
    order, decoded ahead in a background thread while at most `budget` bytes of them wait.
    Leaving the block early stops the thread; an unexpected exception in it is re-raised in
    the consumer."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    room = _Budget(budget)
    worker = threading.Thread(target=_work, args=(jobs, device, q, stop, room),
                              name="llm-audit-reader", daemon=True)
    worker.start()
    try:
        yield _consume(q, len(jobs), room)
    finally:
        stop.set()
        worker.join()


def _consume(q: queue.Queue, n: int, room: _Budget) -> Iterator[DecodedJob]:
    cuda = torch.cuda.is_available()
    for _ in range(n):
        t0 = time.perf_counter()
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        room.give_back(job_bytes(item.job))
        waited = time.perf_counter() - t0
        if cuda:
            for m in item.matrices:
                if m.W.is_cuda:  # made on the reader's stream, used on this one
                    m.W.record_stream(torch.cuda.current_stream(m.W.device))
        yield DecodedJob(item.job, item.matrices, item.read_seconds, item.decode_seconds,
                         waited, item.error)


def _work(jobs: list[MatrixJob], device: torch.device, q: queue.Queue,
          stop: threading.Event, room: _Budget) -> None:
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    try:
        with TensorReader(pin=stream is not None) as reader, _on(stream):
            for job in jobs:
                room.take(job_bytes(job), stop)
                if stop.is_set():
                    return
                q.put(_decode_one(job, reader, device, stream))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        q.put(e)


def _decode_one(job: MatrixJob, reader: TensorReader, device: torch.device,
                stream: torch.cuda.Stream | None) -> DecodedJob:
    t0, r0 = time.perf_counter(), reader.read_seconds
    try:
        matrices, error = tuple(decode(job, reader, device)), None
    except AuditError as e:  # this job's bytes could not be decoded: a failed row later
        matrices, error = (), e
    if stream is not None:
        stream.synchronize()  # the matrices are complete before another stream sees them
    read = reader.read_seconds - r0
    return DecodedJob(job, matrices, read, time.perf_counter() - t0 - read, error=error)


def _on(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
