"""The one floor plan of a toy experiment: a resumable training run measured on a schedule.

An experiment supplies its model, data and training step as an ``Experiment`` (below); ``run``
does the rest, the same for every experiment:

- resume: ``checkpoint_path``, when it exists, is loaded and handed to ``start`` (which may
  refuse it), then the run folders' CSVs are cut back to its step (``outputs.cut_back``);
- the loop: each step of ``grid()`` not yet measured is measured (``measure``); a checkpoint
  (``state``) is written every ``checkpoint_every`` steps, at the last step, and when the time
  limit is spent; ``advance(step)`` trains from ``step`` to ``step + 1``;
- progress: ``Resumed`` and ``Measured`` events go to a callback (the CLI prints them; nothing
  below prints).

``record`` writes one measured step of one model the same way for every experiment: the
audit with both trap rules (traps.csv, layers.csv), a snapshot, the history.csv row.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import outputs
from .audit import TRAP_CSV_COLUMNS, audit_both_rules, both_rules_columns
from .measure import SIGNAL_COLUMNS

HISTORY_COLUMNS = ("step", "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha",
                   "num_traps", *SIGNAL_COLUMNS, "lr", "lr_steps", "num_traps_tw")
LAYER_COLUMNS = both_rules_columns()


class Experiment(Protocol):
    """What an experiment supplies to ``run``."""

    steps: int  # train to this step
    checkpoint_every: int
    checkpoint_path: Path
    device: torch.device  # where the checkpoint's tensors are loaded
    folders: Sequence[Path]  # its run folders (history.csv, layers.csv, traps.csv, ...)

    def grid(self) -> Sequence[int]:
        """The steps to measure, sorted."""

    def start(self, checkpoint: dict | None) -> int:
        """Set up the state: fresh (None) or from a checkpoint dict; returns the step."""

    def advance(self, step: int) -> None:
        """One training step, from ``step`` to ``step + 1``."""

    def measure(self, step: int) -> Any:
        """Measure the current model(s) and write the rows; returns them (for progress)."""

    def state(self, step: int) -> dict:
        """The checkpoint dict at ``step`` (what ``start`` takes back)."""


@dataclass(frozen=True)
class Resumed:
    path: Path
    step: int


@dataclass(frozen=True)
class Measured:
    step: int
    result: Any  # what ``Experiment.measure`` returned
    elapsed_s: float  # since ``run`` started its loop
    steps_done: int  # training steps since then

    @property
    def rate(self) -> float:
        """Training steps per second (NaN before any time has passed)."""
        return self.steps_done / self.elapsed_s if self.elapsed_s > 0 else math.nan


Progress = Callable[[Resumed | Measured], None]


def run(exp: Experiment, *, progress: Progress | None = None, time_limit_s: float | None = None,
        measure_at_stop: bool = False, clock: Callable[[], float] = time.perf_counter) -> int:
    """Start or resume ``exp`` and train it to ``exp.steps``, or until ``time_limit_s`` seconds
    have passed (then checkpointed: run again to resume); returns the step it stopped at. With
    ``measure_at_stop``, a time-limited stop at a step not measured is measured too."""
    for folder in (*exp.folders, exp.checkpoint_path.parent):
        Path(folder).mkdir(parents=True, exist_ok=True)
    ck = outputs.load_checkpoint(exp.checkpoint_path, exp.device)
    step = start = exp.start(ck)  # raises if ck is not this experiment's
    if ck is not None:
        outputs.cut_back(exp.folders, step)
        if progress:
            progress(Resumed(exp.checkpoint_path, step))
    todo = deque(s for s in exp.grid() if s > step or step == 0)
    t0, done = clock(), 0
    while True:
        measured = bool(todo) and step == todo[0]
        if measured:
            todo.popleft()
            result = exp.measure(step)
            if progress:
                progress(Measured(step, result, clock() - t0, done))
        late = time_limit_s is not None and clock() - t0 > time_limit_s
        if late and measure_at_stop and step > start and not measured:
            exp.measure(step)
        if step > start and (step % exp.checkpoint_every == 0 or step == exp.steps or late):
            outputs.save_checkpoint(exp.checkpoint_path, exp.state(step))
        if step >= exp.steps or late:
            return step
        exp.advance(step)
        step += 1
        done += 1


def signal_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The generator of the comparison signals' random draws at ``step`` of run ``seed``."""
    return torch.Generator(device=device).manual_seed(seed * 7919 + step)


@dataclass(frozen=True)
class AuditSettings:
    seed: int
    device: str
    min_evals: int
    fix_fingers: str


def record(out: Path, step: int, fields: dict, weights, audit: AuditSettings,
           snapshot: torch.nn.Module | None = None,
           snapshot_dtype: torch.dtype | None = None) -> dict:
    """Audit ``weights`` (both trap rules) and write step ``step`` into the run folder ``out``:
    its traps (traps.csv), layer rows (layers.csv), a snapshot of ``snapshot`` if given, and the
    history row: ``fields`` (accuracies, losses, signals, lr, lr_steps) + the audit's. Returns
    the history row."""
    out = Path(out)
    audit_fields, layer_rows, traps = audit_both_rules(
        weights, step, seed=audit.seed, device=audit.device, min_evals=audit.min_evals,
        columns=LAYER_COLUMNS, fix_fingers=audit.fix_fingers)
    outputs.append_csv(out / "traps.csv", traps, TRAP_CSV_COLUMNS)
    outputs.append_csv(out / "layers.csv", layer_rows, LAYER_COLUMNS)
    if snapshot is not None:
        outputs.save_snapshot(snapshot, out, step, dtype=snapshot_dtype)
    row = {"step": step, **fields, **audit_fields}
    outputs.append_csv(out / "history.csv", [row], HISTORY_COLUMNS)
    return row
