"""Start-up cost of the CLI, measured side by side with a bare ``import torch``.

Each round runs, as fresh processes and in turn: ``python -c "import torch"``, ``llm-audit
--help`` and ``llm-audit demo`` (4 matrices, all four reports with figures). Medians over the
rounds; the demo's overhead is its median minus the bare torch import's, and both targets are
checked: --help <= 0.5 s, demo within 2 s of ``import torch``. Then ``-X importtime`` lists
the slowest imports of the demo.

    python benchmarks/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {"import torch": [py, "-c", "import torch"],
                "llm-audit --help": [py, "-m", "llm_audit.cli", "--help"],
                "llm-audit demo": [py, "-m", "llm_audit.cli", "demo", "--out", tmp, "-q"]}
        for c in cmds.values():
            wall(c)  # warm the page cache
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.rounds):
            for k, c in cmds.items():
                times[k].append(wall(c))
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{k:18s} median {med[k]:5.2f} s  (min {min(v):.2f}, max {max(v):.2f})")
        over = med["llm-audit demo"] - med["import torch"]
        print(f"--help {med['llm-audit --help']:.2f} s (target <= 0.5: "
              f"{'PASS' if med['llm-audit --help'] <= 0.5 else 'FAIL'}); demo - import torch = "
              f"{over:.2f} s (target <= 2: {'PASS' if over <= 2 else 'FAIL'})")
        out = subprocess.run([py, "-X", "importtime", "-m", "llm_audit.cli", "demo", "--out",
                              tmp, "-q"], env=ENV, capture_output=True, text=True).stderr
    rows = []
    for line in out.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, name = line.split("|")
            if cum.strip().isdigit():
                rows.append((int(cum), name.rstrip()))
    print("slowest top-level imports of the demo (cumulative ms):")
    for cum, name in sorted((r for r in rows if not r[1].startswith("  ")), reverse=True)[:8]:
        print(f"  {cum / 1000:7.0f} {name.strip()}")


if __name__ == "__main__":
    main()
