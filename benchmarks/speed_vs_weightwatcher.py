"""Whole-process wall time: WeightWatcher 0.7.7 vs the llm-audit CLI on the same matrices.

    python benchmarks/speed_vs_weightwatcher.py [--include REGEX] [--repeats 3] [--ww-python PATH]

Both run as fresh processes (imports included), alternately, on all-MiniLM-L6-v2's matrices that
match --include (default: encoder layers 0-1, 12 matrices), with randomization (traps) on, each
writing its table (WW: details CSV; llm-audit: layers.csv + summary.json). The ratio of medians is
reported; the machine is noisy, so only the side-by-side ratio is meaningful.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import minilm_dir  # noqa: E402

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--include", default=r"encoder\.layer\.[01]\.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ww-python", default=os.environ.get("WW_PYTHON", "/work/wwvenv/bin/python"))
    ap.add_argument("--extra", type=shlex.split, default=["--format", "csv,json"],
                    help="llm-audit options (default: write only layers.csv + summary.json, the "
                         "counterpart of WW's details table; figures/HTML cost extra)")
    args = ap.parse_args()
    model = minilm_dir() / "model.safetensors"
    ww_t, ours_t = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            ww_t.append(timed([args.ww_python, str(HERE / "ww_reference.py"), str(model),
                               f"{tmp}/ww.csv", "--include", args.include]))
            ours_t.append(timed([sys.executable, "-m", "llm_audit", str(model), "--out",
                                 f"{tmp}/ours", "--include", args.include, "--quiet",
                                 *args.extra]))
    ww_m, ours_m = statistics.median(ww_t), statistics.median(ours_t)
    print(f"matrices: {args.include!r} of {model.parent.name}; repeats {args.repeats}; "
          f"cores {os.cpu_count()}; llm-audit options {' '.join(args.extra)}")
    print(f"WeightWatcher 0.7.7 analyze(randomize=True, mp_fit=True): "
          f"{', '.join(f'{t:.2f}' for t in ww_t)} s (median {ww_m:.2f} s)")
    print(f"llm-audit CLI:                                            "
          f"{', '.join(f'{t:.2f}' for t in ours_t)} s (median {ours_m:.2f} s)")
    print(f"speed-up (whole process, median/median): {ww_m / ours_m:.1f}x")


if __name__ == "__main__":
    main()
