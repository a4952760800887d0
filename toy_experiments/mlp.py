"""The MNIST MLP3 of the authors' notebook, and a fast trainer for it.

Model: 784→200→200→10 ReLU (``nn.Linear`` layers ``fc1``, ``fc2``, ``fc3``), PyTorch's default
init, then every parameter (biases too) × ``init_scale``.

``notebook_init`` reproduces, from an explicit ``torch.Generator`` (no global RNG), the draws of
the notebook's cell ``wd_0.0_replicate`` after ``torch.manual_seed(seed)``: one DataLoader
iteration for ``fixed_train`` (its base seed, then the RandomSampler's seed), the three
``nn.Linear`` inits, then the training loader's first iteration. ``itertools.cycle`` (the cell
imports it over the notebook's own ``cycle``) caches that first epoch, so training replays the
same 5 batches, in the same order, forever.

``FastMLP`` trains the same model with the same AdamW update at a fraction of the cost of the
plain ``nn.Module`` + autograd loop (``benchmarks/mnist_step.py``): every parameter is a view
into one flat float64 buffer and every gradient a view into another, the forward/backward is
written out as matmuls into preallocated buffers (no autograd graph, no per-step allocation
beyond two boolean masks), and ``torch.optim.AdamW(fused=True)`` updates the one flat buffer in
one kernel. AdamW is elementwise, so one flat parameter is the same update as six.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SIZES = (("fc1", 784, 200), ("fc2", 200, 200), ("fc3", 200, 10))  # (name, in, out)


class MLP3(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, width: int = 200):
        super().__init__()
        self.fc1 = nn.Linear(784, width, dtype=dtype)
        self.fc2 = nn.Linear(width, width, dtype=dtype)
        self.fc3 = nn.Linear(width, 10, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def forward_with_hiddens(model: MLP3, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [hidden 1, hidden 2]) with the ReLU outputs (``measure.Forward``)."""
    h1 = torch.relu(model.fc1(x))
    h2 = torch.relu(model.fc2(h1))
    return model.fc3(h2), [h1, h2]


@dataclass(frozen=True)
class NotebookDraws:
    state: dict[str, torch.Tensor]  # initial parameters, already × init_scale
    fixed_batch: torch.Tensor  # (200,) subset positions of ``fixed_train`` (circuit complexity)
    train_order: torch.Tensor  # (n,) subset positions of the cycled epoch: 5 batches of 200


def _sampler_perm(g: torch.Generator, n: int) -> torch.Tensor:
    """The draws of one ``iter(DataLoader(shuffle=True))`` + first ``next``: the iterator's base
    seed, then the RandomSampler's seed, then ``randperm`` from a generator with that seed."""
    torch.empty((), dtype=torch.int64).random_(generator=g)  # _BaseDataLoaderIter._base_seed
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=g).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def notebook_init(seed: int = 0, n_train: int = 1000, init_scale: float = 4.0,
                  dtype: torch.dtype = torch.float64) -> NotebookDraws:
    """The notebook's initial weights and batch orders for ``torch.manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    fixed = _sampler_perm(g, n_train)[:200]
    state = {}
    for name, fan_in, fan_out in SIZES:
        w = torch.empty(fan_out, fan_in, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)  # nn.Linear.reset_parameters
        b = torch.empty(fan_out, dtype=dtype)
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(b, -bound, bound, generator=g)
        state[f"{name}.weight"], state[f"{name}.bias"] = w * init_scale, b * init_scale
    return NotebookDraws(state=state, fixed_batch=fixed, train_order=_sampler_perm(g, n_train))


def _views(flat: torch.Tensor, n_in: int = 784) -> dict[str, torch.Tensor]:
    """Views of the parameters in `flat`; fc1's weight holds `n_in` input columns."""
    out, o = {}, 0
    for name, fan_in, fan_out in SIZES:
        fan_in = n_in if name == "fc1" else fan_in
        for suffix, shape in (("weight", (fan_out, fan_in)), ("bias", (fan_out,))):
            n = math.prod(shape)
            out[f"{name}.{suffix}"] = flat[o:o + n].view(shape)
            o += n
    return out


def num_parameters(n_in: int = 784) -> int:
    return sum(fan_out * ((n_in if name == "fc1" else fan_in) + 1)
               for name, fan_in, fan_out in SIZES)


class FastMLP:
    """MLP3 parameters in one flat buffer, trained by hand-written backprop + fused AdamW.

    ``step(x, t)`` is one AdamW step on the mean-squared error of the batch ``x`` (B, n_in)
    against targets ``t`` (B, 10), the same update as autograd + ``torch.optim.AdamW`` to float
    round-off (tests/test_toy_mnist.py). ``inputs``: the pixels that are non-zero in some
    training image (None: all 784). The others get exactly zero gradient forever, so AdamW
    never moves their fc1 columns (weight decay only shrinks them by (1 − lr·wd) a step): they
    are kept out of the matmuls and the optimizer, and ``x`` holds only ``inputs``' columns
    (``select``). ``module()`` assembles an ``MLP3`` with the current weights.
    """

    def __init__(self, state: dict[str, torch.Tensor], *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 batch: int = 200, device: torch.device | str = "cpu",
                 inputs: torch.Tensor | None = None):
        dtype = state["fc1.weight"].dtype
        self.inputs = torch.arange(784) if inputs is None else inputs.cpu()
        rest = torch.ones(784, dtype=torch.bool)
        rest[self.inputs] = False
        self.rest = torch.nonzero(rest).flatten()
        self.lr, self.weight_decay, self.t = lr, weight_decay, 0
        self.flat = nn.Parameter(torch.zeros(num_parameters(len(self.inputs)), dtype=dtype,
                                             device=device))
        self.flat.grad = torch.zeros_like(self.flat)
        self.p = _views(self.flat.data, len(self.inputs))
        self.g = _views(self.flat.grad, len(self.inputs))
        with torch.no_grad():
            for k, v in self.p.items():
                v.copy_(state[k][:, self.inputs] if k == "fc1.weight" else state[k])
        self.w1_rest = state["fc1.weight"][:, self.rest].to(device).clone()  # at step 0
        fused = torch.device(device).type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW([self.flat], lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay, fused=fused)

        def buf(n: int) -> torch.Tensor:
            return torch.empty(batch, n, dtype=dtype, device=device)
        self._h1, self._h2, self._y = buf(200), buf(200), buf(10)
        self._d1, self._d2, self._dy = buf(200), buf(200), buf(10)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The columns of ``x`` (..., 784) that ``step`` takes."""
        return x[..., self.inputs.to(x.device)].contiguous()

    @torch.no_grad()
    def step(self, x: torch.Tensor, t: torch.Tensor) -> None:
        p, g = self.p, self.g
        h1, h2, y, d1, d2, dy = self._h1, self._h2, self._y, self._d1, self._d2, self._dy
        torch.addmm(p["fc1.bias"], x, p["fc1.weight"].t(), out=h1).relu_()  # (B, 200)
        torch.addmm(p["fc2.bias"], h1, p["fc2.weight"].t(), out=h2).relu_()  # (B, 200)
        torch.addmm(p["fc3.bias"], h2, p["fc3.weight"].t(), out=y)  # (B, 10)
        torch.sub(y, t, out=dy).mul_(2.0 / dy.numel())  # d mean((y - t)²) / dy
        torch.mm(dy.t(), h2, out=g["fc3.weight"])
        torch.sum(dy, 0, out=g["fc3.bias"])
        torch.mm(dy, p["fc3.weight"], out=d2).mul_(h2 > 0)  # ReLU' (0 at 0, as autograd)
        torch.mm(d2.t(), h1, out=g["fc2.weight"])
        torch.sum(d2, 0, out=g["fc2.bias"])
        torch.mm(d2, p["fc2.weight"], out=d1).mul_(h1 > 0)
        torch.mm(d1.t(), x, out=g["fc1.weight"])
        torch.sum(d1, 0, out=g["fc1.bias"])
        self.opt.step()
        self.t += 1

    def module(self) -> MLP3:
        """An MLP3 holding a copy of the current weights (all 784 fc1 columns)."""
        m = MLP3(dtype=self.flat.dtype).to(self.flat.device).requires_grad_(False)
        with torch.no_grad():
            for name, _, _ in SIZES:
                lin = getattr(m, name)
                lin.bias.copy_(self.p[f"{name}.bias"])
                if name != "fc1":
                    lin.weight.copy_(self.p[f"{name}.weight"])
            dev = self.flat.device
            m.fc1.weight[:, self.inputs.to(dev)] = self.p["fc1.weight"]
            decay = (1 - self.lr * self.weight_decay) ** self.t
            m.fc1.weight[:, self.rest.to(dev)] = self.w1_rest * decay
        return m

    def state_dict(self) -> dict:
        return {"flat": self.flat.detach().clone(), "opt": self.opt.state_dict(),
                "inputs": self.inputs, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.flat.copy_(state["flat"])
        self.opt.load_state_dict(state["opt"])
        if "t" in state:
            self.t = int(state["t"])
        else:  # a checkpoint from before `t` was kept: AdamW's own step count
            self.t = int(state["opt"]["state"].get(0, {}).get("step", 0))


class PlainMLP:
    """The reference trainer (what the notebook does): ``MLP3`` + autograd + torch's default
    ``AdamW``, with ``FastMLP``'s interface. Same update up to float round-off: a whole run
    with each shows how far round-off alone moves a chaotic trajectory."""

    def __init__(self, state: dict[str, torch.Tensor], *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 batch: int = 200, device: torch.device | str = "cpu",
                 inputs: torch.Tensor | None = None):  # all 784 are trained
        self.model = MLP3(dtype=state["fc1.weight"].dtype).to(device)
        self.model.load_state_dict(state)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay)
        self.flat = self.model.fc1.weight  # dtype/device, as FastMLP.flat

    @staticmethod
    def select(x: torch.Tensor) -> torch.Tensor:
        return x

    def step(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.opt.zero_grad()
        nn.functional.mse_loss(self.model(x), t).backward()
        self.opt.step()

    def module(self) -> MLP3:
        return self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


TRAINERS = {"fast": FastMLP, "plain": PlainMLP}
