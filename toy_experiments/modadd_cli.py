"""The ``modadd`` and ``modadd-ensemble`` subcommands of ``python -m toy_experiments`` (parsers
+ runners)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .cli import add_run_arguments, device, print_progress, print_resumed
from .experiment import Measured, Resumed


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("modadd", help="modular addition, Nanda et al.'s 1-layer transformer")
    add_run_arguments(m, seed_help="data split / init / audit seed",
                      presets=("smoke", "nanda", "quick", "paper"))
    m.add_argument("--p", type=int, default=None, help="override the preset's modulus")
    m.add_argument("--train-frac", type=float, default=None,
                   help="override the preset's fraction of the p² pairs used for training")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's forward + loss (1.4x steps/s on "
                        "CPU; same gradients to float32 round-off, not bit-equal)")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import modadd_train as mt
    from .modadd_report import describe, phases

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = mt.preset_with(args.preset, steps=args.steps, p=args.p, train_frac=args.train_frac)
    r = mt.Run(preset=preset, out=args.out, seed=args.seed, device=device(args.device),
               compile=args.compile)
    print(f"modadd preset={args.preset} {preset} seed={args.seed} device={r.device} "
          f"out={args.out}", flush=True)
    t0 = time.perf_counter()
    mt.train(r, progress=print_progress)
    print(describe(phases(pd.read_csv(args.out / "history.csv"))))
    print(f"wall time {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def add_ensemble_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("modadd-ensemble", help="many modular-addition models at once "
                       "(weight decays x seeds), one folder per member")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--preset", choices=("smoke", "nanda", "ensemble"), default="ensemble")
    m.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop after MIN minutes (checkpointed: rerun to resume)")
    m.add_argument("--weight-decays", default="1,0.3,0.1,0.03,0")
    m.add_argument("--seeds", default="0,1")
    m.add_argument("--steps", type=int, default=None)
    m.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the stacked step (auto: on CUDA only, as CUDA graphs; "
                        "falls back to the plain step if compilation fails)")


def ensemble_progress(members: tuple) -> Callable[[Resumed | Measured], None]:
    """One console line per measurement: every member's train/test accuracy and tw traps."""
    def show(event: Resumed | Measured) -> None:
        if isinstance(event, Resumed):
            print_resumed(event)
            return
        accs = " ".join(f"{m.name}:{r['train_acc']:.2f}/{r['test_acc']:.2f}/t{r['num_traps_tw']}"
                        for m, r in zip(members, event.result, strict=True))
        print(f"step {event.step:>8d} [{event.rate:.1f} steps/s] {accs}", flush=True)
    return show


def run_ensemble(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from . import modadd_train as mt

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = replace(mt.preset_with(args.preset, steps=args.steps), dtype=args.dtype)
    members = tuple(mt.Member(int(s), float(w)) for w in args.weight_decays.split(",")
                    for s in args.seeds.split(","))
    ens = mt.Ensemble(members=members, preset=preset, out=args.out, device=device(args.device),
                      compile=args.compile)
    print(f"modadd-ensemble {len(members)} members {[m.name for m in members]} {preset} "
          f"device={ens.device}", flush=True)
    t0 = time.perf_counter()
    try:
        mt.train_ensemble(ens, progress=ensemble_progress(members),
                          time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    except mt.MembersMismatch as e:
        raise SystemExit(str(e)) from None
    print(f"wall time {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
