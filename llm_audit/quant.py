"""Stage 2 (quantized formats): pure dequantization on torch tensors, on any device.

- MXFP4 (OCP MX, gpt-oss): `blocks` U8 [..., R, G, 16] holds two FP4 E2M1 codes per byte, low
  nibble first; `scales` U8 [..., R, G] is one E8M0 scale 2^(s-127) per 32 values along the last
  (input) dimension; s = 255 is NaN in the OCP spec (counted by :func:`mxfp4_nan_rows`).
- FP8 with block scales (DeepSeek-V3 style): value = q · scale_inv[i // 128, j // 128]
  (multiply, despite the name); edge blocks may be partial.
- Scaled weights (compressed-tensors FP8/INT8, fbgemm FP8): value = q · scale with a per-tensor,
  per-channel ([rows, 1]) or per-group ([rows, groups]) scale.

The `decode_*` adapters at the end read a job's tensors and are registered in
``decode.DECODERS``; they return ``(W, nan_rows)`` or ``W``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .errors import DecodeError

if TYPE_CHECKING:  # only for annotations: decode imports this module
    from .decode import TensorReader
    from .routing import MatrixJob

#: FP4 E2M1 code -> value (bit 3 sign, bits 2-1 exponent, bit 0 mantissa)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_BLOCK = 32  # values per MXFP4 scale
E8M0_NAN = 255  # the NaN scale of the OCP MX spec
FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size


def fp4_pair_table(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(256, 2) table: byte -> (value of its low nibble, value of its high nibble)."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """Exact float32 2^(s-127) from E8M0 bytes, built from the bit pattern; 255 -> NaN."""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23)  # 2^-127 is subnormal
    bits = torch.where(s == E8M0_NAN, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks U8 [..., R, G, 16] + scales U8 [..., R, G] -> float32 [..., R, G*32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise DecodeError(f"MXFP4 needs U8 blocks and scales, got {blocks.dtype} and "
                          f"{scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != MX_BLOCK // 2 or tuple(blocks.shape[:-1]) != \
            tuple(scales.shape):
        raise DecodeError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do "
                          "not match (need blocks [..., G, 16] and scales [..., G])")
    pairs = fp4_pair_table(blocks.device)[blocks.to(torch.int32)]  # [..., G, 16, 2]
    vals = pairs.reshape(*scales.shape, MX_BLOCK)
    vals.mul_(e8m0_to_float(scales).unsqueeze(-1))
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * MX_BLOCK)


def mxfp4_nan_rows(scales: torch.Tensor) -> torch.Tensor:
    """Per-row count of NaN (255) scales: scales [..., R, G] -> int64 [..., R]."""
    return (scales == E8M0_NAN).sum(dim=-1)


def fp8_block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> torch.Tensor:
    """FP8 [R, C] times block scales [ceil(R/b0), ceil(C/b1)] -> float32 [R, C]."""
    if q.ndim != 2 or scale_inv.ndim != 2:
        raise DecodeError(f"block-scaled FP8 needs a 2-D weight and 2-D scales, got "
                          f"{list(q.shape)} and {list(scale_inv.shape)}")
    (R, C), (b0, b1) = q.shape, block
    want = (math.ceil(R / b0), math.ceil(C / b1))
    if tuple(scale_inv.shape) != want:
        raise DecodeError(f"FP8 weight {[R, C]} with {b0}x{b1} blocks needs scales {list(want)}, "
                          f"got {list(scale_inv.shape)}")
    W = q.to(torch.float32)
    s = scale_inv.to(torch.float32)
    for i in range(want[0]):  # one block row at a time: no full-size scale tensor
        rows = W[i * b0:(i + 1) * b0]
        rows.mul_(s[i].repeat_interleave(b1)[:C])
    return W


def scaled_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [R, C] times a per-tensor, per-channel [R, 1] or per-group [R, G] scale -> float32."""
    if q.ndim != 2:
        raise DecodeError(f"scaled weight must be 2-D, got {list(q.shape)}")
    R, C = q.shape
    W = q.to(torch.float32)
    s = scale.to(device=W.device, dtype=torch.float32)
    if s.numel() == 1:
        return W.mul_(s.reshape(()))
    if s.ndim == 1 and s.shape[0] == R:
        s = s.unsqueeze(1)
    if s.ndim == 2 and s.shape[0] == R and s.shape[1] > 0 and C % s.shape[1] == 0:
        G = s.shape[1]
        return W.view(R, G, C // G).mul_(s.unsqueeze(-1)).view(R, C)
    raise DecodeError(f"scale {list(scale.shape)} does not fit weight {[R, C]} (need per-tensor "
                      "[1], per-channel [rows, 1] or per-group [rows, groups])")


def deinterleave(W: torch.Tensor, parts: int, dim: int = 0) -> list[torch.Tensor]:
    """Split a fused matrix whose rows (dim 0) or columns (dim 1) alternate between `parts`."""
    if W.shape[dim] % parts:
        raise DecodeError(f"fused matrix {list(W.shape)}: dim {dim} is not a multiple of {parts}")
    return [(W[i::parts] if dim == 0 else W[:, i::parts]).contiguous() for i in range(parts)]


# --- job adapters (registered in decode.DECODERS) -------------------------------------------

def decode_mxfp4(job: MatrixJob, reader: TensorReader,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    blocks_info, scales_info = job.parts
    blocks, scales = reader.raw(blocks_info, device), reader.raw(scales_info, device)
    W = _in_context(blocks_info, mxfp4_dequantize, blocks, scales)
    return W, mxfp4_nan_rows(scales)


def decode_fp8_block(job: MatrixJob, reader: TensorReader, device: torch.device) -> torch.Tensor:
    w_info, s_info = job.parts
    return _in_context(w_info, fp8_block_dequantize, reader.raw(w_info, device),
                       reader.raw(s_info, device))


def decode_scaled(job: MatrixJob, reader: TensorReader, device: torch.device) -> torch.Tensor:
    w_info, s_info = job.parts
    return _in_context(w_info, scaled_dequantize, reader.raw(w_info, device),
                       reader.raw(s_info, device))


def _in_context(info, fn, *args):
    """Run a dequantizer; its DecodeError gains the file and tensor name."""
    try:
        return fn(*args)
    except DecodeError as e:
        raise DecodeError(f"{info.file}: tensor {info.name!r}: {e}") from None
