"""toy_experiments.experiment: the shared loop (schedule, checkpoints, resume, time limit)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from toy_experiments import experiment, outputs


class Counter:
    """A toy experiment: the state is a number that each step adds the step to."""

    def __init__(self, out: Path, steps: int, grid=(0, 1, 3, 7, 10), every: int = 4):
        self.steps, self.checkpoint_every = steps, every
        self.checkpoint_path, self.device, self.folders = out / "checkpoint.pt", "cpu", (out,)
        self._grid, self.out, self.log = grid, out, []

    def grid(self):
        return self._grid

    def start(self, checkpoint):
        self.total = 0 if checkpoint is None else int(checkpoint["total"])
        return 0 if checkpoint is None else int(checkpoint["step"])

    def advance(self, step):
        self.log.append(("advance", step))
        self.total += step

    def measure(self, step):
        self.log.append(("measure", step))
        outputs.append_csv(self.out / "history.csv", [{"step": step, "total": self.total}],
                           ("step", "total"))
        return self.total

    def state(self, step):
        self.log.append(("checkpoint", step))
        return {"step": step, "total": torch.tensor(self.total)}


def test_run_measures_the_grid_and_checkpoints(tmp_path):
    exp, events = Counter(tmp_path, steps=10), []
    assert experiment.run(exp, progress=events.append) == 10
    assert [s for kind, s in exp.log if kind == "measure"] == [0, 1, 3, 7, 10]
    assert [s for kind, s in exp.log if kind == "checkpoint"] == [4, 8, 10]
    assert [s for kind, s in exp.log if kind == "advance"] == list(range(10))
    assert [e.step for e in events] == [0, 1, 3, 7, 10]
    assert [e.result for e in events] == [sum(range(s)) for s in (0, 1, 3, 7, 10)]
    assert events[-1].steps_done == 10
    assert int(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]) == 10


def test_resume_cuts_the_csvs_back_and_continues(tmp_path):
    experiment.run(Counter(tmp_path, steps=8))  # checkpoints at 4 and 8
    outputs.append_csv(tmp_path / "history.csv", [{"step": 9, "total": -1}], ("step", "total"))
    exp, events = Counter(tmp_path, steps=12), []
    experiment.run(exp, progress=events.append)
    assert events[0] == experiment.Resumed(tmp_path / "checkpoint.pt", 8)
    assert exp.log[0] == ("advance", 8) and ("checkpoint", 8) not in exp.log
    h = pd.read_csv(tmp_path / "history.csv")
    assert list(h["step"]) == [0, 1, 3, 7, 10]  # 9 (after the checkpoint) was cut
    assert list(h["total"]) == [sum(range(s)) for s in (0, 1, 3, 7, 10)]


def _clock(times):
    it = iter(times)
    return lambda: next(it)


def test_time_limit_stops_checkpointed_and_measures_at_stop(tmp_path):
    ticks = [0, 0, 0, 5]  # the clock at the start, then one reading per step: late at 2
    exp = Counter(tmp_path, steps=10)
    stop = experiment.run(exp, time_limit_s=1.0, measure_at_stop=True, clock=_clock(ticks))
    assert stop == 2
    assert exp.log[-2:] == [("measure", 2), ("checkpoint", 2)]
    exp = Counter(tmp_path / "b", steps=10)  # late at a grid step: measured once
    experiment.run(exp, time_limit_s=1.0, measure_at_stop=True, clock=_clock([0, 0, 5]))
    assert [s for kind, s in exp.log if kind == "measure"] == [0, 1]
    assert exp.log[-1] == ("checkpoint", 1)
