"""Per-matrix cost on CPU: llm-audit's whole audit of one full-width gpt-oss expert matrix vs one
exact `scipy.linalg.svdvals` (float64) of the same matrix, side by side in one process.

    python benchmarks/cpu_expert_audit.py [--size 2880] [--repeats 2] [--threads N]

The matrix is MXFP4 (heavy-tailed values plus a low-rank part, encoded with the test suite's
encoder) decoded by llm-audit's own dequantizer. "Whole audit" = eigenvalues, α fit, norms, MP
fit and correlation traps (shuffle + its spectrum), i.e. `analysis.analyse_matrix`, once with
the `ww` trap rule (full shuffled spectrum) and once with the `tw` rule (randomized top-k).
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
from llm_audit.analysis import MatrixMeta, analyse_matrix  # noqa: E402
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
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # only for the StudentT sample of the synthetic matrix
    W = expert_matrix(args.size)
    meta = MatrixMeta("expert", 0, "down_proj", 0, "mxfp4")
    runs = {"svdvals": [], "ww": [], "tw": []}
    results = {}
    for _ in range(args.repeats):  # interleaved: the machine's noise hits all three alike
        runs["svdvals"].append(timed(lambda: scipy.linalg.svdvals(W.double().numpy())))
        for rule in ("ww", "tw"):
            opts = AuditOptions(trap_rule=rule)
            runs[rule].append(timed(lambda o=opts, r=rule: results.__setitem__(
                r, analyse_matrix(W, meta, o))))
    svd = statistics.median(runs["svdvals"])
    print(f"matrix {args.size}x{args.size} MXFP4, torch threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}")
    print(f"scipy.linalg.svdvals float64: {', '.join(f'{t:.2f}' for t in runs['svdvals'])} s")
    for rule in ("ww", "tw"):
        med = statistics.median(runs[rule])
        r = results[rule]
        print(f"llm-audit whole audit, trap rule {rule}: "
              f"{', '.join(f'{t:.2f}' for t in runs[rule])} s -> {med / svd:.3f} of one SVD "
              f"(alpha {r.alpha:.4f}, traps {r.rand_num_spikes})")


if __name__ == "__main__":
    main()
