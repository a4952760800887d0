"""python -m toy_experiments {mnist,modadd,modadd-ensemble} --out DIR [options].

Each subcommand is a ``*_cli.py`` module: ``add_parser`` (its flags) and ``run`` (flags →
library → exit code).
"""

from __future__ import annotations

import argparse
import sys

from . import mnist_cli, modadd_cli

SUBCOMMANDS = {"mnist": mnist_cli.run, "modadd": modadd_cli.run,
               "modadd-ensemble": modadd_cli.run_ensemble}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m toy_experiments",
                                 description="Toy reproductions of anti-grokking, audited.")
    sub = ap.add_subparsers(dest="experiment", required=True)
    mnist_cli.add_parser(sub)
    modadd_cli.add_parser(sub)
    modadd_cli.add_ensemble_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return SUBCOMMANDS[args.experiment](args)


if __name__ == "__main__":
    sys.exit(main())
