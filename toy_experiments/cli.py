"""What every ``python -m toy_experiments`` subcommand shares: its run options, the device,
and the console lines (the only module besides the ``*_cli.py`` ones that prints)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .experiment import Measured, Resumed


def add_run_arguments(p: argparse.ArgumentParser, seed_help: str,
                      presets: tuple[str, ...] = ("smoke", "quick", "paper")) -> None:
    """--preset, --out, --steps, --seed, --device, --threads."""
    p.add_argument("--preset", choices=presets, default="smoke")
    p.add_argument("--out", required=True, type=Path, help="output folder (resumes if it holds "
                   "a checkpoint.pt of an earlier run)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def device(name: str) -> torch.device:
    """--device: auto (CUDA when there is one), cpu, cuda[:i] (an error when there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but no CUDA device is available")
    return dev


def print_resumed(event: Resumed) -> None:
    print(f"resuming from {event.path} at step {event.step}", flush=True)


def print_progress(event: Resumed | Measured) -> None:
    """One console line per measurement of one model: accuracies, mean α, traps, norm, time
    and speed since the loop started."""
    if isinstance(event, Resumed):
        print_resumed(event)
        return
    row = event.result
    print(f"step {row['step']:>9d}  train {row['train_acc']:.3f}  test {row['test_acc']:.3f}  "
          f"alpha {row['mean_alpha']:.2f}  traps {row['num_traps']}  "
          f"norm {row['l2_norm']:.1f}  [{event.elapsed_s:.0f}s, {event.rate:.1f} steps/s]",
          flush=True)
