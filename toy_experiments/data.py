"""MNIST from the standard IDX files, and the paper's stratified 1000-sample training subset.

Where the files are looked for, in order: ``--data-dir``; ``$MNIST_DIR``; torchvision's cache
(``~/.cache/torchvision``-style ``<root>/MNIST/raw`` folders, also ``$TORCH_HOME``); and last a
download with torchvision when it is installed and the machine is online.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataNotFound(FileNotFoundError):
    """No MNIST IDX files where they were looked for."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (n, 784) pixels in [0, 1]
    y: torch.Tensor  # (n,) int64 labels


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values, header says shape {shape}")
    return data.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_all(folder: Path) -> bool:
    return all(_find(folder, s) is not None for s in FILES.values())


def _torchvision_roots() -> list[Path]:
    roots = [Path.home() / ".cache" / "torchvision", Path.home() / ".cache" / "torch",
             Path.home() / "data", Path("data")]
    if os.environ.get("TORCH_HOME"):
        roots.insert(0, Path(os.environ["TORCH_HOME"]))
    return [r / sub for r in roots for sub in ("MNIST/raw", "datasets/MNIST/raw", "mnist")]


def locate(data_dir: str | Path | None = None, *, allow_download: bool = True) -> Path:
    """The folder holding the four IDX files (see the module docstring for the order)."""
    if data_dir is not None:
        if not _has_all(Path(data_dir)):
            raise DataNotFound(f"--data-dir {data_dir}: the four MNIST IDX files "
                               f"({', '.join(FILES.values())}[.gz]) are not all there")
        return Path(data_dir)
    env = os.environ.get("MNIST_DIR")
    candidates = ([Path(env)] if env else []) + _torchvision_roots()
    for c in candidates:
        if _has_all(c):
            return c
    if allow_download:
        return _download()
    raise DataNotFound("MNIST not found: pass --data-dir or set $MNIST_DIR")


def _download() -> Path:
    try:
        from torchvision.datasets import MNIST  # optional dependency
    except ImportError as e:
        raise DataNotFound("MNIST not found (--data-dir, $MNIST_DIR, torchvision cache) and "
                           "torchvision is not installed to download it") from e
    root = Path.home() / ".cache" / "torchvision"
    MNIST(str(root), train=True, download=True)
    MNIST(str(root), train=False, download=True)
    return root / "MNIST" / "raw"


def load_split(folder: Path, train: bool) -> Split:
    kind = "train" if train else "test"
    images = read_idx(_find(folder, FILES[f"{kind}_images"]))
    labels = read_idx(_find(folder, FILES[f"{kind}_labels"]))
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return Split(x=x, y=torch.from_numpy(labels.astype(np.int64)))


def stratified_subset(split: Split, per_class: int, seed: int = 0) -> Split:
    """``per_class`` samples of each class, drawn without replacement with a seeded generator
    (the paper: 100 per class, seed 0), kept in class order then shuffled with the same seed."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(int(split.y.max()) + 1):
        members = torch.nonzero(split.y == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} samples < {per_class}")
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    order = torch.cat(idx)
    order = order[torch.randperm(len(order), generator=g)]
    return Split(x=split.x[order], y=split.y[order])


def mnist_subsets(data_dir: str | Path | None = None, per_class: int = 100, seed: int = 0,
                  n_test: int | None = None) -> tuple[Split, Split]:
    """(train subset of 10·per_class images, test set or its first ``n_test`` images)."""
    folder = locate(data_dir)
    train = stratified_subset(load_split(folder, train=True), per_class, seed)
    test = load_split(folder, train=False)
    if n_test is not None:
        test = Split(x=test.x[:n_test], y=test.y[:n_test])
    return train, test
