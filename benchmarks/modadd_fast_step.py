"""Steps/s of one Nanda modular-addition model (p 113, 30 % of pairs, full batch, float32):
the plain training step against faster variants, side by side in one process.

Variants (each starts from the same init and data, `modadd_train.setup`):

- ``plain``: what ``SingleRun.advance`` does (our minimal AdamW, grads set to None each step);
- ``fused``: ``torch.optim.AdamW(fused=True)``, one kernel over all parameters, and gradients
  zeroed in place (no per-step allocation of grads);
- ``compiled``: ``torch.compile`` (inductor, CPU C++ kernels) of the forward + loss, plain AdamW;
- ``compiled_fused``: both.

Rounds alternate the variants (A B C D A B C D ...) so machine load hits them alike; the best
round of each is reported with its ratio to ``plain``. Equality: fresh copies of each variant
take CHECK_STEPS steps and their parameters are compared with ``plain``'s (max |Δθ|; float
round-off expected, not bit equality: fused kernels and generated code round differently).
Over many steps the trajectories drift apart by up to ~lr per step and parameter however
small the round-off (Adam's m/√v turns noise-level gradients into full-size steps), so the
timed runs' end points are not compared. Compilation time is reported apart.

    python benchmarks/modadd_fast_step.py [--steps 50] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from toy_experiments import modadd as ma
from toy_experiments import modadd_train as mt

CHECK_STEPS = 3


class Variant:
    def __init__(self, name: str):
        self.name = name
        run = mt.Run(preset=mt.PRESETS["nanda"], out=None)
        self.preset = run.preset
        self.data, self.model, opt = mt.setup(run)
        self.fused = name.endswith("fused")
        if self.fused:
            _, lr, wd, eps = self.preset.schedule[0]
            self.opt = torch.optim.AdamW(list(self.model.parameters()), lr=lr,
                                         betas=self.preset.betas, eps=eps, weight_decay=wd,
                                         fused=True)
        else:
            self.opt = opt
        fwd = lambda x, y: ma.loss_fn(self.model(x), y)  # noqa: E731
        self.loss = torch.compile(fwd, dynamic=False) if name.startswith("compiled") else fwd
        self.steps = 0
        t0 = time.perf_counter()
        self.run(2)  # warm-up (compilation for the compiled variants)
        self.warmup_s = time.perf_counter() - t0

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.steps += 1
            lr, wd, eps = mt.hyper(self.preset, self.steps)
            if self.fused:
                for g in self.opt.param_groups:
                    g["lr"], g["weight_decay"], g["eps"] = lr, wd, eps
                self.opt.zero_grad(set_to_none=False)
                self.loss(self.data.train_x, self.data.train_y).backward()
                self.opt.step()
            else:
                self.opt.weight_decay, self.opt.eps = wd, eps
                self.opt.zero_grad()
                self.loss(self.data.train_x, self.data.train_y).backward()
                self.opt.step(lr)
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="plain,fused,compiled,compiled_fused")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    vs = [Variant(n) for n in a.variants.split(",")]
    best = {v.name: 0.0 for v in vs}
    for _ in range(a.rounds):
        for v in vs:
            best[v.name] = max(best[v.name], v.run(a.steps))
    checks = [Variant(v.name) for v in vs]
    for v in checks:
        v.run(CHECK_STEPS)
    ref = {n: p.detach() for n, p in checks[0].model.named_parameters()}
    print(f"threads {a.threads}; {a.steps} steps x {a.rounds} rounds per variant, alternated; "
          f"torch {torch.__version__}")
    for v, c in zip(vs, checks, strict=True):
        diff = max(float((p.detach() - ref[n]).abs().max())
                   for n, p in c.model.named_parameters())
        ratio = best[v.name] / best[vs[0].name]
        print(f"  {v.name:15s} {best[v.name]:6.1f} steps/s = {ratio:.2f}x "
              f"{vs[0].name}; warm-up {v.warmup_s:5.1f} s; max |Δθ| vs {vs[0].name} after "
              f"{c.steps} steps {diff:.1e}", flush=True)

if __name__ == "__main__":
    main()
