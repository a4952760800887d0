"""The options every ``python -m toy_experiments`` subcommand takes."""

from __future__ import annotations

import argparse
from pathlib import Path


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
