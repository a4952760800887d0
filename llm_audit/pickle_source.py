"""Pickle checkpoints (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`), only with --allow-pickle.

Unpickling can run arbitrary code, so these files are opened only when the user asks, and then
only with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors and plain
containers, no arbitrary globals). The state dict's tensors are streamed into a temporary
safetensors file, so every later stage (routing, decode, the audit) is the one for safetensors.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import FormatError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint, by dotted name, loaded with weights_only=True."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
            AttributeError, ImportError, TypeError, RecursionError) as e:
        msg = " ".join(str(e).split())[:300]
        raise FormatError(f"{path}: cannot load with torch.load(weights_only=True): "
                          f"{type(e).__name__}: {msg}") from e
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:  # {"state_dict": {...}, "epoch": 3} and the like
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = dict(_flatten(obj, path))
    if not tensors:
        raise FormatError(f"{path}: no tensors found in the pickle checkpoint")
    return tensors


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


MAX_NESTING = 64  # containers inside containers of a state dict; deeper is refused


def _flatten(obj, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts/lists, depth first, in order;
    iterative (a hostile pickle nested 3,000 deep must not exhaust Python's stack)."""
    stack = [("", obj, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        if isinstance(node, torch.Tensor):
            if prefix:
                yield prefix, node
            continue
        if isinstance(node, Mapping):
            items = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(node)]
        else:
            continue
        if depth >= MAX_NESTING:
            raise FormatError(f"{path}: containers nested deeper than {MAX_NESTING} levels; "
                              "not a state dict")
        stack.extend((f"{prefix}.{k}" if prefix else k, v, depth + 1)
                     for k, v in reversed(items))


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Stream tensors into a safetensors file one at a time (shared storage is fine)."""
    header, offset, keep = {}, 0, []
    for name, t in tensors.items():
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None or t.is_sparse or t.is_quantized:
            log.info("%s: dtype %s not carried over from the pickle", name, t.dtype)
            continue
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset,
                                                                                 offset + n]}
        offset += n
        keep.append(t)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in keep:
            flat = t.detach().contiguous().reshape(-1)
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().tobytes())
    return path


def convert_pickles(paths: list[Path]) -> tuple[Path, list[Path]]:
    """Convert pickle checkpoints into safetensors files in a new temporary folder.

    Returns (the folder, which the caller removes when done; the converted files in order).
    """
    tmp = Path(tempfile.mkdtemp(prefix="llm-audit-pickle-"))
    try:
        out = [write_safetensors(load_state_dict(p), tmp / f"{i:05d}-{p.stem}.safetensors")
               for i, p in enumerate(paths)]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, out
