"""A small deterministic checkpoint with known answers, for `llm-audit demo` (no network).

Four layers of a toy MLP whose spectra are built to show each verdict:
- `layers.0` heavy-tailed (Student-t, correlated): a well-trained-looking α in 2..6;
- `layers.1` pure Gaussian: random-like, α > 6 (under-trained);
- `layers.2` a few huge entries planted: correlation traps that survive shuffling;
- `layers.3` a strong low-rank structure: α < 2 (over-trained), but no traps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def demo_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, m = 512, 256
    # heavy-tailed correlations: W = A·diag(s)·B with a power-law singular-value profile
    A, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    B, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    s = torch.arange(1, m + 1, dtype=torch.float32) ** -0.6
    heavy = (A * s) @ B.T + 0.01 * torch.randn(n, m, generator=g)
    gauss = torch.randn(n, m, generator=g) / m**0.5
    trapped = torch.randn(n, m, generator=g) / m**0.5
    for k in range(4):  # entries ~40 standard deviations out: spikes after any shuffle
        trapped[37 * k + 5, 11 * k + 3] = 2.5 * (1 + k)
    u, v = torch.randn(n, 8, generator=g), torch.randn(8, m, generator=g)
    lowrank = (u @ v) / m + 0.002 * torch.randn(n, m, generator=g)
    return {
        "model.layers.0.mlp.up_proj.weight": heavy.contiguous(),
        "model.layers.1.mlp.up_proj.weight": gauss,
        "model.layers.2.mlp.up_proj.weight": trapped,
        "model.layers.3.mlp.up_proj.weight": lowrank,
        "model.layers.0.mlp.up_proj.bias": torch.zeros(n),
        "model.norm.weight": torch.ones(m),
    }


def write_demo_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo checkpoint as `folder/model.safetensors` (bf16 like real LLM weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in demo_tensors(seed).items()}, path,
              metadata={"format": "pt", "source": "llm-audit demo"})
    return path
