"""The eigen + rank stage of one square 2880² heavy-tailed matrix under precision auto on CPU:
the float32 Gram + eigvalsh followed by `spectral.full_rank` (a second, float64 Gram and a
Cholesky), against `spectral.esd_proving_rank` (one float64 Gram: rounded for the eigenvalues,
factored for the rank). Alternated A B A B in this process; prints each round and the medians.

    python benchmarks/rank_proof_cost.py [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gptoss_width import heavy_tailed

from llm_audit import spectral


def two_grams(W: torch.Tensor) -> float:
    t0 = time.perf_counter()
    ev = spectral.esd(W, dtype=torch.float32)
    assert spectral.full_rank(W, float(ev.max()))
    return time.perf_counter() - t0


def one_gram(W: torch.Tensor) -> float:
    t0 = time.perf_counter()
    ev, (bound,) = spectral.esd_proving_rank(W)
    assert float(ev.max()) <= bound
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    W = heavy_tailed(0).float()
    old, new = [], []
    for _ in range(a.rounds):
        old.append(two_grams(W))
        new.append(one_gram(W))
    print(f"threads {a.threads}: float32 Gram + eigvalsh + full_rank "
          f"{', '.join(f'{t:.2f}' for t in old)} s; esd_proving_rank "
          f"{', '.join(f'{t:.2f}' for t in new)} s; median ratio new/old "
          f"{statistics.median(n / o for n, o in zip(new, old, strict=True)):.2f}")


if __name__ == "__main__":
    main()
