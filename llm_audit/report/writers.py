"""Writers for layers.csv, summary.json, report.md (+ figures/*.png) and report.html.

Every file is written atomically: a crash never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import UsageError
from ..jsonio import dumps

if TYPE_CHECKING:
    from ..summary import AuditSummary

FORMATS = ("md", "html", "csv", "json")
FIGURES_DIR = "figures"


def parse_formats(text: str) -> tuple[str, ...]:
    """'md,html' -> ('md', 'html'); raises UsageError on an unknown format or an empty list."""
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise UsageError(f"--format: unknown format {bad[0] if bad else text!r}; choose from "
                         f"{','.join(FORMATS)}")
    return chosen


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` so that a crash never leaves a half-written file in its place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; reports are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(out: Path, details: pd.DataFrame, summary: AuditSummary,
                  skipped: pd.DataFrame, formats: tuple[str, ...] = FORMATS, spectra: tuple = (),
                  traps: pd.DataFrame | None = None) -> list[Path]:
    """Write the chosen report formats into `out`; returns the paths written. With "csv",
    `traps` (one row per trap) goes to traps.csv."""
    out = Path(out)
    written = []
    if "csv" in formats:
        written.append(out / "layers.csv")
        atomic_write(written[-1], csv_text(details))
        if traps is not None:
            written.append(out / "traps.csv")
            atomic_write(written[-1], csv_text(traps))
    if "json" in formats:
        written.append(out / "summary.json")
        atomic_write(written[-1], dumps(summary.to_json()) + "\n")
    figures = []
    if "md" in formats or "html" in formats:
        from .figures import make_figures

        figures = make_figures(details, spectra)
    if "md" in formats:
        from .markdown import render_markdown

        links = []
        for f in figures:
            path = out / FIGURES_DIR / f"{f.key}.png"
            atomic_write(path, f.png)
            links.append((f.title if not f.caption else f"{f.title}: {f.caption}",
                          f"{FIGURES_DIR}/{f.key}.png"))
        written.append(out / "report.md")
        atomic_write(written[-1], render_markdown(details, summary, skipped, links))
    if "html" in formats:
        from .html import render_html

        written.append(out / "report.html")
        atomic_write(written[-1], render_html(details, summary, skipped, figures))
    return written


def csv_text(df: pd.DataFrame) -> str:
    """CSV with every text field quoted: a CR, LF or comma inside a name read from a header
    stays inside its field (pandas' minimal quoting leaves a CR bare: 5 rows read back for 3)."""
    return df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
