"""Measurement schedules: the steps at which a toy run is measured.

The learning-rate clock: with Adam the distance travelled is about lr per step, so runs at
different constant learning rates are compared at equal ``lr_steps`` = Σ lr (NOTES §3). Every
grid here is a sorted list of distinct steps, 0 and the last step included.
"""

from __future__ import annotations

import math

NOTEBOOK_LR = 5e-4  # the authors' notebook: the reference clock of the notebook grid


def notebook_grid(total_steps: int) -> list[int]:
    """The notebook's logging steps: every step below 30, every 10th below 150, then every
    ceil(total/150)-th (the cell measures before the update, so step s = after s updates),
    and the last step."""
    every = max(1, math.ceil(total_steps / 150))
    steps = {s for s in range(total_steps + 1)
             if s < 30 or (s < 150 and s % 10 == 0) or s % every == 0}
    return sorted(steps | {total_steps})


def lr_clock_grid(lr_steps: float, lr: float, ref_lr: float = NOTEBOOK_LR) -> list[int]:
    """The notebook grid of a ``ref_lr`` run to ``lr_steps``, moved onto a run at ``lr``: the
    step of each point is the one with the same Σ lr (rounded; duplicates merged)."""
    ref_total = round(lr_steps / ref_lr)
    total = round(lr_steps / lr)
    return sorted({min(total, round(s * ref_lr / lr)) for s in notebook_grid(ref_total)}
                  | {total})


def collapse_grid(total_steps: int, log_points: int = 60, linear_from: float = 0.1) -> list[int]:
    """``log_points`` steps evenly spaced in log(step) (= log lr_steps at constant lr) from
    step 1 to the end, plus the notebook's linear grid (every ceil(total/150) steps) from
    ``linear_from`` × total on, where the late phases happen."""
    steps = {0, total_steps}
    if total_steps >= 1:
        for i in range(log_points):
            steps.add(round(total_steps ** (i / max(1, log_points - 1))))
    every = max(1, math.ceil(total_steps / 150))
    start = math.ceil(linear_from * total_steps / every) * every
    steps.update(range(start, total_steps + 1, every))
    return sorted(steps)


def thin(grid: list[int], keep: int) -> list[int]:
    """About ``keep`` steps of ``grid`` evenly spread over its points, the last one included."""
    if keep >= len(grid):
        return list(grid)
    k = math.ceil(len(grid) / keep)
    return sorted(set(grid[::-k][::-1]))


def log_schedule(total_steps: int, per_decade: int = 12, first: int = 1) -> list[int]:
    """Steps 0, first, ..., total_steps, log-spaced with ``per_decade`` points per decade."""
    if total_steps < 0 or per_decade < 1 or first < 1:
        raise ValueError("total_steps >= 0, per_decade >= 1 and first >= 1 are required")
    steps = {0, total_steps}
    if total_steps >= first:
        n = math.ceil(per_decade * math.log10(total_steps / first)) + 1
        for i in range(n):
            steps.add(min(total_steps, round(first * 10 ** (i / per_decade))))
    return sorted(steps)


def log_grid(total_steps: int, per_decade: int, extra: tuple[int, ...] = ()) -> list[int]:
    """``log_schedule`` plus the ``extra`` steps (any beyond ``total_steps`` are never reached)."""
    return sorted(set(log_schedule(total_steps, per_decade)) | set(extra))
