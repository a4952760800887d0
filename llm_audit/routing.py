"""Stage 1 (continued): turn a checkpoint's tensors into matrix jobs.

Decides which tensors are weight matrices, which tensors travel together (a quantized weight and
its scales), how a tensor name maps to `layer` / `module` / `expert`, and why the rest is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .source import TensorInfo

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_SKIP_PATTERNS = (
    (re.compile(r"(^|[._])bias$"), "bias"),
    (re.compile(r"norm", re.I), "normalisation"),
    (re.compile(r"rotary|inv_freq|position_ids|masked_bias|attn\.bias$"), "buffer"),
)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|decoder\.layers?)\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"\.(\d+)\.")
_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass(frozen=True)
class MatrixJob:
    """One weight matrix (or one stack of experts) to decode and analyse.

    `parts[0]` is the weight tensor; further parts (scales) are consumed with it.
    `scheme` tells decode how to turn the bytes into floats. `fused` names the modules whose
    rows (`fused_dim` 0) or columns (1) alternate in one stored matrix (gpt-oss `gate_up`):
    decode splits them into one matrix each. `transposed`: the tensor is stored (in, out)
    (gpt-oss's BF16 expert stacks); decode turns it into the canonical (out, in) of
    ``nn.Linear`` and of the MXFP4 copy, so both give the same rows, shuffles included.
    `hf_module`: the Hugging Face module name of a GGUF tensor (empty: `module` is one).
    """

    name: str
    layer: int | None
    module: str
    scheme: str
    parts: tuple[TensorInfo, ...]
    expert: int | None = None
    fused: tuple[str, ...] = ()
    fused_dim: int = 0
    transposed: bool = False
    hf_module: str = ""

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the decoded matrix (of one expert, before a fused split)."""
        shape = self.parts[0].shape
        if self.scheme == "mxfp4":  # blocks [..., R, G, 16] hold R x G*32 values
            return shape[-3], shape[-2] * 32
        return (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])


@dataclass(frozen=True)
class Skipped:
    """A tensor that looks like a weight but is not analysed, with the reason."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    reason: str


def parse_layer(name: str) -> int | None:
    """Block index from a tensor name: 'model.layers.3.mlp...' -> 3, 'encoder.layer.0...' -> 0."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1))
    m = _ANY_INDEX_RE.search("." + name)
    return int(m.group(1)) if m else None


def parse_expert(name: str) -> int | None:
    """Expert index of a per-expert tensor: '...mlp.experts.7.w1.weight' -> 7."""
    m = _EXPERT_RE.search(name)
    return int(m.group(1)) if m else None


def parse_module(name: str) -> str:
    """Module type from a tensor name: the last component before '.weight'."""
    parts = [p for p in name.split(".") if p not in ("weight",)]
    while len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    return parts[-1] if parts else name


def is_ignored(t: TensorInfo) -> str | None:
    """Why a tensor is not a weight matrix at all (biases, norms, buffers, 1-D), or None."""
    if len(t.shape) < 2:
        return f"{len(t.shape)}-D"
    for pattern, why in _SKIP_PATTERNS:
        if pattern.search(t.name):
            return why
    return None
