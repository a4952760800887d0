"""Stage 1 (GGUF): find and validate llama.cpp GGUF files: one file, a split set, a folder.

Headers are parsed by the `gguf` package's own ``GGUFReader`` (imported only when a .gguf is
opened), hardened so that a hostile file can neither make it loop, recurse or read past the
end nor lie about its tensors: every count is bounded by the bytes left in the file, every read
must be complete, and each tensor info is checked (a GGML type the package knows, at most 4
dimensions, rows a whole number of the type's blocks, data inside the file, no overlaps)
before the reader builds its tensors. No tensor data is read here.

Shapes: GGUF lists dimensions fastest first (ne[0] = the columns). ``TensorInfo.shape`` is the
reversed, row-major shape, so a 2-D weight is the canonical (out, in) of ``nn.Linear`` (an
``attn_q`` has the shape of HF's ``q_proj.weight``) and a 3-D ``*_exps`` stack is
(experts, out, in), each expert's bytes contiguous.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from .errors import AuditError, FormatError, SourceError
from .safetext import clip
from .source import Checkpoint, TensorInfo

log = logging.getLogger(__name__)

HEADER_BYTES = 24  # magic, version, tensor count, metadata count
MAX_TENSORS = 1 << 20  # a GGUF of DeepSeek-V3 has ~1,100 tensors (experts stacked)
MAX_KV = 1 << 20  # metadata keys
MAX_ITEMS = 1 << 22  # metadata array items in all (a tokenizer has a few 100,000)
MAX_DIMS = 4  # GGML_MAX_DIMS
_TENSOR_INFO_MIN = 24  # name length 8, n_dims 4, type 4, offset 8 (empty name, no dims)
_KV_MIN = 13  # key length 8, value type 4, a 1-byte value
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def import_gguf():
    """The `gguf` package (llama.cpp's reader), imported when a GGUF is opened."""
    try:
        import gguf
    except ImportError as e:
        raise SourceError("reading .gguf files needs the gguf package (llama.cpp's reader): "
                          "pip install gguf") from e
    return gguf


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def is_gguf_source(path: Path) -> bool:
    """A .gguf file, or a folder with .gguf files and no safetensors."""
    if not path.is_dir():
        return path.suffix.lower() == ".gguf"
    return not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json"
                                                         ).is_file() and any(path.glob("*.gguf"))


def open_gguf(path: Path, name: str | None = None) -> Checkpoint:
    """Open a .gguf file, every part of a split ``*-00001-of-0000N.gguf`` set, or a folder
    holding one GGUF model; all headers validated."""
    model, files = gguf_files(Path(path))
    tensors: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    owner: dict[str, Path] = {}
    for f in files:
        ts, meta = read_gguf(f)
        _check_split(f, meta, len(files))
        metadata.update({k: v for k, v in meta.items() if not k.startswith("split.")})
        for t in ts:
            if t.name in owner:
                raise FormatError(f"{f}: tensor {clip(t.name)!r} is also in {owner[t.name]}; "
                                  "the split set is corrupt or mixes two models")
            owner[t.name] = f
        tensors.extend(ts)
    root = path if path.is_dir() else path.parent
    log.info("%s: %d GGUF file(s), %d tensors", path, len(files), len(tensors))
    return Checkpoint(name or model, root, tuple(files), tuple(tensors), "{}", None,
                      tuple(sorted(metadata.items())), format="gguf")


def gguf_files(path: Path) -> tuple[str, list[Path]]:
    """(model name, files in order) of a .gguf file, a split set (any part named) or a folder."""
    if not path.is_dir():
        m = SPLIT_RE.match(path.name)
        return (m["stem"], _split_set(path, m)) if m else (path.stem, [path])
    models: dict[str, Path] = {}
    for f in sorted(path.glob("*.gguf")):
        m = SPLIT_RE.match(f.name)
        models.setdefault(f"{m['stem']}-of-{m['count']}" if m else f.stem, f)
    if len(models) != 1:
        names = ", ".join(clip(f.name, 80) for f in list(models.values())[:4])
        raise SourceError(f"{path}: holds {len(models)} GGUF models ({names}); give the file "
                          "to audit (a split set by any of its parts)")
    return gguf_files(next(iter(models.values())))


def _split_set(path: Path, m: re.Match) -> list[Path]:
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count:
        raise SourceError(f"{path}: part {no} of {count} is not a valid split-GGUF name "
                          "(parts are numbered 00001 to the count)")
    files = [path.parent / f"{m['stem']}-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]
    for k, f in enumerate(files, 1):
        if not f.is_file():
            raise SourceError(f"{path}: part {k} of {count} of the split GGUF set is missing "
                              f"({f.name}); download every part into {path.parent}")
    return files


def _check_split(f: Path, meta: dict[str, str], count: int) -> None:
    said = meta.get("split.count")
    if said is not None and said != str(count):
        raise FormatError(f"{f}: metadata split.count is {clip(said)} but the file name says "
                          f"{count} parts; the split set is corrupt or renamed")


def read_gguf(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and validate one GGUF header: (tensors in file order, scalar metadata as text)."""
    gguf = import_gguf()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from e
    if size < HEADER_BYTES:
        raise FormatError(f"{path}: not a GGUF file or truncated (only {size} bytes; the header "
                          f"alone needs {HEADER_BYTES}); re-download it")
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = _reader_class(gguf)(path, size)
    except AuditError:
        raise
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from e
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError,
            RecursionError) as e:
        raise FormatError(f"{path}: not a valid GGUF file (gguf {gguf_version()}'s reader: "
                          f"{type(e).__name__}: {clip(e)}); re-download or re-convert it") from e
    if reader.byte_order != "I":
        raise FormatError(f"{path}: a big-endian GGUF file; convert it to little-endian "
                          "(gguf-py's gguf_convert_endian.py)")
    tensors = [TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                          path, int(t.data_offset), int(t.data_offset) + int(t.n_bytes))
               for t in reader.tensors]
    meta = _metadata(reader, gguf.GGUFValueType)
    tensors.sort(key=lambda t: (t.begin, t.end))
    return tensors, meta


def _metadata(reader, value_type) -> dict[str, str]:
    """The scalar and string metadata (arrays, e.g. the tokenizer's, left out), as text."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types or field.types[0] == value_type.ARRAY:
            continue
        try:
            out[clip(key)] = clip(field.contents())
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return out


def _check_count(path: Path, what: str, count: int, offset: int, size: int, least: int,
                 limit: int) -> None:
    fits = max(size - offset, 0) // max(least, 1)
    if int(count) > min(fits, limit):
        raise FormatError(f"{path}: header claims {int(count):,} {what} at byte {offset}, but at "
                          f"most {min(fits, limit):,} can be there (file of {size:,} bytes, "
                          f"limit {limit:,}); not a GGUF file or corrupt: re-download it")


def _reader_class(gguf):
    """gguf.GGUFReader with its loops bounded and the tensor infos validated (the hooks are
    the reader's own parsing steps: counts, array items, tensor infos, each read)."""
    import numpy as np

    vt = gguf.GGUFValueType
    least = {int(t): np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
    least.update({int(vt.STRING): 8, int(vt.ARRAY): 12})

    class Reader(gguf.GGUFReader):
        def __init__(self, path: Path, size: int) -> None:
            self._path, self._size, self._items = path, size, 0
            super().__init__(path, "r")

        def _get(self, offset, dtype, count=1, override_order=None):
            if int(offset) + np.dtype(dtype).itemsize * int(count) > self._size:
                raise FormatError(f"{self._path}: header truncated: it continues at byte "
                                  f"{int(offset):,} but the file has {self._size:,} bytes; "
                                  "re-download it")
            return super()._get(offset, dtype, count, override_order)

        def _build_fields(self, offs, count):
            _check_count(self._path, "metadata keys", count, offs, self._size, _KV_MIN, MAX_KV)
            return super()._build_fields(offs, count)

        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) == int(vt.ARRAY):
                item = int(self._get(orig_offs, np.uint32)[0])
                n = int(self._get(orig_offs + 4, np.uint64)[0])
                self._items += n
                _check_count(self._path, "metadata array items", n, orig_offs + 12, self._size,
                             least.get(item, 1), MAX_ITEMS - self._items + n)
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensor_info(self, offs, count):
            _check_count(self._path, "tensors", count, offs, self._size, _TENSOR_INFO_MIN,
                         MAX_TENSORS)
            return super()._build_tensor_info(offs, count)

        def _build_tensors(self, start_offs, fields):
            check_tensor_infos(self._path, self._size, int(start_offs), fields, gguf)
            return super()._build_tensors(start_offs, fields)

    return Reader


def check_tensor_infos(path: Path, size: int, data_start: int, fields, gguf) -> None:
    """Every tensor of a known type and shape, its data inside the file, none overlapping."""
    spans = []
    for field in fields:
        _, _, n_dims, dims, raw_type, offset = field.parts
        name, shape = clip(field.name), [int(d) for d in reversed(dims.tolist())]
        where = f"{path}: tensor {name!r}"
        if not 1 <= int(n_dims[0]) <= MAX_DIMS:
            raise FormatError(f"{where}: {int(n_dims[0])} dimensions (GGML allows 1 to "
                              f"{MAX_DIMS}); the header is corrupt")
        try:
            qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as e:
            raise FormatError(f"{where} {shape}: GGML type id {int(raw_type[0])} is unknown to "
                              f"gguf {gguf_version()}; upgrade it (pip install -U gguf) or the "
                              "header is corrupt") from e
        if shape[-1] % block:
            raise FormatError(f"{where}: {qtype.name} {shape}: rows of {shape[-1]} values are "
                              f"not whole {block}-value blocks; the header is corrupt")
        begin = data_start + int(offset[0])
        end = begin + math.prod(shape) // block * type_size
        if end > size:
            raise FormatError(f"{where}: {qtype.name} {shape} data ends at byte {end:,} but the "
                              f"file has {size:,} bytes (truncated download?); re-download it")
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise FormatError(f"{path}: tensor {second!r} overlaps tensor {first!r} (bytes from "
                              f"{begin:,}); the header is corrupt")
