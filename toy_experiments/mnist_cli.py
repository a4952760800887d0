"""The ``mnist`` subcommand of ``python -m toy_experiments`` (parser + runner)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli import add_run_arguments, device, print_progress


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mnist", help="MNIST MLP3 (784-200-200-10), the authors' recipe")
    add_run_arguments(m, seed_help="the notebook's seed: np.random.seed (subset) and "
                      "torch.manual_seed (init, batches)",
                      presets=("smoke", "notebook", "collapse", "control"))
    m.add_argument("--lr", type=float, default=None,
                   help="constant AdamW lr; the preset's lr*steps is kept unless --steps")
    m.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    m.add_argument("--reshuffle", action="store_true",
                   help="a new batch order every epoch (diagnostic; the notebook replays one)")
    m.add_argument("--trainer", choices=("fast", "plain"), default="fast",
                   help="fast: FastMLP; plain: autograd + torch AdamW (the reference loop)")
    m.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files "
                   "(default: $MNIST_DIR, then torchvision's cache folders)")
    m.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop after MIN minutes of training (checkpointed: rerun to resume)")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import mnist
    from .data import DataNotFound
    from .mnist_report import describe, phases

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = mnist.preset_with(args.preset, args.steps, args.lr, args.weight_decay)
    if args.reshuffle:
        from dataclasses import replace
        preset = replace(preset, reshuffle=True)
    r = mnist.Run(preset=preset, out=args.out, seed=args.seed, device=device(args.device),
                  data_dir=args.data_dir, trainer=args.trainer,
                  time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    print(f"mnist preset={args.preset} {r.preset} seed={args.seed} device={r.device} "
          f"out={args.out}", flush=True)
    t0 = time.perf_counter()
    try:
        mnist.train(r, progress=print_progress)
    except DataNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(phases(pd.read_csv(args.out / "history.csv"),
                          layers=pd.read_csv(args.out / "layers.csv"))))
    print(f"wall time {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
