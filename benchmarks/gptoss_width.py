"""Per-matrix cost at gpt-oss width: WeightWatcher 0.7.7 vs llm-audit vs one float32 eigvalsh.

Writes a dense BF16 checkpoint of `--matrices` 2880 × 2880 matrices with realistic, heavy-tailed
spectra (Student-t entries with 3 degrees of freedom plus a low-rank part with power-law
decaying strengths), then, side by side in this one script (fresh processes, imports
included): WeightWatcher 0.7.7 ``analyze(randomize=True, mp_fit=True)`` (through
``ww_reference.py`` in its own venv), the llm-audit CLI with each trap rule (default
precision, ``--format csv,json``), and in this process the floor: one float32
``torch.linalg.eigvalsh`` of a 2880² Gram matrix (the product included). Prints seconds per
matrix, the ratios WW/ours and ours/floor, our stage columns, and the α/xmin/D agreement.
`--no-anatomy` runs give WeightWatcher's answers only (trap counts, no classes or locations).
The floor is also given as a rate: one eigvalsh per core at once, one thread each (what the
default `--executor auto` does with matrices), so ours/rate compares like with like.

    python benchmarks/gptoss_width.py [--matrices 8] [--ww-python /work/wwvenv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
N = 2880
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")


def heavy_tailed(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = _student_t(g, 3.0)
    k = 64
    U = torch.linalg.qr(torch.randn(N, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(N, k, generator=g)).Q
    s = 40.0 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    return ((W / 3 ** 0.5 + (U * s) @ V.T) * 0.02).to(torch.bfloat16)


def _student_t(g: torch.Generator, nu: float) -> torch.Tensor:
    """Student-t(nu) entries from a seeded generator: z / sqrt(chi2_nu / nu)."""
    z = torch.randn(N, N, generator=g)
    chi2 = torch.randn(int(nu), N, N, generator=g).pow(2).sum(0)
    return z / (chi2 / nu).sqrt()


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def floor_seconds(W: torch.Tensor, repeats: int = 3) -> float:
    A = W.float()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.linalg.eigvalsh(A.T @ A)
        best = min(best, time.perf_counter() - t0)
    return best


def floor_throughput(W: torch.Tensor, repeats: int = 2) -> float:
    """Seconds per matrix of the floor done the way `--executor threads` does matrices: one
    eigvalsh per core at once, one intra-op thread each (the best per-matrix rate of the
    cores when matrices are spread over them)."""
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0))
    A, before = W.float(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        with ThreadPoolExecutor(cores) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(lambda _: torch.linalg.eigvalsh(A.T @ A), range(cores)))
                best = min(best, (time.perf_counter() - t0) / cores)
        return best
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--configs", default="tw,ww,tw --no-anatomy,ww --no-anatomy",
                    help="llm-audit runs, comma-separated: a trap rule and extra CLI flags")
    ap.add_argument("--ww-python", default=os.environ.get("WW_PYTHON", "/work/wwvenv/bin/python"))
    args = ap.parse_args()
    n = args.matrices
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.safetensors"
        tensors = {f"layers.{i}.mlp.proj.weight": heavy_tailed(i) for i in range(n)}
        save_file(tensors, model)
        floor = floor_seconds(next(iter(tensors.values())))
        rate = floor_throughput(next(iter(tensors.values())))
        ww_s = timed([args.ww_python, str(HERE / "ww_reference.py"), str(model),
                      f"{tmp}/ww.csv"])
        ours = {}
        for k, config in enumerate(args.configs.split(",")):
            rule, *extra = config.split()
            ours[config] = (f"{tmp}/ours{k}", timed(
                [sys.executable, "-m", "llm_audit", str(model), "--out", f"{tmp}/ours{k}",
                 "--trap-rule", rule, *extra, "--format", "csv,json", "-q"]))
        ww = pd.read_csv(f"{tmp}/ww.csv").set_index("name")
        print(f"{n} BF16 matrices {N}x{N}; cores {os.cpu_count()}; whole processes")
        print(f"floor (one float32 eigvalsh of a {N}^2 Gram, product included): {floor:.2f} s; "
              f"as a rate, one per core at once on one thread each: {rate:.2f} s/matrix")
        print(f"WeightWatcher 0.7.7: {ww_s:.1f} s = {ww_s / n:.2f} s/matrix")
        for rule, (folder, sec) in ours.items():
            d = pd.read_csv(f"{folder}/layers.csv").set_index("name")
            per = sec / n
            stages = {c: d[c].mean() for c in ("eigen_seconds", "fit_seconds", "trap_seconds")}
            both = d.index.intersection(ww.index)
            dev = {c: float((d.loc[both, c] - ww.loc[both, c]).abs().max())
                   for c in ("alpha", "xmin", "D")}
            print(f"llm-audit --trap-rule {rule}: {sec:.1f} s = {per:.2f} s/matrix; WW/ours "
                  f"{ww_s / sec:.1f}x; ours/floor {per / floor:.2f} (/rate {per / rate:.2f}); "
                  "stages per matrix (in its thread) "
                  + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f} s" for k, v in stages.items())
                  + f"; float64 redone {int((d.precision == 'float64').sum())}/{n}; max |Δ| vs "
                  f"WW: " + ", ".join(f"{k} {v:.1e}" for k, v in dev.items())
                  + f"; traps {d.rand_num_spikes.tolist()} (WW {ww.rand_num_spikes.tolist()})")


if __name__ == "__main__":
    main()
