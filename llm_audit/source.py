"""Stage 1: find the checkpoint's files, parse and validate safetensors headers, route tensors.

Nothing here touches tensor data: headers and the index are validated first (sizes, offsets
inside the file, no overlaps, shard names that stay inside the folder), so later stages can
read bytes without further checks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import weakref
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError, SourceError
from .safetext import clip

log = logging.getLogger(__name__)

#: bytes per element of every safetensors dtype we know (sub-byte types are stored packed in U8)
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute byte range [begin, end) in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: every tensor routed to its shard, in file order."""

    name: str
    root: Path
    files: tuple[Path, ...]
    tensors: tuple[TensorInfo, ...]
    config: str = "{}"  # config.json text (kept as text so the record stays immutable)
    revision: str | None = None
    metadata: tuple[tuple[str, str], ...] = field(default=())
    format: str = "safetensors"  # or "gguf" (gguf_source.py)

    @property
    def config_dict(self) -> dict:
        return json.loads(self.config)  # validated to be a JSON object by open_checkpoint

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """Parse and validate one safetensors header: (tensors in file order, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes; "
                                  "need an 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise FormatError(f"{path}: not a safetensors file or truncated (header claims "
                                  f"{n} bytes, file has {size}); re-download the file")
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not a safetensors file (header is not valid JSON: "
                          f"{type(e).__name__})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: __metadata__ must be a JSON object")
    tensors = [_tensor_info(path, name, entry, 8 + n) for name, entry in header.items()]
    _check_layout(path, tensors, data_start=8 + n, file_size=size)
    tensors.sort(key=lambda t: (t.begin, t.end))
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(f"{path}: tensor {name!r}: missing or non-string dtype")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise FormatError(f"{path}: tensor {name!r}: shape must be a list of non-negative ints, "
                          f"got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise FormatError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] with "
                          f"0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise FormatError(f"{path}: tensor {name!r}: {dtype} {list(shape)} needs "
                          f"{math.prod(shape) * itemsize} bytes but data_offsets give "
                          f"{end - begin}; the header lies or the file is corrupt")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(path: Path, tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    last_end, last_name = data_start, None
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.end > file_size:
            raise FormatError(f"{path}: tensor {t.name!r}: data ends at byte {t.end} but the file "
                              f"has {file_size} bytes (truncated download?)")
        if t.begin < last_end and t.nbytes > 0:
            raise FormatError(f"{path}: tensor {t.name!r} overlaps tensor {last_name!r}; "
                              "the header is corrupt")
        if t.nbytes > 0:
            last_end, last_name = t.end, t.name


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False,
                    revision: str | None = None, name: str | None = None,
                    shards: Collection[str] | None = None) -> Checkpoint:
    """Open a local ``.safetensors`` file or a folder (sharded with an index, or not), or
    a ``.gguf`` file, split set or folder of one (`gguf_source.open_gguf`).

    `shards` (names from the index) restricts a sharded folder to those shards: the others
    need not be present (a partial hub download).
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder (give a .safetensors file, a model "
                          "folder, or a hub id org/name)")
    from .gguf_source import is_gguf_source, open_gguf  # it imports this module

    if is_gguf_source(path):
        return open_gguf(path, name=name)
    root = path if path.is_dir() else path.parent
    config = _read_config(root / "config.json")
    if path.is_dir() and allow_pickle and _pickle_only_folder(path):
        files, weight_map = _pickle_files(path), None
    elif path.is_dir():
        files, weight_map = _folder_files(path, shards, allow_pickle)
    else:
        _refuse_pickle(path, allow_pickle)
        files, weight_map = [path], None
    files, converted, origin = _convert_pickles(files)
    tensors, metadata, owner = [], {}, {}
    for f in files:
        ts, meta = read_header(f)
        metadata.update(meta)
        if weight_map is not None:  # route every tensor through the index, on its own
            shard = _shard_name(path, f, origin)
            ts = [t for t in ts if _norm(weight_map.get(t.name)) == shard]
        for t in ts:
            if t.name in owner:
                raise FormatError(f"{path}: tensor {clip(t.name)!r} is in both {owner[t.name]} "
                                  f"and {t.file}; which one is meant? Add a {INDEX_NAME} that "
                                  "maps each tensor to one shard, or remove the duplicate")
            owner[t.name] = t.file
        tensors.extend(ts)
    if weight_map is not None:
        names = {_shard_name(path, f, origin) for f in files}
        _check_index_complete(path, {k: v for k, v in weight_map.items() if _norm(v) in names},
                              {t.name for t in tensors})
    model_name = name or (path.name if path.is_dir() else _model_name_for_file(path))
    ckpt = Checkpoint(model_name, root, tuple(files), tuple(tensors), config, revision,
                      tuple(sorted(metadata.items())))
    if converted is not None:  # the temporary safetensors live as long as the checkpoint
        weakref.finalize(ckpt, shutil.rmtree, converted, True)
    return ckpt


def _model_name_for_file(path: Path) -> str:
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def _norm(shard: str | None) -> str | None:
    """A shard name from an index as a relative POSIX path ('./a/b' -> 'a/b')."""
    return None if shard is None else Path(shard).as_posix().removeprefix("./")


def _shard_name(folder: Path, f: Path, origin: dict[Path, Path]) -> str:
    """How the index names file `f` (a converted pickle: as the pickle it came from)."""
    src = origin.get(f, f)
    try:
        return src.relative_to(folder).as_posix()
    except ValueError:
        return src.name


def _read_config(path: Path) -> str:
    """config.json's text (``{}`` without one), refused unless it is a JSON object."""
    if not path.is_file():
        return "{}"
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({type(e).__name__}); fix or remove it") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must be a JSON object, got {type(data).__name__}; fix or "
                          "remove it")
    return text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read ({e})") from e


def _folder_files(folder: Path, shards: Collection[str] | None = None,
                  allow_pickle: bool = False) -> tuple[list[Path], dict[str, str] | None]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = load_weight_map(index)
        wanted = sorted(s for s in set(weight_map.values()) if shards is None or s in shards)
        files = [safe_child(folder, s, index) for s in wanted]
        for s in wanted:
            _check_shard_kind(index, s, allow_pickle)
        return files, weight_map
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = (f" (found pickle checkpoint {pickles[0].name}: convert it to safetensors, or pass "
            "--allow-pickle)") if pickles else ""
    raise SourceError(f"{folder}: no *.safetensors files and no {INDEX_NAME}{hint}")


def _check_shard_kind(index: Path, shard: str, allow_pickle: bool) -> None:
    """An index routes to safetensors shards only; to a pickle only with --allow-pickle."""
    suffix = Path(shard).suffix
    if suffix == ".safetensors":
        return
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SourceError(f"{index}: maps tensors to the pickle file {clip(shard)!r}; pickles "
                          "are not opened by default (unpickling runs code): convert it to "
                          "safetensors or pass --allow-pickle")
    if suffix not in PICKLE_SUFFIXES:
        raise FormatError(f"{index}: shard {clip(shard)!r} is not a .safetensors file")


def load_weight_map(index: Path) -> dict[str, str]:
    """Read ``weight_map`` from a ``model.safetensors.index.json``, validated."""
    try:
        data = json.loads(_read_text(index))
    except json.JSONDecodeError as e:
        raise FormatError(f"{index}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError as e:
        raise FormatError(f"{index}: not an index (JSON nested too deeply)") from e
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in wm.items()):
        raise FormatError(f"{index}: missing or malformed 'weight_map' (tensor name -> shard file)")
    return wm


def safe_child(folder: Path, shard: str, index: Path) -> Path:
    """Resolve a shard name from an index, refusing names that leave the model folder.

    The check is on the name (a hub cache snapshot holds symlinks into ``../../blobs``).
    """
    p = Path(shard)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise FormatError(f"{index}: shard name {shard!r} leaves the model folder; refusing it")
    if not (folder / p).is_file():
        raise SourceError(f"{index}: shard {shard!r} is listed but missing from {folder}")
    return folder / p


def _check_index_complete(path: Path, weight_map: dict[str, str], found: set[str]) -> None:
    missing = sorted(set(weight_map) - found)
    if missing:
        raise FormatError(f"{path / INDEX_NAME}: tensor {missing[0]!r} is mapped to shard "
                          f"{weight_map[missing[0]]!r} but that shard does not contain it "
                          f"({len(missing)} missing)")


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SourceError(f"{path}: pickle checkpoints are not opened by default (unpickling runs "
                          "code); convert to safetensors or pass --allow-pickle")


def _pickle_only_folder(folder: Path) -> bool:
    return not any(folder.glob("*.safetensors")) and not (folder / INDEX_NAME).is_file() \
        and bool(_pickle_files(folder))


def _pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def _convert_pickles(files: list[Path]) -> tuple[list[Path], Path | None, dict[Path, Path]]:
    """Pickle files (allowed by then) -> temporary safetensors, loaded with weights_only=True:
    (the files, the temporary folder or None, {converted file: the pickle it came from})."""
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if not pickles:
        return files, None, {}
    from .pickle_source import convert_pickles

    tmp, converted = convert_pickles(pickles)
    by_src = dict(zip(pickles, converted, strict=True))
    return [by_src.get(f, f) for f in files], tmp, dict(zip(converted, pickles, strict=True))


def read_bytes(info: TensorInfo, handle, out=None):
    """Read one tensor's bytes from an open binary file handle (each tensor is read once),
    into `out` (a writable buffer of info.nbytes bytes) or a new bytearray; returns the buffer."""
    buf = bytearray(info.nbytes) if out is None else out
    handle.seek(info.begin)
    got = handle.readinto(buf)
    if got != info.nbytes:
        raise FormatError(f"{info.file}: tensor {info.name!r}: read {got} of {info.nbytes} bytes "
                          "(file truncated while reading?)")
    return buf
