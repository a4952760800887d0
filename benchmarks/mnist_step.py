"""Steps/s of the MNIST notebook step (float64, batch 200): the plain loop vs ``FastMLP``.

Plain = the notebook's own loop: ``nn.Sequential(Flatten, Linear, ReLU, ...)``, batches from
``itertools.cycle(DataLoader(...))``, ``nn.MSELoss``, ``zero_grad``/``backward`` and
``torch.optim.AdamW`` with its defaults. Fast = ``toy_experiments.mlp.FastMLP`` (flat
buffers, hand-written backprop, fused AdamW, the always-blank pixels left out). Both start
from the same weights and see the same batches; the script checks that they end at the same
weights (float round-off), then times them alternately (A B A B ...) in this one process,
per thread count, and prints the ratio.

    python benchmarks/mnist_step.py [--steps 2000] [--rounds 3] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from toy_experiments.mlp import FastMLP, notebook_init


def plain_runner(state: dict, x: torch.Tensor, y: torch.Tensor):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200),
                        nn.ReLU(), nn.Linear(200, 10)).double()
    mlp.load_state_dict({k.replace("fc1", "1").replace("fc2", "3").replace("fc3", "5"): v
                         for k, v in state.items()})
    opt = torch.optim.AdamW(mlp.parameters(), lr=5e-4, weight_decay=0.0)
    loss_fn, one_hots = nn.MSELoss(), torch.eye(10, dtype=torch.float64)
    batches = itertools.cycle(DataLoader(TensorDataset(x, y), batch_size=200, shuffle=False))

    def run(n: int) -> None:
        for xb, yb in itertools.islice(batches, n):
            opt.zero_grad()
            loss_fn(mlp(xb), one_hots[yb]).backward()
            opt.step()
    return run, lambda: {k: v.detach() for k, v in mlp.state_dict().items()}


def fast_runner(state: dict, x: torch.Tensor, y: torch.Tensor):
    fast = FastMLP(state, lr=5e-4, inputs=torch.nonzero(x.ne(0).any(0)).flatten())
    bx = fast.select(x.view(-1, 200, 784))
    bt = nn.functional.one_hot(y, 10).double().view(-1, 200, 10)
    counter = itertools.count()

    def run(n: int) -> None:
        for _ in range(n):
            b = next(counter) % len(bx)
            fast.step(bx[b], bt[b])
    names = {"fc1": "1", "fc2": "3", "fc3": "5"}

    def weights() -> dict:
        sd = fast.module().state_dict()
        return {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in sd.items()}
    return run, weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 784, generator=g, dtype=torch.float64)
    x[:, torch.randperm(784, generator=g)[:179]] = 0  # the notebook subset's 179 blank pixels
    y = torch.randint(0, 10, (1000,), generator=g)
    state = notebook_init(0).state
    (plain, pw), (fast, fw) = plain_runner(state, x, y), fast_runner(state, x, y)
    plain(500)
    fast(500)
    diff = max(float((pw()[k] - fw()[k]).abs().max()) for k in pw())
    print(f"after 500 steps: max |plain - fast| over all weights = {diff:.2e}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rates: dict[str, list[float]] = {"plain": [], "fast": []}
        for _ in range(args.rounds):
            for name, run in (("plain", plain), ("fast", fast)):
                run(50)  # warm
                t0 = time.perf_counter()
                run(args.steps)
                rates[name].append(args.steps / (time.perf_counter() - t0))
        p, f = max(rates["plain"]), max(rates["fast"])
        print(f"threads {threads}: plain {p:7.1f} steps/s  fast {f:7.1f} steps/s  "
              f"ratio {f / p:.2f}  (1e6 steps: plain {1e6 / p / 60:.0f} min, "
              f"fast {1e6 / f / 60:.0f} min; best of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()
