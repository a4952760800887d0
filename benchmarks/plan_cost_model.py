"""Measure the per-matrix cost model behind `llm-audit --plan`'s time estimate.

For each size (square and rectangular, float32 Gaussian entries) and each trap rule (``none`` =
--no-randomize, ``ww``, ``tw``, ``perm``) it times ``analysis.analyse_matrix`` — spectral.esd
(Gram product + eigensolve), the power-law and MP fits and the trap rule with its anatomy, i.e.
exactly what the audit runs per matrix, reading and decoding excluded — median of --reps runs
after one warm-up, with the process's default torch threads. Then it fits

    seconds(N, M) = c * N * M**2 + e * M**3 + d   (N = max, M = min of the matrix shape)

per rule (non-negative constants minimising the relative error: the Gram product is N·M², the
eigensolve M³; a c·N·M² + d fit alone misses square against rectangular shapes by up to ~50%,
its rms error is printed too), and prints the constants for `llm_audit.plan_report.CPU_COST`
with each size's measured and predicted time.

    OMP_WAIT_POLICY=PASSIVE python3 benchmarks/plan_cost_model.py \
        [--reps 3] [--out benchmarks/results/plan_cost_model.txt]
    # check the model against a real audit (per-matrix seconds summed, and wall time):
    OMP_WAIT_POLICY=PASSIVE python3 benchmarks/plan_cost_model.py --validate PATH [--rules ww]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_audit import analysis  # noqa: E402
from llm_audit.options import AuditOptions  # noqa: E402

SHAPES = ((256, 256), (512, 512), (1024, 1024), (2048, 2048),
          (1024, 256), (2048, 512), (4096, 1024), (1024, 2048), (3072, 768))
RULES = ("none", "ww", "tw", "perm")


def options(rule: str) -> AuditOptions:
    return AuditOptions(randomize=False) if rule == "none" else AuditOptions(trap_rule=rule)


def time_one(shape: tuple[int, int], rule: str, reps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
    meta = analysis.MatrixMeta(f"bench.{shape[0]}x{shape[1]}.weight", 0, "dense", None, "F32")
    opts = options(rule)
    analysis.analyse_matrix(W, meta, opts)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        analysis.analyse_matrix(W, meta, opts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit(points: list[tuple[int, int, float]], cubic: bool = True) -> tuple[float, float, float]:
    """Non-negative (c, e, d) of c*N*M^2 + e*M^3 + d minimising sum(((pred - t) / t)^2);
    e = 0 with cubic=False."""
    from scipy.optimize import nnls

    A = np.array([[max(s) * min(s) ** 2 / t, min(s) ** 3 / t, 1 / t] for *s, t in points])
    if not cubic:
        A[:, 1] = 0
    x, _ = nnls(A, np.ones(len(points)))
    return float(x[0]), float(x[1]), float(x[2])


def predict(k: tuple[float, float, float], n: int, m: int) -> float:
    n, m = max(n, m), min(n, m)
    return k[0] * n * m * m + k[1] * m ** 3 + k[2]


def rms(k: tuple[float, float, float], points: list[tuple[int, int, float]]) -> float:
    return float(np.sqrt(np.mean([((predict(k, n, m) - t) / t) ** 2 for n, m, t in points])))


def measure(reps: int) -> list[str]:
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {reps}"]
    for rule in RULES:
        points = []
        for shape in SHAPES:
            t = time_one(shape, rule, reps)
            points.append((*shape, t))
            print(f"{rule:5s} {shape[0]:5d}x{shape[1]:<5d} {t:8.3f} s", file=sys.stderr)
        k, k2 = fit(points), fit(points, cubic=False)
        lines.append(f'"{rule}": ({k[0]:.3e}, {k[1]:.3e}, {k[2]:.3e}),  # rms error '
                     f"{rms(k, points):.0%} (c*N*M^2 + d alone: {rms(k2, points):.0%})")
        for n, m, t in points:
            pred = predict(k, n, m)
            lines.append(f"    {n:5d}x{m:<5d} measured {t:8.3f} s  predicted {pred:8.3f} s  "
                         f"({(pred - t) / t:+.0%})")
    return lines


def validate(path: str, rules: list[str]) -> list[str]:
    import llm_audit
    from llm_audit.plan_report import plan_source

    lines = []
    for rule in rules:
        opts = options(rule)
        planned = plan_source(path, opts)
        t0 = time.perf_counter()
        res = llm_audit.audit(path, options=opts, max_spectra=0)
        wall = time.perf_counter() - t0
        lines.append(f"{path} rule {rule}: {len(planned.jobs)} matrices, predicted "
                     f"{planned.estimate.seconds:.2f} s; measured analysis "
                     f"{res.details['seconds'].sum():.2f} s (per-matrix 'seconds' summed), "
                     f"audit() wall {wall:.2f} s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--validate", metavar="PATH")
    ap.add_argument("--rules", default="none,ww,tw")
    args = ap.parse_args()
    lines = validate(args.validate, args.rules.split(",")) if args.validate \
        else measure(args.reps)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
