"""Stage 1-2 (GGUF): plan the tensors of a GGUF checkpoint into matrix jobs, and decode them.

Rows keep the stored names (``blk.12.attn_q.weight``; expert e of a 3-D ``*_exps`` stack is
``blk.3.ffn_down_exps.weight[e]``); `module` is the GGUF one (``attn_q``, ``ffn_down_exps``) and
`hf_module` the Hugging Face module it corresponds to (``q_proj``, ``down_proj``), so a GGUF and
a safetensors audit of one model match on (layer, hf_module, expert) in ``diff.py``. `dtype` is
the GGML type (``Q8_0``, ``Q4_K``, ``F16``, ...).

Decoding (scheme ``gguf``, on the background reader like every decoder): float types are viewed
as stored; quantized ones are dequantized by the `gguf` package (``gguf.quants.dequantize``),
one matrix, or one expert's contiguous slice of a stack, at a time.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for some architectures (llama's
rotary layout). Row permutations leave WᵀW, hence the spectrum, α and the norms, unchanged; trap
counts (shuffles of the entries) are equal in distribution.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch

from .errors import DecodeError
from .plan import expert_slice
from .routing import MatrixJob, Skipped, is_ignored, parse_layer, parse_module
from .source import TensorInfo

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
INT_TYPES = ("I8", "I16", "I32", "I64")
#: GGUF module (the name's last component, stack suffixes dropped) -> Hugging Face module
HF_MODULES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "attn_qkv": "qkv_proj", "attn_q_a": "q_a_proj", "attn_q_b": "q_b_proj",
    "attn_kv_a_mqa": "kv_a_proj_with_mqa", "attn_kv_b": "kv_b_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    "ffn_gate_up": "gate_up_proj", "ffn_gate_inp": "gate",
    "token_embd": "embed_tokens", "output": "lm_head",
}
#: stacked experts, shared experts, and their combinations
_STACK_SUFFIXES = ("_exps", "_shexp", "_chexps")
_BLOCK_RE = re.compile(r"(?:^|\.)blk\.(\d+)\.")


def hf_module(module: str) -> str:
    """The Hugging Face name of a GGUF module: ffn_down_exps -> down_proj; unknown: itself."""
    base = module
    for suffix in _STACK_SUFFIXES:
        base = base.removesuffix(suffix)
    return HF_MODULES.get(base, module)


def gguf_layer(name: str) -> int | None:
    """Block index of a GGUF tensor name: 'blk.12.attn_q.weight' -> 12, 'output.weight' -> None."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else parse_layer(name)


def plan_gguf(tensors: Iterable[TensorInfo]) -> tuple[list[MatrixJob], list[Skipped]]:
    """Matrix jobs (one per 2-D weight, one per expert of a ``*_exps`` stack) and the
    tensors skipped with their reason, in file order."""
    jobs: list[MatrixJob] = []
    skipped: list[Skipped] = []
    why_type: dict[str, str | None] = {}  # GGML type -> why it cannot be decoded (probed once)
    for t in tensors:
        if is_ignored(t):  # 1-D, norms, biases
            continue
        if t.dtype not in why_type:
            why_type[t.dtype] = undecodable(t.dtype)
        why = why_type[t.dtype] or _shape_problem(t)
        if why:
            skipped.append(Skipped(t.name, t.dtype, t.shape, why))
            continue
        module = parse_module(t.name)
        layer, hf = gguf_layer(t.name), hf_module(module)
        if len(t.shape) == 2:
            jobs.append(MatrixJob(t.name, layer, module, "gguf", (t,), hf_module=hf))
        else:  # (experts, out, in): expert e's bytes are contiguous
            jobs.extend(MatrixJob(f"{t.name}[{e}]", layer, module, "gguf", (expert_slice(t, e),),
                                  expert=e, hf_module=hf) for e in range(t.shape[0]))
    return jobs, skipped


def _shape_problem(t: TensorInfo) -> str | None:
    if len(t.shape) == 3 and not parse_module(t.name).endswith("_exps"):
        return "3-D tensor that is not a *_exps expert stack"
    if len(t.shape) > 3:
        return f"{len(t.shape)}-D tensor with no known layout"
    if min(t.shape[-2:]) < 2:
        return "fewer than 2 rows or columns"
    return None


def undecodable(dtype: str) -> str | None:
    """Why tensors of GGML type `dtype` cannot be decoded (None: they can)."""
    if dtype in FLOAT_TYPES:
        return None
    if dtype in INT_TYPES:
        return f"GGML integer type {dtype} is not a weight matrix"
    import numpy as np

    from .gguf_source import gguf_version, import_gguf

    gguf = import_gguf()
    qtype = gguf.GGMLQuantizationType[dtype]
    one_block = np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    try:
        gguf.quants.dequantize(one_block, qtype)
    except (NotImplementedError, ValueError, AssertionError, KeyError) as e:
        return (f"GGML type {dtype} cannot be dequantized by gguf {gguf_version()} "
                f"({type(e).__name__}: {e}); a newer gguf may (pip install -U gguf)")
    return None


def decode_gguf(job: MatrixJob, reader, device: torch.device) -> torch.Tensor:
    """One GGUF matrix (or one expert's slice) as float32 (out, in) on `device` (float64 for
    F64): float types viewed as stored, quantized ones dequantized by gguf on the CPU."""
    (info,) = job.parts
    if info.dtype in FLOAT_TYPES:
        t = reader.raw(info, device)
        return t if t.dtype == torch.float64 else t.to(torch.float32)
    from .gguf_source import import_gguf

    gguf = import_gguf()
    rows, cols = info.shape[-2:]
    raw = reader.raw(dataclasses.replace(info, dtype="U8", shape=(rows, info.nbytes // rows)),
                     torch.device("cpu"))
    try:
        W = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[info.dtype])
    except (NotImplementedError, ValueError, KeyError) as e:
        raise DecodeError(f"{info.file}: tensor {job.name!r}: {info.dtype} {[rows, cols]} cannot "
                          f"be dequantized ({type(e).__name__}: {e})") from e
    if tuple(W.shape) != (rows, cols):
        raise DecodeError(f"{info.file}: tensor {job.name!r}: {info.dtype} dequantized to "
                          f"{list(W.shape)}, expected {[rows, cols]}")
    return torch.from_numpy(W).to(device)
