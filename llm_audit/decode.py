"""Stage 2: bytes -> float matrices on the requested device.

Each job's tensors are read once into a fresh buffer (so peak memory is one job's worth, not the
file's), moved to the device, and viewed as their stored dtype there; all arithmetic happens on
the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from . import gguf_plan, quant
from .errors import DecodeError
from .routing import MatrixJob
from .source import TensorInfo, read_bytes

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8,
    "I8": torch.int8, "I32": torch.int32, "I64": torch.int64,
}


@dataclass(frozen=True)
class DecodedMatrix:
    """A float matrix ready for analysis. `W`: (rows, cols) float32 on the target device.

    `name`/`module` are the row's (a fused gpt-oss gate_up gives `...gate_up_proj[3].gate`,
    module gate_proj); `nan_scales` counts the MXFP4 NaN (255) scales behind this matrix.
    """

    job: MatrixJob
    W: torch.Tensor
    expert: int | None = None
    name: str = ""
    module: str = ""
    nan_scales: int = 0


class TensorReader:
    """Reads tensors' bytes, keeping one open handle per shard file (context manager).

    With `pin`, bytes land in pinned host memory and go to a CUDA device asynchronously.
    `read_seconds` accumulates the time spent reading files.
    """

    def __init__(self, pin: bool = False) -> None:
        self._stack = ExitStack()
        self._handles: dict = {}
        self._pin = pin
        self.read_seconds = 0.0

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def raw(self, info: TensorInfo, device: torch.device) -> torch.Tensor:
        """The tensor with its stored dtype and shape, on `device`."""
        if info.file not in self._handles:
            self._handles[info.file] = self._stack.enter_context(open(info.file, "rb"))
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise DecodeError(f"{info.file}: tensor {info.name!r}: dtype {info.dtype} "
                              f"{list(info.shape)} cannot be decoded")
        t0 = time.perf_counter()
        if self._pin and info.nbytes:
            t = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
            read_bytes(info, self._handles[info.file], out=t.numpy())
        else:
            buf = read_bytes(info, self._handles[info.file])
            t = torch.frombuffer(buf, dtype=torch.uint8) if buf else \
                torch.empty(0, dtype=torch.uint8)
        self.read_seconds += time.perf_counter() - t0
        return t.to(device, non_blocking=self._pin).view(dtype).reshape(info.shape)


def decode_dense(job: MatrixJob, reader: TensorReader, device: torch.device) -> torch.Tensor:
    """float32, or float64 for F64 tensors (float32 would over/underflow their range)."""
    (info,) = job.parts
    t = reader.raw(info, device)
    return t if t.dtype == torch.float64 else t.to(torch.float32)


#: scheme -> decoder; a decoder returns W, or (W, per-row count of NaN scales)
DECODERS: dict[str, Callable[[MatrixJob, TensorReader, torch.device],
                             torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {
    "dense": decode_dense,
    "mxfp4": quant.decode_mxfp4,
    "fp8_block128": quant.decode_fp8_block,
    "fp8_scaled": quant.decode_scaled,
    "int8_scaled": quant.decode_scaled,
    "gguf": gguf_plan.decode_gguf,
}


def decode(job: MatrixJob, reader: TensorReader, device: torch.device) -> Iterator[DecodedMatrix]:
    """Decode one job into one matrix, or one matrix per expert for a (E, rows, cols) stack."""
    fn = DECODERS.get(job.scheme)
    if fn is None:
        raise DecodeError(f"tensor {job.name!r}: no decoder for scheme {job.scheme!r}")
    out = fn(job, reader, device)
    W, nan_rows = out if isinstance(out, tuple) else (out, None)
    if job.transposed:  # stored (in, out): the canonical orientation is (out, in)
        W = W.mT.contiguous()
    if W.ndim != 2:
        for e in range(W.shape[0]):
            yield DecodedMatrix(job, W[e], e, f"{job.name}[{e}]", job.module)
        return
    if not job.fused:
        nan = int(nan_rows.sum()) if nan_rows is not None else 0
        yield DecodedMatrix(job, W, job.expert, job.name, job.module, nan)
        return
    k = len(job.fused)
    parts = quant.deinterleave(W, k, job.fused_dim)
    for i, (part, module) in enumerate(zip(parts, job.fused, strict=True)):
        rows = nan_rows[i::k] if nan_rows is not None and job.fused_dim == 0 else None
        yield DecodedMatrix(job, part, job.expert, f"{job.name}.{module.removesuffix('_proj')}",
                            module, int(rows.sum()) if rows is not None else 0)
