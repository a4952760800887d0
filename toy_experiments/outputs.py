"""The files of a toy run folder: CSV appends, weight snapshots, the checkpoint.

    OUT/history.csv   one row per measured step
    OUT/layers.csv    one row per audited matrix per measured step
    OUT/traps.csv     one row per correlation trap (both rules) per measured step
    OUT/snapshots/step_XXXXXXXXX.safetensors (and e.g. best.safetensors)
    OUT/checkpoint.pt the state to resume from (written atomically)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

#: the CSVs a resume cuts back to the checkpoint's step
CSV_FILES = ("history.csv", "layers.csv", "traps.csv")


def append_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Append ``rows`` (only ``columns``, in that order) to a CSV, writing the header if new."""
    if not rows:
        return
    path = Path(path)
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=list(columns))
    new = not path.exists() or path.stat().st_size == 0
    df.to_csv(path, mode="w" if new else "a", header=new, index=False)


def truncate_csv(path: Path, last_step: int) -> None:
    """Drop the rows with step > ``last_step`` (used when resuming from a checkpoint)."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        df = pd.read_csv(path)
        df[df["step"] <= last_step].to_csv(path, index=False)


def snapshot_path(out_dir: Path, step: int | str) -> Path:
    name = f"step_{step:09d}" if isinstance(step, int) else step
    return Path(out_dir) / "snapshots" / f"{name}.safetensors"


def save_snapshot(model: torch.nn.Module, out_dir: Path, step: int | str,
                  dtype: torch.dtype | None = None) -> Path:
    """Save the weights at ``step`` as ``out_dir/snapshots/step_XXXXXXXXX.safetensors`` (or
    ``<step>.safetensors`` for a name such as "best"), cast to ``dtype`` if given."""
    path = snapshot_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)
    return path


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file (never half-written)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, device: torch.device | str) -> dict | None:
    """The checkpoint at ``path`` (tensors on ``device``), None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def cut_back(folders: Iterable[Path], step: int) -> None:
    """Resuming at ``step``: the CSVs of each run folder lose their rows measured after it
    (they are measured again)."""
    for folder in folders:
        for name in CSV_FILES:
            truncate_csv(Path(folder) / name, step)
