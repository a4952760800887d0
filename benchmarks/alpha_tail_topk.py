"""Would a top-k α tail beat the full spectrum? Randomized block-Krylov top-k eigenvalues vs one
full float32 eigensolve of the Gram matrix, on CPU, side by side.

    python benchmarks/alpha_tail_topk.py [--sizes 2880 4096] [--ks 64 256 512]

The α fit needs every eigenvalue from xmin up, to KS precision (~1e-5 relative). For each size
it prints the time of the full float32 spectrum (`spectral.esd`), the fitted tail length
(num_pl_spikes), and for each k the Krylov time and the largest relative error of its k values.
Also the tail fraction num_pl_spikes/M over all-MiniLM-L6-v2 (if `benchmarks/minilm.py` has
fetched it). The matrices are the CPU benchmark's synthetic MXFP4 experts (2880) and Student-t
matrices (other sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cpu_expert_audit import expert_matrix  # noqa: E402
from llm_audit import rsvd, spectral  # noqa: E402

MINILM = Path.home() / ".cache/llm-audit-bench/all-MiniLM-L6-v2/model.safetensors"


def minilm_tail_fractions() -> None:
    if not MINILM.is_file():
        print(f"{MINILM} missing: run benchmarks/minilm.py for the MiniLM line")
        return
    from safetensors.torch import load_file

    fr = torch.tensor([spectral.fit_power_law(spectral.esd(v.float())).num_pl_spikes
                       / min(v.shape) for v in load_file(MINILM).values()
                       if v.ndim == 2 and min(v.shape) >= 8])
    print(f"all-MiniLM-L6-v2 tail fraction num_pl_spikes/M: median {fr.median():.3f}, "
          f"min {fr.min():.3f}, max {fr.max():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2880, 4096])
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 256, 512])
    args = ap.parse_args()
    minilm_tail_fractions()
    torch.manual_seed(0)  # only for the Student-t samples
    for n in args.sizes:
        W = expert_matrix(n) if n == 2880 else \
            torch.distributions.StudentT(3.0).sample((n, n)) * 0.02
        spectral.esd(W[:256, :256], dtype=torch.float32)  # warm-up
        t0 = time.perf_counter()
        ev = spectral.esd(W, dtype=torch.float32).double().flip(0)  # descending
        full = time.perf_counter() - t0
        tail = spectral.fit_power_law(ev).num_pl_spikes
        print(f"{n}x{n}: full float32 spectrum {full:.2f} s, fitted tail {tail} eigenvalues")
        for k in args.ks:
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            top = rsvd.top_eigenvalues(W, k, generator=g, dtype=torch.float32).double()
            t = time.perf_counter() - t0
            err = float(((top - ev[:k]).abs() / ev[:k]).max())
            print(f"  top-{k:4d} Krylov float32 {t:.2f} s ({t / full:.2f} of full), "
                  f"max relative error of its {k} values {err:.1e}")


if __name__ == "__main__":
    main()
