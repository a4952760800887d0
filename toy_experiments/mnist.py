"""MNIST MLP3 anti-grokking (Prakash & Martin 2026, NOTES §3), audited as it trains.

784→200→200→10 ReLU MLP, PyTorch default init then all parameters × 8, MSE on one-hot targets,
AdamW (betas 0.9/0.999, weight decay 0), batch 200 of the stratified 1000-image subset, full 10k
test set. The training loop keeps the whole subset on the device and draws each epoch's batch
order from a generator seeded with (seed, epoch), so a resumed run replays the same batches.
At log-spaced steps: accuracies and losses, the comparison signals, the data-free audit through
``llm_audit.monitor_weights``, and a ``.safetensors`` snapshot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llm_audit import AuditOptions

from . import measure
from .data import Split, mnist_subsets
from .mnist_report import make_figures
from .optim import AdamW

HISTORY_COLUMNS = ("step", "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha",
                   "num_traps", *measure.SIGNAL_COLUMNS)
TRAP_RULES = ("ww", "tw")
RULE_COLUMNS = ("rand_num_spikes", "max_rand_eval", "trap_threshold")
LAYER_COLUMNS = (*measure.LAYER_COLUMNS,
                 *(f"{c}_{r}" for r in TRAP_RULES for c in RULE_COLUMNS))
NORM_EVERY = 50  # steps between recomputations of the parameter norm (ramp_until_norm)
MIN_EVALS = 50  # audit fc1 (200x784) and fc2 (200x200) as the paper does; fc3 has 10 eigenvalues


@dataclass(frozen=True)
class Preset:
    steps: int
    dtype: str  # float32 | float64
    lr: float  # AdamW learning rate (before the ramp)
    ramp: tuple[int, int, float] | None = None  # (start, end, high lr): geometric lr ramp
    ramp_until_norm: float | None = None  # back to ``lr`` once ‖θ‖₂ reaches this (norm clock)
    init_scale: float = 8.0
    batch: int = 200
    per_decade: int = 12  # measurement points per decade of steps
    checkpoint_every: int = 100_000  # resumable checkpoint period (steps)
    n_test: int | None = None  # None: the full 10k test set


PRESETS = {
    "smoke": Preset(steps=300, dtype="float32", lr=5e-3, per_decade=3, checkpoint_every=150),
    # quick: 5e-3 through train saturation (pre-grokking), a geometric ramp to 2e-2 (grokking
    # sooner), held until the weight norm reaches 400 (where the paper's run collapses), then
    # 5e-3 again so the training set is refitted (see reports/toy/mnist/README.md)
    "quick": Preset(steps=250_000, dtype="float32", lr=5e-3, ramp=(10_000, 15_000, 2e-2),
                    ramp_until_norm=400.0, per_decade=16, checkpoint_every=25_000),
    "paper": Preset(steps=10_000_000, dtype="float64", lr=5e-4, per_decade=12,
                    checkpoint_every=100_000),
}


class MLP3(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, width: int = 200):
        super().__init__()
        self.fc1 = nn.Linear(784, width, dtype=dtype)
        self.fc2 = nn.Linear(width, width, dtype=dtype)
        self.fc3 = nn.Linear(width, 10, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def forward_with_hiddens(model: MLP3, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [hidden 1, hidden 2]): the ``measure.Forward`` of this model."""
    h1 = torch.relu(model.fc1(x))
    h2 = torch.relu(model.fc2(h1))
    return model.fc3(h2), [h1, h2]


def make_model(seed: int, dtype: torch.dtype, device: torch.device,
               init_scale: float = 8.0) -> MLP3:
    """PyTorch's default Linear init from a seeded generator, then every parameter × init_scale."""
    model = MLP3(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (model.fc1, model.fc2, model.fc3):
            bound = 1.0 / math.sqrt(lin.in_features)  # = kaiming_uniform(a=√5) and bias bound
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=g, dtype=dtype) * 2 - 1)
                             * bound * init_scale)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=g, dtype=dtype) * 2 - 1)
                           * bound * init_scale)
    return model.to(device)


def learning_rate(p: Preset, step: int, norm: float) -> float:
    """The lr of step ``step`` (1-based): ``p.lr``, or with ``p.ramp`` a geometric ramp from
    ``p.lr`` to a high lr held until the parameter norm reaches ``p.ramp_until_norm`` (the
    weight norm is the clock of the late phases), then ``p.lr`` again. ``norm`` is the largest
    norm seen so far, so the switch happens once (saved in the checkpoint for resuming)."""
    if p.ramp is None or step <= p.ramp[0]:
        return p.lr
    if p.ramp_until_norm is not None and norm >= p.ramp_until_norm:
        return p.lr
    start, end, final = p.ramp
    if step >= end:
        return final
    return p.lr * (final / p.lr) ** ((step - start) / (end - start))


def batch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


@torch.no_grad()
def evaluate(model: MLP3, data: Split, chunk: int = 5000) -> tuple[float, float]:
    """(accuracy, MSE loss on one-hot targets) over a whole split."""
    correct, sq = 0, 0.0
    for i in range(0, len(data.y), chunk):
        x, y = data.x[i:i + chunk], data.y[i:i + chunk]
        out = model(x)
        correct += int((out.argmax(-1) == y).sum())
        sq += float(((out - nn.functional.one_hot(y, 10).to(out.dtype)) ** 2).sum())
    return correct / len(data.y), sq / (10 * len(data.y))


@dataclass(frozen=True)
class Run:
    preset: Preset
    out: Path
    seed: int
    device: torch.device
    data_dir: str | None = None
    trap_rule: str = "ww"
    time_limit_s: float | None = None  # stop (checkpoint, figures) after this much wall time


def audit_both_rules(run: Run, model: MLP3, step: int) -> tuple[dict, list[dict]]:
    """The audit with ``run.trap_rule`` (history's num_traps), plus the other rule's trap
    counts in layers.csv: 'ww' counts the rank-1 spike of a non-zero entry mean as a trap,
    'tw' removes the mean first, so the two together separate traps from that confound."""
    rows = {}
    for rule in TRAP_RULES:
        opts = AuditOptions(seed=run.seed, device=str(run.device), trap_rule=rule)
        rows[rule] = measure.audit_rows(model, step, opts, min_evals=MIN_EVALS)
    audit, layer_rows = rows[run.trap_rule]
    for row, other_ww, other_tw in zip(layer_rows, rows["ww"][1], rows["tw"][1], strict=True):
        for rule, other in (("ww", other_ww), ("tw", other_tw)):
            row.update({f"{c}_{rule}": other[c] for c in RULE_COLUMNS})
    return audit, layer_rows


def measure_step(run: Run, model: MLP3, train: Split, test: Split, step: int) -> dict:
    """One row of history.csv (+ layers.csv rows and a snapshot written)."""
    train_acc, train_loss = evaluate(model, train)
    test_acc, test_loss = evaluate(model, test)
    gen = torch.Generator(device=run.device).manual_seed(run.seed * 7919 + step)
    signals = measure.comparison_signals(model, train.x, forward_with_hiddens, generator=gen)
    audit, layer_rows = audit_both_rules(run, model, step)
    measure.append_csv(run.out / "layers.csv", layer_rows, LAYER_COLUMNS)
    measure.save_snapshot(model, run.out, step)
    row = dict(step=step, train_acc=train_acc, test_acc=test_acc, train_loss=train_loss,
               test_loss=test_loss, **signals, **audit)
    measure.append_csv(run.out / "history.csv", [row], HISTORY_COLUMNS)
    return row


def save_checkpoint(run: Run, model: MLP3, opt: AdamW, step: int, peak_norm: float) -> None:
    path = run.out / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "peak_norm": peak_norm, "model": model.state_dict(),
                "opt": opt.state_dict(), "seed": run.seed, "preset": run.preset.__dict__}, tmp)
    tmp.replace(path)


def load_checkpoint(run: Run, model: MLP3, opt: AdamW) -> tuple[int, float]:
    """Resume from ``out/checkpoint.pt`` when there is one: (its step, the peak norm so far)."""
    ck = measure.load_checkpoint(run.out, model, opt, run.device)
    return (0, 0.0) if ck is None else (int(ck["step"]), float(ck.get("peak_norm", 0.0)))


def train(run: Run) -> Path:
    """Train with the preset, measuring at log-spaced steps; write CSVs, snapshots, figures."""
    p = run.preset
    dtype = getattr(torch, p.dtype)
    run.out.mkdir(parents=True, exist_ok=True)
    tr, te = mnist_subsets(run.data_dir, n_test=p.n_test)
    train_set = Split(tr.x.to(run.device, dtype), tr.y.to(run.device))
    test_set = Split(te.x.to(run.device, dtype), te.y.to(run.device))
    targets = nn.functional.one_hot(train_set.y, 10).to(dtype)
    model = make_model(run.seed, dtype, run.device, p.init_scale)
    opt = AdamW(list(model.parameters()), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step, resumed_norm = load_checkpoint(run, model, opt)
    todo = [s for s in measure.log_schedule(p.steps, p.per_decade) if s > step or step == 0]
    t0, steps_done = time.perf_counter(), 0
    if step == 0 and todo and todo[0] == 0:
        measure.print_progress(measure_step(run, model, train_set, test_set, 0), t0, 0)
        todo = todo[1:]
    n, order, norm = len(train_set.y), None, max(resumed_norm, measure.l2_norm(model))
    while step < p.steps:
        epoch, k = divmod(step * p.batch, n)
        if order is None or k == 0:
            order = batch_order(run.seed, epoch, n, run.device)
        idx = order[k:k + p.batch]
        step += 1
        loss = ((model(train_set.x[idx]) - targets[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if step % NORM_EVERY == 1:
            norm = max(norm, measure.l2_norm(model))
        opt.step(learning_rate(p, step, norm))
        steps_done += 1
        measured = bool(todo) and step == todo[0]
        if measured:
            todo = todo[1:]
            row = measure_step(run, model, train_set, test_set, step)
            measure.print_progress(row, t0, steps_done)
        out_of_time = run.time_limit_s is not None and time.perf_counter() - t0 > run.time_limit_s
        if step % p.checkpoint_every == 0 or step == p.steps or out_of_time:
            save_checkpoint(run, model, opt, step, norm)
        if out_of_time:
            print(f"time limit reached at step {step}: stopping (rerun to resume)", flush=True)
            if not measured:
                row = measure_step(run, model, train_set, test_set, step)
            measure.print_progress(row, t0, steps_done)
            break
    make_figures(run.out)
    return run.out


def preset_with(name: str, steps: int | None) -> Preset:
    p = PRESETS[name]
    return p if steps is None else replace(p, steps=steps)
