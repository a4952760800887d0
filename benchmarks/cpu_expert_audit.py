"""Per-matrix cost on CPU: llm-audit's whole audit of full-width gpt-oss expert matrices vs one
exact `scipy.linalg.svdvals` (float64) of the same matrix, side by side in one process.

    python benchmarks/cpu_expert_audit.py [--size 2880] [--batch 4] [--repeats 3] [--threads N]

The matrices are MXFP4 (heavy-tailed values plus a low-rank part, encoded with the test suite's
encoder) decoded by llm-audit's own dequantizer. "Whole audit" = eigenvalues, α fit, norms, MP
fit, confounds and correlation traps (shuffle + top of its spectrum), i.e.
`analysis.analyse_stack` on `--batch` experts of one tensor as the pipeline batches them on CPU
(one shared shuffle permutation), reported per matrix; and for B = 1 (`analyse_matrix`).
Configurations: precision auto (the default: float32, float64 where round-off could change an
answer) and float64, trap rules tw (randomized top-k) and ww (full shuffled spectrum).
Target (issue 7): ≤ 1/4 of one exact SVD. WeightWatcher needs at least two exact SVDs and a KDE
fit per matrix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm_audit.analysis import MatrixMeta, analyse_stack  # noqa: E402
from llm_audit.options import AuditOptions  # noqa: E402
from llm_audit.quant import mxfp4_dequantize  # noqa: E402
from tests.checkpoints import encode_mxfp4  # noqa: E402


def expert_matrix(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    heavy = torch.distributions.StudentT(3.0).sample((n, n)) * 0.02
    u, v = torch.randn(n, 16, generator=g), torch.randn(16, n, generator=g)
    blocks, scales = encode_mxfp4(heavy + (u @ v) * 0.002)
    return mxfp4_dequantize(blocks, scales)  # float32 (n, n)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2880)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # only for the StudentT samples of the synthetic matrices
    W = torch.stack([expert_matrix(args.size, seed=e) for e in range(args.batch)])
    metas = [MatrixMeta(f"experts.down_proj[{e}]", 0, "down_proj", e, "mxfp4")
             for e in range(args.batch)]
    configs = [(f"B={args.batch} {prec} {rule}", args.batch, prec, rule)
               for prec in ("auto", "float64") for rule in ("tw", "ww")]
    configs.insert(1, ("B=1 auto tw", 1, "auto", "tw"))
    runs: dict[str, list[float]] = {"svdvals": [], **{c[0]: [] for c in configs}}
    results: dict[str, list] = {}
    for _ in range(args.repeats):  # interleaved: the machine's noise hits all alike
        runs["svdvals"].append(timed(lambda: scipy.linalg.svdvals(W[0].double().numpy())))
        for label, B, prec, rule in configs:
            opts = AuditOptions(trap_rule=rule, precision=prec)
            t = timed(lambda o=opts, b=B, lab=label: results.__setitem__(
                lab, analyse_stack(W[:b], metas[:b], o, key="experts.down_proj")))
            runs[label].append(t / B)
    svd = statistics.median(runs["svdvals"])
    print(f"matrices {args.size}x{args.size} MXFP4, torch threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"scipy.linalg.svdvals float64: {', '.join(f'{t:.2f}' for t in runs['svdvals'])} s")
    for label, *_ in configs:
        med = statistics.median(runs[label])
        rows = results[label]
        print(f"llm-audit whole audit, {label:16s}: per matrix "
              f"{', '.join(f'{t:.2f}' for t in runs[label])} s -> {med / svd:.3f} of one SVD "
              f"(alpha {', '.join(f'{r.alpha:.4f}' for r in rows)}; traps "
              f"{', '.join(str(r.rand_num_spikes) for r in rows)}; eigen precision "
              f"{', '.join(r.precision for r in rows)}; per-matrix eigen/fit/trap s "
              f"{statistics.mean(r.eigen_seconds for r in rows):.2f}/"
              f"{statistics.mean(r.fit_seconds for r in rows):.2f}/"
              f"{statistics.mean(r.trap_seconds for r in rows):.2f})")


if __name__ == "__main__":
    main()
