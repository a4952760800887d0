"""Writers for layers.csv, summary.json and report.md. Every file is written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from .markdown import render_markdown

FORMATS = ("md", "csv", "json")


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash never leaves a half-written file in its place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(out: Path, details: pd.DataFrame, summary: dict, skipped: pd.DataFrame,
                  formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write the chosen report formats into `out`; returns the paths written."""
    out = Path(out)
    written = []
    if "csv" in formats:
        written.append(out / "layers.csv")
        atomic_write(written[-1], details.to_csv(index=False))
    if "json" in formats:
        written.append(out / "summary.json")
        atomic_write(written[-1], json.dumps(summary, indent=2, default=_jsonable) + "\n")
    if "md" in formats:
        written.append(out / "report.md")
        atomic_write(written[-1], render_markdown(details, summary, skipped))
    return written


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)
