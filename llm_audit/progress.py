"""Progress of a long audit: events the pipeline emits, and observers that show or log them.

`ProgressBar` draws matrices done/total, bytes read and the ETA on stderr (tqdm); `JsonLog`
writes one JSON line per matrix plus start and end lines, for machines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .jsonio import dumps
from .records import MatrixResult

if TYPE_CHECKING:
    from .summary import AuditSummary


@dataclass(frozen=True)
class AuditStarted:
    model: str
    jobs_total: int
    bytes_total: int
    jobs_cached: int  # jobs whose rows come from an earlier, interrupted run (--resume)


@dataclass(frozen=True)
class JobDone:
    name: str
    rows: tuple[MatrixResult, ...]
    jobs_done: int
    jobs_total: int
    bytes_done: int
    bytes_total: int
    cached: bool  # rows reused from the journal, nothing recomputed


Event = AuditStarted | JobDone
Observer = Callable[[Event], None]


def fan_out(*observers: Observer | None) -> Observer:
    """One observer that forwards each event to all the given ones."""
    active = [o for o in observers if o is not None]

    def emit(event: Event) -> None:
        for o in active:
            o(event)

    return emit


class ProgressBar:
    """A tqdm bar in bytes (ETA from bytes read) with matrices done/total (context manager)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None
        self.matrices = 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: Event) -> None:
        from tqdm import tqdm

        if isinstance(event, AuditStarted):
            if self.bar is not None:  # the next checkpoint of a sweep: a new bar
                self.bar.close()
            self.matrices = 0
            self.bar = tqdm(total=event.bytes_total, unit="B", unit_scale=True,
                            file=self.stream, leave=False, desc=event.model[:30],
                            mininterval=0.5)
            return
        if self.bar is None:
            return
        self.matrices += len(event.rows)
        self.bar.set_postfix_str(f"jobs {event.jobs_done}/{event.jobs_total}, "
                                 f"matrices {self.matrices}", refresh=False)
        self.bar.update(event.bytes_done - self.bar.n)


class JsonLog:
    """JSON lines to a file: {"event": "start"|"matrix"|"end", ...} (context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.t0 = time.time()

    def __enter__(self) -> JsonLog:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.file.close()
        except OSError as e:
            if exc[0] is None:
                raise OSError(e.errno, e.strerror, str(self.path)) from e

    def write(self, event: str, **fields) -> None:
        line = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            self.file.write(dumps(line, indent=None) + "\n")
            self.file.flush()
        except OSError as e:  # e.g. ENOSPC: say which file (the OSError of a write does not)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def __call__(self, event: Event) -> None:
        if isinstance(event, AuditStarted):
            self.write("start", model=event.model, jobs=event.jobs_total,
                       bytes=event.bytes_total, jobs_resumed=event.jobs_cached)
            return
        for r in event.rows:
            self.write("matrix", name=r.name, status=r.status, alpha=r.alpha,
                       rand_num_spikes=r.rand_num_spikes, warning=r.warning,
                       seconds=r.seconds, resumed=event.cached,
                       jobs_done=event.jobs_done, jobs_total=event.jobs_total,
                       bytes_done=event.bytes_done)

    def end(self, summary: AuditSummary, exit_code: int) -> None:
        keys = ("model", "matrices_analysed", "matrices_failed", "tensors_skipped", "mean_alpha",
                "total_traps", "matrices_with_traps", "elapsed_seconds")
        self.write("end", exit_code=exit_code, **{k: getattr(summary, k) for k in keys})
