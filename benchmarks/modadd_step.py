"""Steps/s of Nanda's modular-addition step (p 113, 30% of pairs, full batch, float32): the
plain single-model loop vs the stacked ensemble (per member), side by side in one process.

Plain = ``modadd_train``'s loop (``ModAddTransformer`` + autograd + AdamW, one model). Ensemble
= ``modadd_train.Trainer`` with E members (batched einsums, one fused AdamW step). Rounds
alternate A B A B; the best of each is reported.

    python benchmarks/modadd_step.py [--members 1,2,5,10] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from toy_experiments import modadd as ma
from toy_experiments import modadd_train as mt


def plain(steps: int) -> float:
    run = mt.Run(preset=mt.PRESETS["nanda"], out=None)
    data, model, opt = mt.setup(run)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        lr, opt.weight_decay, opt.eps = mt.hyper(run.preset, s)
        opt.zero_grad()
        ma.loss_fn(model(data.train_x), data.train_y).backward()
        opt.step(lr)
    return steps / (time.perf_counter() - t0)


def ensemble(members: int, steps: int) -> float:
    ms = tuple(mt.Member(seed=i // 5, weight_decay=[1, 0.3, 0.1, 0.03, 0][i % 5])
               for i in range(members))
    ens = mt.Ensemble(members=ms, preset=mt.PRESETS["nanda"], out=Path("unused"))
    datas, params = mt.stacked_setup(ens)
    tr = mt.Trainer(ens, params, datas)
    tr.step(1)
    t0 = time.perf_counter()
    for s in range(2, steps + 2):
        tr.step(s)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", default="1,2,5,10")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for e in map(int, args.members.split(",")):
        p_best = max(plain(args.steps) for _ in range(args.rounds))
        e_best = max(ensemble(e, args.steps) for _ in range(args.rounds))
        print(f"threads {args.threads}: plain {p_best:6.1f} steps/s; ensemble of {e:2d}: "
              f"{e_best:6.2f} steps/s = {e_best * e:6.1f} member-steps/s "
              f"({e_best * e / p_best:.2f}x the plain loop per member)", flush=True)


if __name__ == "__main__":
    main()
