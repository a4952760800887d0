"""Training and measuring the modular-addition transformer (presets, schedule, resumable loop).

Full-batch AdamW on the training pairs, loss at the last position. A preset's schedule is a
list of segments (first step, lr, weight decay): the paper preset keeps Nanda's recipe for the
whole run; the quick preset changes the optimiser once, after grokking (see PRESETS).
At log-spaced steps: accuracies and losses, the comparison signals, the data-free audit through
``llm_audit.monitor_weights`` (``measure.audit_rows``), and a ``.safetensors`` snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import measure
from . import modadd as ma
from .modadd import ModAddData, ModAddTransformer
from .optim import AdamW

HISTORY_COLUMNS = ("step", "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha",
                   "num_traps", *measure.SIGNAL_COLUMNS, "lr", "lr_steps", "num_traps_tw")
LAYER_COLUMNS = measure.both_rules_columns()


@dataclass(frozen=True)
class Preset:
    p: int
    train_frac: float
    steps: int
    # (first step, lr, weight decay, Adam eps): the segment in force from that step on (1-based)
    schedule: tuple[tuple[int, float, float, float], ...] = ((1, 1e-3, 1.0, 1e-8),)
    dtype: str = "float32"
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 10  # linear lr warm-up over the first steps
    # (start, end, final lr): geometric lr ramp from the segment's lr at ``start`` to ``final``
    ramp: tuple[int, int, float] | None = None
    per_decade: int = 12  # measurement points per decade of steps
    checkpoint_every: int = 10_000
    extra_steps: tuple[int, ...] = field(default=())  # measured in addition to the log grid


PRESETS = {
    "smoke": Preset(p=23, train_frac=0.5, steps=200, schedule=((1, 3e-3, 1.0, 1e-8),),
                    per_decade=3, checkpoint_every=100),
    # Nanda et al.'s canonical recipe (NOTES §3), on this CPU past grokking (~13-14.5k steps)
    "nanda": Preset(p=113, train_frac=0.3, steps=30_000, per_decade=16, checkpoint_every=5_000,
                    extra_steps=tuple(range(500, 30_001, 500))),
    # the long extension for the ensemble (weight decay x seeds), meant for a GPU: sparser
    # measurements, since every point audits every member
    "ensemble": Preset(p=113, train_frac=0.3, steps=1_000_000, per_decade=8,
                       checkpoint_every=20_000),
    # Nanda et al.'s recipe, trained far beyond grokking (~14k steps); meant for a GPU.
    "paper": Preset(p=113, train_frac=0.3, steps=1_000_000, per_decade=16,
                    checkpoint_every=20_000),
    # Designed for a 2-core CPU in < 60 min (see reports/toy/modadd/README.md): p 59, half the
    # pairs, Nanda's recipe at 3x the lr until step 2000 (memorisation, grokking), then weak
    # weight decay, a tiny Adam eps (sign-like updates) and a geometric lr ramp to 2e-2, held.
    "quick": Preset(p=59, train_frac=0.5, steps=30_000,
                    schedule=((1, 3e-3, 1.0, 1e-8), (2_000, 3e-3, 0.3, 1e-16)),
                    ramp=(2_000, 6_000, 2e-2), per_decade=20, checkpoint_every=2_000,
                    extra_steps=tuple(range(3_000, 30_001, 1_000))),
}


def preset_with(name: str, steps: int | None = None, p: int | None = None,
                train_frac: float | None = None) -> Preset:
    pr = PRESETS[name]
    changes = {k: v for k, v in dict(steps=steps, p=p, train_frac=train_frac).items()
               if v is not None}
    return replace(pr, **changes)


def hyper(pr: Preset, step: int) -> tuple[float, float, float]:
    """(lr, weight decay, eps) used for step ``step`` (1-based), warm-up and ramp included."""
    lr, wd, eps = pr.schedule[0][1:]
    for first, seg_lr, seg_wd, seg_eps in pr.schedule:
        if step >= first:
            lr, wd, eps = seg_lr, seg_wd, seg_eps
    if pr.ramp is not None and step > pr.ramp[0]:
        start, end, final = pr.ramp
        lr = lr * (final / lr) ** (min(step - start, end - start) / (end - start))
    return lr * min(1.0, step / pr.warmup), wd, eps


@dataclass(frozen=True)
class Run:
    preset: Preset
    out: Path
    seed: int = 0
    device: torch.device = torch.device("cpu")


def measure_step(run: Run, model: ModAddTransformer, data: ModAddData, step: int,
                 lr_steps: float = 0.0) -> dict:
    """One row of history.csv (+ layers.csv rows and a snapshot written)."""
    train_acc, train_loss = ma.evaluate(model, data.train_x, data.train_y)
    test_acc, test_loss = ma.evaluate(model, data.test_x, data.test_y)
    gen = torch.Generator(device=run.device).manual_seed(run.seed * 7919 + step)
    signals = measure.comparison_signals(model, data.train_x, ma.forward_with_hiddens,
                                         generator=gen)
    audit, layer_rows = measure.audit_both_rules(
        ma.audited_weights(model), step, run.out, seed=run.seed, device=str(run.device),
        min_evals=1, columns=LAYER_COLUMNS, fix_fingers="none")
    measure.append_csv(run.out / "layers.csv", layer_rows, LAYER_COLUMNS)
    measure.save_snapshot(model, run.out, step)
    lr = hyper(run.preset, max(step, 1))[0]
    row = dict(step=step, train_acc=train_acc, test_acc=test_acc, train_loss=train_loss,
               test_loss=test_loss, **signals, **audit, lr=lr, lr_steps=lr_steps)
    measure.append_csv(run.out / "history.csv", [row], HISTORY_COLUMNS)
    return row


def _lr_steps(pr: Preset, step: int) -> float:
    """Σ lr over steps 1..step (warm-up and ramps included)."""
    return sum(hyper(pr, s)[0] for s in range(1, step + 1))


def save_checkpoint(run: Run, model: ModAddTransformer, opt: AdamW,
                    step: int) -> None:
    path = run.out / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                "seed": run.seed}, tmp)
    tmp.replace(path)


def load_checkpoint(run: Run, model: ModAddTransformer, opt: AdamW) -> int:
    """Resume from ``out/checkpoint.pt`` when there is one: returns its step (0 if none)."""
    ck = measure.load_checkpoint(run.out, model, opt, run.device)
    return 0 if ck is None else int(ck["step"])


def setup(run: Run) -> tuple[ModAddData, ModAddTransformer, AdamW]:
    """Data split and init from one seeded generator, AdamW with the preset's betas."""
    pr = run.preset
    g = torch.Generator().manual_seed(run.seed)
    data = ma.make_data(pr.p, pr.train_frac, g, run.device)
    model = ma.init_model(ma.ModelConfig(p=pr.p), g, getattr(torch, pr.dtype), run.device)
    _, _, wd, eps = pr.schedule[0]
    opt = AdamW(list(model.parameters()), betas=pr.betas, eps=eps, weight_decay=wd)
    return data, model, opt


def train(run: Run) -> Path:
    """Train with the preset, measuring at log-spaced steps; write CSVs, snapshots, figures."""
    from .modadd_report import make_figures

    pr = run.preset
    run.out.mkdir(parents=True, exist_ok=True)
    data, model, opt = setup(run)
    step = load_checkpoint(run, model, opt)
    lr_sum = _lr_steps(pr, step)  # Σ lr so far (once, on resuming), then accumulated
    grid = sorted(set(measure.log_schedule(pr.steps, pr.per_decade)) | set(pr.extra_steps))
    todo = [s for s in grid if s > step or step == 0]
    t0, done = time.perf_counter(), 0
    if todo and todo[0] == 0:
        measure.print_progress(measure_step(run, model, data, 0), t0, 0)
        todo = todo[1:]
    while step < pr.steps:
        step += 1
        lr, opt.weight_decay, opt.eps = hyper(pr, step)
        lr_sum += lr
        opt.zero_grad()
        ma.loss_fn(model(data.train_x), data.train_y).backward()
        opt.step(lr)
        done += 1
        if todo and step == todo[0]:
            todo = todo[1:]
            measure.print_progress(measure_step(run, model, data, step, lr_sum), t0, done)
        if step % pr.checkpoint_every == 0 or step == pr.steps:
            save_checkpoint(run, model, opt, step)
    make_figures(run.out)
    return run.out


