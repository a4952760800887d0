"""The ``modadd`` subcommand of ``python -m toy_experiments`` (parser + runner)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from .cli_args import add_run_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("modadd", help="modular addition, Nanda et al.'s 1-layer transformer")
    add_run_arguments(m, seed_help="data split / init / audit seed",
                      presets=("smoke", "nanda", "quick", "paper"))
    m.add_argument("--p", type=int, default=None, help="override the preset's modulus")
    m.add_argument("--train-frac", type=float, default=None,
                   help="override the preset's fraction of the p² pairs used for training")


def run(args: argparse.Namespace, device: Callable[[str], torch.device]) -> int:
    import pandas as pd

    from . import modadd_train as mt
    from .modadd_report import describe, phases

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = mt.preset_with(args.preset, steps=args.steps, p=args.p, train_frac=args.train_frac)
    r = mt.Run(preset=preset, out=args.out, seed=args.seed, device=device(args.device))
    print(f"modadd preset={args.preset} {preset} seed={args.seed} device={r.device} "
          f"out={args.out}", flush=True)
    t0 = time.perf_counter()
    mt.train(r)
    print(describe(phases(pd.read_csv(args.out / "history.csv"))))
    print(f"wall time {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
