"""MNIST from the standard IDX files, and the authors' 1000-image training subset.

Where the files are looked for, in order: ``--data-dir``; ``$MNIST_DIR``; torchvision's cache
(``~/.cache/torchvision``-style ``<root>/MNIST/raw`` folders, also ``$TORCH_HOME``). Nothing is
downloaded: get the four IDX files once (e.g. torchvision's ``MNIST(root, download=True)``).
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


def locate(data_dir: str | Path | None = None) -> Path:
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
    raise DataNotFound("MNIST not found: pass --data-dir or set $MNIST_DIR to a folder with "
                       f"the four IDX files ({', '.join(FILES.values())}[.gz])")


def load_split(folder: Path, train: bool, dtype: torch.dtype = torch.float32) -> Split:
    """Pixels as ``ToTensor()`` gives them: uint8 → ``dtype`` (the default dtype there), / 255."""
    kind = "train" if train else "test"
    images = read_idx(_find(folder, FILES[f"{kind}_images"]))
    labels = read_idx(_find(folder, FILES[f"{kind}_labels"]))
    x = torch.from_numpy(images.reshape(len(images), -1).copy()).to(dtype).div_(255)
    return Split(x=x, y=torch.from_numpy(labels.astype(np.int64)))


def notebook_indices(labels: np.ndarray, per_class: int = 100, seed: int = 0) -> np.ndarray:
    """The authors' subset: ``np.random.seed(seed)``, then for digits 0..9 in order
    ``np.random.choice(indices_of_digit, per_class, replace=False)`` (legacy RandomState
    stream, drawn here from its own ``RandomState`` instead of numpy's global one)."""
    rs = np.random.RandomState(seed)
    return np.concatenate([rs.choice(np.where(labels == d)[0], per_class, replace=False)
                           for d in range(10)])


def notebook_subsets(data_dir: str | Path | None = None, dtype: torch.dtype = torch.float64,
                     per_class: int = 100, seed: int = 0) -> tuple[Split, Split]:
    """(the notebook's training subset in its order, the full 10k test set), in ``dtype``."""
    folder = locate(data_dir)
    full = load_split(folder, train=True, dtype=dtype)
    idx = torch.from_numpy(notebook_indices(full.y.numpy(), per_class, seed))
    return Split(x=full.x[idx], y=full.y[idx]), load_split(folder, train=False, dtype=dtype)
