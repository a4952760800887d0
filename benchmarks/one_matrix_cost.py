"""Stage costs of one heavy-tailed 2880² matrix (gptoss_width.heavy_tailed) against the floor
(one float32 Gram + eigvalsh), in this process, one thread; `--profile` adds cProfile's top.

    python benchmarks/one_matrix_cost.py [--rule tw] [--seed 0] [--profile] [--no-anatomy]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from gptoss_width import heavy_tailed

from llm_audit.analysis import MatrixMeta, analyse_matrix
from llm_audit.options import AuditOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="tw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-anatomy", action="store_true", help="counts only (AuditOptions)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    W = heavy_tailed(a.seed).float()
    t = time.perf_counter()
    torch.linalg.eigvalsh(W.T @ W)
    floor = time.perf_counter() - t
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    r = analyse_matrix(W, MatrixMeta("m", 0, "q_proj", None, "BF16"),
                       AuditOptions(device="cpu", trap_rule=a.rule, anatomy=not a.no_anatomy))
    if prof:
        prof.disable()
    print(f"floor {floor:.2f} s; ours {r.seconds:.2f} s ({r.seconds / floor:.1f}x): eigen "
          f"{r.eigen_seconds:.2f}, fit {r.fit_seconds:.2f}, traps {r.trap_seconds:.2f} s; "
          f"{r.rand_num_spikes} traps; precision {r.precision}/{r.trap_precision}")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
