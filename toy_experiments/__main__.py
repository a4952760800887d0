"""python -m toy_experiments {mnist,modadd} --preset NAME --out DIR [options]."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli_args import add_run_arguments


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but no CUDA device is available")
    return dev


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m toy_experiments",
                                 description="Toy reproductions of anti-grokking, audited.")
    sub = ap.add_subparsers(dest="experiment", required=True)
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
    from .modadd_cli import add_ensemble_parser
    from .modadd_cli import add_parser as add_modadd
    add_modadd(sub)
    add_ensemble_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.experiment == "modadd":
        from .modadd_cli import run as run_modadd
        return run_modadd(args, _device)
    if args.experiment == "modadd-ensemble":
        from .modadd_cli import run_ensemble
        return run_ensemble(args, _device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import mnist
    from .data import DataNotFound
    from .measure import print_progress
    from .mnist_report import describe, phases

    preset = mnist.preset_with(args.preset, args.steps, args.lr, args.weight_decay)
    if args.reshuffle:
        from dataclasses import replace
        preset = replace(preset, reshuffle=True)
    run = mnist.Run(preset=preset, out=args.out, seed=args.seed, device=_device(args.device),
                    data_dir=args.data_dir, trainer=args.trainer,
                    time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    print(f"mnist preset={args.preset} {run.preset} seed={args.seed} device={run.device} "
          f"out={args.out}", flush=True)
    t0 = time.perf_counter()
    try:
        mnist.train(run, progress=print_progress)
    except DataNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import pandas as pd
    print(describe(phases(pd.read_csv(args.out / "history.csv"),
                          layers=pd.read_csv(args.out / "layers.csv"))))
    print(f"wall time {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
