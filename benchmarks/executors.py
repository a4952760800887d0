"""Executors side by side: serial vs processes:2 vs ray (a local 2-CPU cluster), whole CLI
processes, interleaved (A B C A B C ...) so drift hits all alike.

- model: a 2-layer gpt-oss-layout MXFP4 checkpoint at width 1024 (4 experts), `llm-audit DIR`;
- sweep: 4 small checkpoints (`llm-audit sweep`), when the sweep command exists;
- overhead: 48 tiny (64×64) matrices, where the analysis costs ~nothing: (t − t_serial) / 48
  is each executor's cost per matrix (start-up of its workers included, then amortised).

Prints the median wall seconds of each, the ratio to serial, and the per-matrix overhead.

    python benchmarks/executors.py [--reps 2] [--out benchmarks/results/executors.txt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", RAY_DISABLE_USAGE_STATS="1")
EXECUTORS = ("serial", "processes:2", "ray")


def build(kind: str, folder: Path) -> None:
    """Write the benchmark's checkpoint(s) in a child process (torch stays out of this one)."""
    subprocess.run([sys.executable, __file__, "--build", kind, str(folder)], env=ENV, check=True)


def build_child(kind: str, folder: str) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from tests.checkpoints import write_gpt_oss

    out = Path(folder)
    if kind == "model":
        write_gpt_oss(out, layers=2, width=1024, experts=4, vocab=64, shards=2)
    elif kind == "tiny":
        g = torch.Generator().manual_seed(0)
        out.mkdir(parents=True, exist_ok=True)
        save_file({f"layers.{i}.w.weight": torch.randn(64, 64, generator=g)
                   for i in range(48)}, out / "model.safetensors")
    else:  # sweep: 4 checkpoints of 8 matrices 256×512
        g = torch.Generator().manual_seed(1)
        for step in (100, 200, 300, 400):
            d = out / f"checkpoint-{step}"
            d.mkdir(parents=True, exist_ok=True)
            save_file({f"layers.{i}.w.weight": torch.randn(256, 512, generator=g)
                       for i in range(8)}, d / "model.safetensors")


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.decode()[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "llm_audit"]
    has_sweep = (ROOT / "llm_audit" / "sweep.py").exists()
    lines = [f"executors, cores {os.cpu_count()}, reps {args.reps}, whole CLI processes"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cases = {"model": t / "model", "tiny": t / "tiny"}
        if has_sweep:
            cases["sweep"] = t / "sweep"
        for kind, folder in cases.items():
            build(kind, folder)
        times: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.reps):
            for kind, folder in cases.items():
                for ex in EXECUTORS:
                    out = t / f"out-{kind}-{ex.replace(':', '_')}-{rep}"
                    if kind == "sweep":
                        cmd = [*cli, "sweep", *sorted(map(str, folder.iterdir())),
                               "--out", str(out), "--executor", ex]
                    else:
                        cmd = [*cli, str(folder), "--out", str(out), "--format", "csv",
                               "--executor", ex]
                    times.setdefault((kind, ex), []).append(timed(cmd))
        for kind in cases:
            base = statistics.median(times[(kind, "serial")])
            for ex in EXECUTORS:
                med = statistics.median(times[(kind, ex)])
                extra = f"; overhead {(med - base) / 48 * 1e3:.0f} ms/matrix" \
                    if kind == "tiny" else ""
                lines.append(f"{kind:6s} {ex:12s} median {med:7.1f} s  (runs "
                             f"{', '.join(f'{x:.1f}' for x in times[(kind, ex)])}); "
                             f"serial/this {base / med:.2f}x{extra}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_child(sys.argv[2], sys.argv[3])
    else:
        main()
