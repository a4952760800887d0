"""A minimal AdamW (same update as ``torch.optim.AdamW``, foreach-free), cheap to construct.

``torch.optim`` imports the compiler stack on first use (seconds on a small CPU); this one is a
few tensor ops per parameter and keeps its state in plain tensors for checkpoints.
"""

from __future__ import annotations

import torch


class AdamW:
    def __init__(self, params: list[torch.nn.Parameter], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update from the ``.grad`` of each parameter (as torch.optim.AdamW, amsgrad off)."""
        self.t += 1
        bc1 = 1 - self.beta1 ** self.t
        bc2_sqrt = (1 - self.beta2 ** self.t) ** 0.5
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            g = p.grad
            if self.weight_decay:
                p.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [m.clone() for m in self.m], "v": [v.clone() for v in self.v]}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for dst, src in zip(self.m + self.v, list(state["m"]) + list(state["v"]), strict=True):
            dst.copy_(src)
