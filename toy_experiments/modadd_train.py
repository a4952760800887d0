"""Training and measuring the modular-addition transformer: presets, schedule, the trainers.

Full-batch AdamW on the training pairs, loss at the last position. A preset's schedule is a
list of segments (first step, lr, weight decay, eps): the paper preset keeps Nanda's recipe for
the whole run; the quick preset changes the optimiser once, after grokking (see PRESETS).
At log-spaced steps (plus a preset's extra steps): accuracies and losses, the comparison
signals, the data-free audit with both trap rules and a ``.safetensors`` snapshot
(``measure_step``, through ``experiment.record``).

Two experiments on ``experiment.run`` (the shared loop, checkpoint and resume):

- ``SingleRun`` (``train``): one ``ModAddTransformer`` with ``optim.AdamW``;
- ``EnsembleRun`` (``train_ensemble``): the long weight-decay × seed searches. Every parameter
  of the E members is one stacked tensor (E, ...); one forward/backward over all members
  (``modadd.stacked_logits``, the members' losses summed: their gradients stay independent)
  and one ``torch.optim.AdamW(fused=True)`` step update them all. Each member has its own
  data split and init (its seed, exactly as ``setup``) and its own weight decay, applied as
  AdamW does (p ← p·(1 − lr·wd) before the Adam update; the optimizer itself runs with 0), so
  a member follows the trajectory of the same model trained alone (tests/test_toy_modadd.py).
  Members are measured as single runs are, each into its own folder ``OUT/<member>/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from . import experiment, measure, schedules
from . import modadd as ma
from .modadd import ModAddData, ModAddTransformer
from .optim import AdamW

log = logging.getLogger(__name__)

HISTORY_COLUMNS = experiment.HISTORY_COLUMNS
LAYER_COLUMNS = experiment.LAYER_COLUMNS


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

    def measured_steps(self) -> list[int]:
        return schedules.log_grid(self.steps, self.per_decade, self.extra_steps)


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


def lr_sum(pr: Preset, step: int) -> float:
    """Σ lr over steps 1..step (warm-up and ramps included)."""
    return sum((hyper(pr, s)[0] for s in range(1, step + 1)), 0.0)


@dataclass(frozen=True)
class Run:
    preset: Preset
    out: Path
    seed: int = 0
    device: torch.device = torch.device("cpu")
    compile: bool = False  # torch.compile the forward + loss (1.4x steps/s on CPU, measured)


def setup(run: Run) -> tuple[ModAddData, ModAddTransformer, AdamW]:
    """Data split and init from one seeded generator, AdamW with the preset's betas."""
    pr = run.preset
    g = torch.Generator().manual_seed(run.seed)
    data = ma.make_data(pr.p, pr.train_frac, g, run.device)
    model = ma.init_model(ma.ModelConfig(p=pr.p), g, getattr(torch, pr.dtype), run.device)
    _, _, wd, eps = pr.schedule[0]
    opt = AdamW(list(model.parameters()), betas=pr.betas, eps=eps, weight_decay=wd)
    return data, model, opt


def measure_step(run: Run, model: ModAddTransformer, data: ModAddData, step: int,
                 lr_steps: float = 0.0) -> dict:
    """One row of history.csv (+ layers.csv and traps.csv rows and a snapshot written)."""
    train_acc, train_loss = ma.evaluate(model, data.train_x, data.train_y)
    test_acc, test_loss = ma.evaluate(model, data.test_x, data.test_y)
    gen = experiment.signal_generator(run.seed, step, run.device)
    signals = measure.comparison_signals(model, data.train_x, ma.forward_with_hiddens,
                                         generator=gen)
    fields = dict(train_acc=train_acc, test_acc=test_acc, train_loss=train_loss,
                  test_loss=test_loss, **signals, lr=hyper(run.preset, max(step, 1))[0],
                  lr_steps=lr_steps)
    audit = experiment.AuditSettings(seed=run.seed, device=str(run.device), min_evals=1,
                                     fix_fingers="none")
    return experiment.record(run.out, step, fields, ma.audited_weights(model), audit,
                             snapshot=model)


def training_loss(model: ModAddTransformer, compile: bool = False):
    """(x, y) -> the training loss of `model`; with `compile`, through ``torch.compile``
    (inductor: C++ kernels on CPU, compiled on the first step, ~3-30 s). Same gradients to
    float32 round-off (≤ 3e-6 relative, measured), not bit-equal: a compiled run's trajectory
    is another rounding of the same one (benchmarks/modadd_fast_step.py: 1.44x steps/s)."""
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ma.loss_fn(model(x), y)
    return torch.compile(loss, dynamic=False) if compile else loss


class SingleRun:
    """One model as an ``experiment.Experiment``; its checkpoint: step, model, opt, seed."""

    def __init__(self, run: Run):
        pr = self.preset = run.preset
        self.run, self.steps, self.checkpoint_every = run, pr.steps, pr.checkpoint_every
        self.checkpoint_path = run.out / "checkpoint.pt"
        self.device, self.folders = run.device, (run.out,)
        self.data, self.model, self.opt = setup(run)
        self.lr_steps = 0.0  # Σ lr so far (computed once on resuming, then accumulated)
        self.loss = training_loss(self.model, run.compile)

    def grid(self) -> list[int]:
        return self.preset.measured_steps()

    def start(self, checkpoint: dict | None) -> int:
        step = 0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.opt.load_state_dict(checkpoint["opt"])
            step = int(checkpoint["step"])
        self.lr_steps = lr_sum(self.preset, step)
        return step

    def advance(self, step: int) -> None:
        lr, self.opt.weight_decay, self.opt.eps = hyper(self.preset, step + 1)
        self.lr_steps += lr
        self.opt.zero_grad()
        self.loss(self.data.train_x, self.data.train_y).backward()
        self.opt.step(lr)

    def measure(self, step: int) -> dict:
        return measure_step(self.run, self.model, self.data, step, self.lr_steps)

    def state(self, step: int) -> dict:
        return {"step": step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "seed": self.run.seed}


def train(run: Run, progress: experiment.Progress | None = None) -> Path:
    """Train with the preset, measuring on its grid; write CSVs, snapshots, figures."""
    from .modadd_report import make_figures

    experiment.run(SingleRun(run), progress=progress)
    make_figures(run.out)
    return run.out


# ---------------------------------------------------------------- many models at once

@dataclass(frozen=True)
class Member:
    seed: int
    weight_decay: float

    @property
    def name(self) -> str:
        return f"wd{self.weight_decay:g}_seed{self.seed}"


@dataclass(frozen=True)
class Ensemble:
    members: tuple[Member, ...]
    preset: Preset  # the schedule (its first segment's weight decay is replaced per member)
    out: Path
    device: torch.device = torch.device("cpu")
    # torch.compile the stacked forward + loss: "auto" = on CUDA only, as CUDA graphs (mode
    # reduce-overhead: one replay per step instead of ~100 small launches); on CPU it measured
    # 1.05-1.12x for two members, not worth its 20 s of compilation
    compile: str = "auto"

    def member_run(self, m: Member) -> Run:
        (first, lr, _, eps), *rest = self.preset.schedule
        pr = replace(self.preset, schedule=((first, lr, m.weight_decay, eps), *rest))
        return Run(preset=pr, out=self.out / m.name, seed=m.seed, device=self.device)


def stacked_setup(ens: Ensemble) -> tuple[list[ModAddData], dict[str, torch.Tensor]]:
    """Each member's data and init (as ``setup`` with its seed), stacked."""
    datas, states = [], []
    for m in ens.members:
        data, model, _ = setup(ens.member_run(m))
        datas.append(data)
        states.append(model.state_dict())
    params = {n: torch.stack([s[n] for s in states]).requires_grad_(True)
              for n in ma.STACKED_NAMES}
    return datas, params


class Trainer:
    """The stacked members, their optimizer and one step."""

    def __init__(self, ens: Ensemble, params: dict[str, torch.Tensor],
                 datas: list[ModAddData]):
        self.ens, self.P = ens, params
        self.cfg = ma.ModelConfig(p=ens.preset.p)
        self.x = torch.stack([d.train_x for d in datas])  # (E, B, 3)
        self.y = torch.stack([d.train_y for d in datas])  # (E, B)
        dev = params["embed.weight"].device
        self.wd = torch.tensor([m.weight_decay for m in ens.members], dtype=torch.float64,
                               device=dev)
        _, lr, _, eps = ens.preset.schedule[0]
        self.opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=ens.preset.betas,
                                     eps=eps, weight_decay=0.0, fused=dev.type in ("cpu", "cuda"))
        self.loss = stacked_loss
        if ens.compile == "on" or (ens.compile == "auto" and dev.type == "cuda"):
            mode = "reduce-overhead" if dev.type == "cuda" else "default"  # CUDA graphs
            self.loss = torch.compile(stacked_loss, mode=mode, dynamic=False)

    def step(self, step: int) -> None:
        lr = hyper(self.ens.preset, step)[0]
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=False)
        try:
            self.loss(self.P, self.x, self.y, self.cfg).backward()
        except Exception as e:  # noqa: BLE001 - a compiler failure must not stop a long run
            if self.loss is stacked_loss:
                raise
            log.warning("compiled step failed (%s: %s); going on uncompiled",
                        type(e).__name__, e)
            self.loss = stacked_loss
            self.opt.zero_grad(set_to_none=False)
            self.loss(self.P, self.x, self.y, self.cfg).backward()
        with torch.no_grad():  # AdamW's decoupled decay, each member at its own rate
            for t in self.P.values():
                shape = (-1,) + (1,) * (t.ndim - 1)
                t.mul_((1 - lr * self.wd).to(t.dtype).view(shape))
        self.opt.step()


def stacked_loss(P: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 cfg: ma.ModelConfig) -> torch.Tensor:
    """Σ over members of each member's mean cross-entropy (float64) on its batch x (E, B, 3),
    y (E, B): the members' gradients stay independent."""
    out = ma.stacked_logits(P, x, cfg)  # (E, B, p)
    return F.cross_entropy(out.to(torch.float64).flatten(0, 1), y.flatten(),
                           reduction="none").view(y.shape).mean(1).sum()


class MembersMismatch(ValueError):
    """The checkpoint in the output folder is of other members than the ones asked for."""


class EnsembleRun:
    """The stacked members as an ``experiment.Experiment``: one checkpoint (OUT/checkpoint.pt:
    step, params, opt, members), one run folder per member (OUT/<member>/)."""

    def __init__(self, ens: Ensemble):
        pr = self.preset = ens.preset
        self.ens, self.steps, self.checkpoint_every = ens, pr.steps, pr.checkpoint_every
        self.checkpoint_path, self.device = ens.out / "checkpoint.pt", ens.device
        self.runs = [ens.member_run(m) for m in ens.members]
        self.folders = tuple(r.out for r in self.runs)
        self.datas, params = stacked_setup(ens)
        self.trainer = Trainer(ens, params, self.datas)
        self.lr_steps = 0.0

    def grid(self) -> list[int]:
        return self.preset.measured_steps()

    def start(self, checkpoint: dict | None) -> int:
        if checkpoint is None:
            return 0
        asked = [(m.seed, m.weight_decay) for m in self.ens.members]
        if [tuple(m) for m in checkpoint["members"]] != asked:
            raise MembersMismatch(f"{self.checkpoint_path}: its members "
                                  f"{checkpoint['members']} are not the ones asked for")
        with torch.no_grad():
            for n, t in self.trainer.P.items():
                t.copy_(checkpoint["params"][n])
        self.trainer.opt.load_state_dict(checkpoint["opt"])
        step = int(checkpoint["step"])
        self.lr_steps = lr_sum(self.preset, step)
        return step

    def advance(self, step: int) -> None:
        self.trainer.step(step + 1)
        self.lr_steps += hyper(self.preset, step + 1)[0]

    def measure(self, step: int) -> list[dict]:
        """The members' history rows."""
        P, cfg = self.trainer.P, self.trainer.cfg
        return [measure_step(run, ma.member_model(P, e, cfg), self.datas[e], step, self.lr_steps)
                for e, run in enumerate(self.runs)]

    def state(self, step: int) -> dict:
        return {"step": step, "params": {n: t.detach() for n, t in self.trainer.P.items()},
                "opt": self.trainer.opt.state_dict(),
                "members": [(m.seed, m.weight_decay) for m in self.ens.members]}


def train_ensemble(ens: Ensemble, progress: experiment.Progress | None = None,
                   time_limit_s: float | None = None) -> Path:
    """Train all members; measure each on the preset's grid into OUT/<member>/. With a time
    limit, stop (checkpointed, measured) once it is spent: rerun to resume."""
    from .modadd_report import make_figures

    experiment.run(EnsembleRun(ens), progress=progress, time_limit_s=time_limit_s,
                   measure_at_stop=True)
    for m in ens.members:
        make_figures(ens.out / m.name, title=f"modular addition, {m.name}")
    return ens.out
