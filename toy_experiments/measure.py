"""The comparison signals of the toy experiments: what is measured on the model besides the audit.

Model-agnostic: every function takes a ``torch.nn.Module`` and, where activations are needed,
a ``forward`` callable ``forward(model, x) -> (logits, hiddens)`` where ``logits`` is
(batch, classes) and ``hiddens`` is a list of hidden activation tensors (any shapes).

- ``comparison_signals``: the paper's baselines (ℓ2 norm, activation sparsity, absolute weight
  entropy, approximate local circuit complexity);
- ``notebook_signals``: the same four as the authors' MNIST notebook computes them.

The audit rows are in ``audit.py``, the output files in ``outputs.py``, the measurement
schedules in ``schedules.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "SIGNAL_COLUMNS", "Forward", "abs_weight_entropy", "activation_sparsity",
    "circuit_complexity", "comparison_signals", "l2_norm", "notebook_signals",
    "weight_tensors", "zero_fraction",
]

Forward = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]

SIGNAL_COLUMNS = ("l2_norm", "activation_sparsity", "abs_weight_entropy", "circuit_complexity")


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights (parameters with >= 2 dimensions: no biases, no norms' gains)."""
    return [p.detach() for p in model.parameters() if p.dim() >= 2]


@torch.no_grad()
def l2_norm(model: torch.nn.Module) -> float:
    """ℓ2 norm of all parameters together (float64 accumulation)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


@torch.no_grad()
def abs_weight_entropy(model: torch.nn.Module) -> float:
    """Absolute weight entropy −Σ |w| ln |w| over all weights (0 ln 0 = 0)."""
    total = 0.0
    for w in weight_tensors(model):
        a = w.double().abs()
        total -= float(torch.xlogy(a, a).sum())
    return total


@torch.no_grad()
def activation_sparsity(hiddens: Sequence[torch.Tensor], threshold: float = 1e-3) -> float:
    """Fraction of hidden activations with |h| below ``threshold`` (pooled over all layers)."""
    below = sum(int((h.abs() < threshold).sum()) for h in hiddens)
    total = sum(h.numel() for h in hiddens)
    return below / total if total else math.nan


@torch.no_grad()
def zero_fraction(model: torch.nn.Module, fraction: float,
                  generator: torch.Generator) -> torch.nn.Module:
    """A copy of ``model`` with ``fraction`` of each weight tensor's entries set to zero."""
    pruned = copy.deepcopy(model)
    for p in pruned.parameters():
        if p.dim() >= 2:
            r = torch.rand(p.shape, generator=generator, device=generator.device)
            p.masked_fill_((r < fraction).to(p.device), 0.0)
    return pruned


@torch.no_grad()
def circuit_complexity(model: torch.nn.Module, x: torch.Tensor, forward: Forward,
                       generator: torch.Generator, fraction: float = 0.1) -> float:
    """Approximate local circuit complexity Σ_k KL(softmax f_W(x_k) ‖ softmax f_W'(x_k)),
    W' = W with ``fraction`` of the weights zeroed (Golechha 2024)."""
    logp = torch.log_softmax(forward(model, x)[0].double(), dim=-1)
    logq = torch.log_softmax(forward(zero_fraction(model, fraction, generator), x)[0].double(),
                             dim=-1)
    return float((logp.exp() * (logp - logq)).sum())


@torch.no_grad()
def comparison_signals(model: torch.nn.Module, x: torch.Tensor, forward: Forward, *,
                       generator: torch.Generator, fraction: float = 0.1,
                       sparsity_threshold: float = 1e-3) -> dict[str, float]:
    """The four comparison signals of the paper, keyed by ``SIGNAL_COLUMNS``."""
    _, hiddens = forward(model, x)
    return dict(l2_norm=l2_norm(model),
                activation_sparsity=activation_sparsity(hiddens, sparsity_threshold),
                abs_weight_entropy=abs_weight_entropy(model),
                circuit_complexity=circuit_complexity(model, x, forward, generator, fraction))


@torch.no_grad()
def notebook_signals(model: torch.nn.Module, x: torch.Tensor, *, generator: torch.Generator,
                     first: str = "fc1", tau: float = 1.0, p: float = 0.5) -> dict[str, float]:
    """The comparison signals as the authors' notebook computes them (``progress_measures``)
    on one fixed batch ``x`` of training images, keyed by ``SIGNAL_COLUMNS``:

    - activation sparsity: the fraction of the first ReLU's outputs below ``tau`` (= 1);
    - absolute weight entropy of the first layer: −Σ |w| ln(|w| + 1e-8);
    - circuit complexity: mean over the batch of KL(softmax f_W(x) ‖ softmax f_W'(x)), with
      W' = ``F.dropout(W, p)`` on every weight matrix (biases kept): entries zeroed with
      probability p, the rest × 1/(1 − p); 1e-8 added to both softmaxes; the dropout mask
      from ``generator`` (the notebook draws it from the global RNG);
    - the ℓ2 norm of all parameters.
    """
    lin = getattr(model, first)
    h = torch.relu(lin(x))
    w = lin.weight.abs()
    pruned = copy.deepcopy(model)
    for name, q in pruned.named_parameters():
        if name.endswith("weight"):
            keep = torch.rand(q.shape, generator=generator, device=generator.device) >= p
            q.mul_(keep.to(q.device, q.dtype) / (1 - p))
    p1 = torch.softmax(model(x), dim=1) + 1e-8
    p2 = torch.softmax(pruned(x), dim=1) + 1e-8
    return dict(l2_norm=l2_norm(model),
                activation_sparsity=float((h < tau).double().mean()),
                abs_weight_entropy=-float((w * torch.log(w + 1e-8)).sum()),
                circuit_complexity=float((p1 * (p1.log() - p2.log())).sum(1).mean()))
