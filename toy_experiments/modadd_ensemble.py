"""Many modular-addition models trained at once: the long weight-decay × seed searches.

Every parameter of the E members is one stacked tensor (E, ...); one forward/backward over all
members (batched matmuls, the members' losses summed: their gradients stay independent) and
one ``torch.optim.AdamW(fused=True)`` step update them all. Each member has its own data split
and init (its seed, exactly as ``modadd_train.setup``) and its own weight decay, applied as
AdamW does (p ← p·(1 − lr·wd) before the Adam update; the optimizer itself runs with 0), so a
member follows the trajectory of the same model trained alone (tests/test_toy_modadd.py).
Members are measured as single runs are (``modadd_train.measure_step``), each into its own
folder ``OUT/<member>/``.

    python -m toy_experiments modadd-ensemble --out reports/toy/modadd_ensemble \\
        [--weight-decays 1,0.3,0.1,0.03,0] [--seeds 0,1] [--steps N] [--dtype float32]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from . import measure
from . import modadd as ma
from . import modadd_train as mt

NAMES = ("embed.weight", "pos_embed", "attn.W_Q.weight", "attn.W_K.weight", "attn.W_V.weight",
         "attn.W_O.weight", "mlp.W_in.weight", "mlp.W_in.bias", "mlp.W_out.weight",
         "mlp.W_out.bias", "unembed.weight")


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
    preset: mt.Preset  # the schedule (its first segment's weight decay is replaced per member)
    out: Path
    device: torch.device = torch.device("cpu")

    def member_run(self, m: Member) -> mt.Run:
        (first, lr, _, eps), *rest = self.preset.schedule
        pr = replace(self.preset, schedule=((first, lr, m.weight_decay, eps), *rest))
        return mt.Run(preset=pr, out=self.out / m.name, seed=m.seed, device=self.device)


def stacked_setup(ens: Ensemble) -> tuple[list[ma.ModAddData], dict[str, torch.Tensor]]:
    """Each member's data and init (as ``modadd_train.setup`` with its seed), stacked."""
    datas, states = [], []
    for m in ens.members:
        data, model, _ = mt.setup(ens.member_run(m))
        datas.append(data)
        states.append(model.state_dict())
    params = {n: torch.stack([s[n] for s in states]).requires_grad_(True) for n in NAMES}
    return datas, params


def logits(P: dict[str, torch.Tensor], x: torch.Tensor, cfg: ma.ModelConfig) -> torch.Tensor:
    """Logits (E, B, p) at the last position of the E members on their batches x (E, B, 3):
    ``ModAddTransformer.forward`` with a leading member dimension."""
    E, B, S = x.shape
    H, dh = cfg.n_heads, cfg.d_head
    table = P["embed.weight"][:, :, None, :] + P["pos_embed"][:, None]  # (E, V, S, d)
    eq = table[:, cfg.p, S - 1]  # (E, d): the '=' token in the last slot
    q = torch.einsum("ed,efd->ef", eq, P["attn.W_Q.weight"]).view(E, H, dh)
    k_tab = torch.einsum("evsd,efd->evsf", table, P["attn.W_K.weight"])  # (E, V, S, H*dh)
    v_tab = torch.einsum("evsd,efd->evsf", table, P["attn.W_V.weight"])
    ei = torch.arange(E, device=x.device)[:, None, None]
    si = torch.arange(S, device=x.device)[None, None, :]
    k = k_tab[ei, x, si].view(E, B, S, H, dh)  # (E, B, S, H, dh)
    v = v_tab[ei, x, si].view(E, B, S, H, dh)
    scores = torch.einsum("ehd,ebshd->ebhs", q, k) / math.sqrt(dh)
    z = torch.einsum("ebhs,ebshd->ebhd", scores.softmax(-1), v).reshape(E, B, H * dh)
    r = eq[:, None] + torch.einsum("ebf,edf->ebd", z, P["attn.W_O.weight"])  # (E, B, d)
    h = F.relu(torch.einsum("ebd,emd->ebm", r, P["mlp.W_in.weight"])
               + P["mlp.W_in.bias"][:, None])  # (E, B, d_mlp)
    r = r + torch.einsum("ebm,edm->ebd", h, P["mlp.W_out.weight"]) + P["mlp.W_out.bias"][:, None]
    return torch.einsum("ebd,epd->ebp", r, P["unembed.weight"])  # (E, B, p)


def member_model(P: dict[str, torch.Tensor], e: int, cfg: ma.ModelConfig) -> ma.ModAddTransformer:
    """Member e as an ``nn.Module`` (a copy), for measurements."""
    m = ma.ModAddTransformer(cfg).to(P["embed.weight"].device, P["embed.weight"].dtype)
    m.load_state_dict({n: t[e].detach() for n, t in P.items()})
    return m.requires_grad_(False)


class Trainer:
    """The stacked members, their optimizer and one step."""

    def __init__(self, ens: Ensemble, params: dict[str, torch.Tensor],
                 datas: list[ma.ModAddData]):
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

    def step(self, step: int) -> None:
        lr = mt.hyper(self.ens.preset, step)[0]
        for g in self.opt.param_groups:
            g["lr"] = lr
        out = logits(self.P, self.x, self.cfg)  # (E, B, p)
        loss = F.cross_entropy(out.to(torch.float64).flatten(0, 1), self.y.flatten(),
                               reduction="none").view(self.y.shape).mean(1).sum()
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():  # AdamW's decoupled decay, each member at its own rate
            for t in self.P.values():
                shape = (-1,) + (1,) * (t.ndim - 1)
                t.mul_((1 - lr * self.wd).to(t.dtype).view(shape))
        self.opt.step()


def train(ens: Ensemble, steps_per_print: int | None = None,
          time_limit_s: float | None = None) -> Path:
    """Train all members; measure each on the preset's grid into OUT/<member>/. With a time
    limit, stop (checkpointed, measured) once it is spent: rerun to resume."""
    pr = ens.preset
    for m in ens.members:
        (ens.out / m.name).mkdir(parents=True, exist_ok=True)
    datas, params = stacked_setup(ens)
    tr = Trainer(ens, params, datas)
    step = _resume(ens, tr)
    lr_sum = mt._lr_steps(pr, step)
    grid = sorted(set(measure.log_schedule(pr.steps, pr.per_decade)) | set(pr.extra_steps))
    todo = [s for s in grid if s > step or step == 0]
    t0, done = time.perf_counter(), 0
    while True:
        if todo and step == todo[0]:
            todo.pop(0)
            rows = [mt.measure_step(ens.member_run(m), member_model(tr.P, e, tr.cfg), datas[e],
                                    step, lr_sum) for e, m in enumerate(ens.members)]
            if steps_per_print is not None:
                _print(step, rows, ens, t0, done)
        late = time_limit_s is not None and time.perf_counter() - t0 > time_limit_s
        if late and not (todo and step == todo[0]) and step:
            rows = [mt.measure_step(ens.member_run(m), member_model(tr.P, e, tr.cfg),
                                    datas[e], step, lr_sum) for e, m in enumerate(ens.members)]
        if step and (step % pr.checkpoint_every == 0 or step == pr.steps or late):
            _checkpoint(ens, tr, step)
        if step >= pr.steps or late:
            break
        step += 1
        tr.step(step)
        lr_sum += mt.hyper(pr, step)[0]
        done += 1
    from .modadd_report import make_figures

    for m in ens.members:
        make_figures(ens.out / m.name, title=f"modular addition, {m.name}")
    return ens.out


def _print(step: int, rows: list[dict], ens: Ensemble, t0: float, done: int) -> None:
    dt = time.perf_counter() - t0
    rate = done / dt if dt > 0 else float("nan")
    accs = " ".join(f"{m.name}:{r['train_acc']:.2f}/{r['test_acc']:.2f}/t{r['num_traps_tw']}"
                    for m, r in zip(ens.members, rows, strict=True))
    print(f"step {step:>8d} [{rate:.1f} steps/s] {accs}", flush=True)


def _checkpoint(ens: Ensemble, tr: Trainer, step: int) -> None:
    path = ens.out / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "params": {n: t.detach() for n, t in tr.P.items()},
                "opt": tr.opt.state_dict(),
                "members": [(m.seed, m.weight_decay) for m in ens.members]}, tmp)
    tmp.replace(path)


def _resume(ens: Ensemble, tr: Trainer) -> int:
    path = ens.out / "checkpoint.pt"
    if not path.exists():
        return 0
    ck = torch.load(path, map_location=ens.device, weights_only=True)
    if [tuple(m) for m in ck["members"]] != [(m.seed, m.weight_decay) for m in ens.members]:
        raise SystemExit(f"{path}: its members {ck['members']} are not the ones asked for")
    with torch.no_grad():
        for n, t in tr.P.items():
            t.copy_(ck["params"][n])
    tr.opt.load_state_dict(ck["opt"])
    for m in ens.members:
        for name in ("history.csv", "layers.csv", "traps.csv"):
            measure.truncate_csv(ens.out / m.name / name, int(ck["step"]))
    return int(ck["step"])
