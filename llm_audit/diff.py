"""`llm-audit diff A B`: what changed between two checkpoints (e.g. a base model and its fine-tune).

A and B are each a checkpoint (audited here) or a folder of an earlier audit holding layers.csv.
Matrices are matched by `name`; per matrix Δα, Δtraps and Δlog_norm, biggest changes first
(largest |Δtraps|, then largest |Δα|, then largest |Δlog_norm|); unmatched names are listed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import FormatError
from .safetext import clip

DIFF_COLUMNS = ("name", "layer", "module", "expert", "alpha_a", "alpha_b", "d_alpha",
                "traps_a", "traps_b", "d_traps", "log_norm_a", "log_norm_b", "d_log_norm",
                "warning_a", "warning_b")
_NEEDED = ("name", "alpha", "rand_num_spikes", "log_norm")


@dataclass(frozen=True)
class DiffResult:
    a: str
    b: str
    table: pd.DataFrame  # DIFF_COLUMNS, one row per matched matrix, biggest changes first
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def summary(self) -> dict:
        t = self.table
        d_alpha = t["d_alpha"].dropna()
        return {"a": self.a, "b": self.b, "matched": int(len(t)), "only_a": len(self.only_a),
                "only_b": len(self.only_b),
                "mean_d_alpha": float(d_alpha.mean()) if len(d_alpha) else math.nan,
                "max_abs_d_alpha": float(d_alpha.abs().max()) if len(d_alpha) else math.nan,
                "total_d_traps": int(t["d_traps"].fillna(0).sum()),
                "matrices_gaining_traps": int((t["d_traps"] > 0).sum())}

    def write(self, out: str | Path, formats: tuple[str, ...]) -> list[Path]:
        from .report.diff_report import write_diff_reports

        return write_diff_reports(Path(out), self, formats)


def diff(a: str | Path, b: str | Path, *, allow_pickle: bool = False, **options) -> DiffResult:
    """Diff two checkpoints or audit folders; `options` are used for sides that are audited."""
    label_a, table_a = load_side(a, allow_pickle=allow_pickle, **options)
    label_b, table_b = load_side(b, allow_pickle=allow_pickle, **options)
    return diff_tables(table_a, table_b, label_a, label_b)


def load_side(path: str | Path, *, allow_pickle: bool = False,
              **options) -> tuple[str, pd.DataFrame]:
    """(label, layers table) of an audit folder (reads layers.csv) or a checkpoint (audits it)."""
    p = Path(path)
    csv = p / "layers.csv"
    if p.is_dir() and csv.is_file():
        try:  # names stay text even when they look like numbers ("0", "1e3")
            table = pd.read_csv(csv, dtype={"name": str, "module": str, "warning": str},
                                keep_default_na=False, na_values=[""])
        except (ValueError, pd.errors.ParserError) as e:
            raise FormatError(f"{csv}: cannot read as CSV ({clip(e)})") from e
        missing = [c for c in _NEEDED if c not in table.columns]
        if missing:
            raise FormatError(f"{csv}: not an llm-audit layers.csv (no column {missing[0]!r})")
        table["name"] = table["name"].fillna("")
        _check_counts(csv, table)
        return _label(p), table
    from .pipeline import audit

    result = audit(p, allow_pickle=allow_pickle, max_spectra=0, **options)
    return result.model, result.details


def _check_counts(csv: Path, table: pd.DataFrame) -> None:
    """rand_num_spikes must be a whole number >= 0 (or empty) in every row."""
    col = pd.to_numeric(table["rand_num_spikes"], errors="coerce")
    whole = col.abs().lt(float("inf")) & col.ge(0) & col.mod(1).eq(0)
    bad = col.notna() & ~whole
    if bad.any():
        row = int(bad.idxmax())
        raise FormatError(f"{csv}: row {row + 2}: rand_num_spikes {col[row]:g} is not a count"
                          " (a whole number >= 0); the file is not an llm-audit "
                          "layers.csv or was edited")


def _label(folder: Path) -> str:
    summary = folder / "summary.json"
    try:
        return str(json.loads(summary.read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return folder.resolve().name


def diff_tables(a: pd.DataFrame, b: pd.DataFrame, label_a: str = "A",
                label_b: str = "B") -> DiffResult:
    """Match rows by name and compute the changes (B − A)."""
    keep = ["name", "layer", "module", "expert", "alpha", "rand_num_spikes", "log_norm", "warning"]
    a = a[[c for c in keep if c in a.columns]].drop_duplicates("name")
    b = b[[c for c in keep if c in b.columns]].drop_duplicates("name")
    m = a.merge(b, on="name", suffixes=("_a", "_b"))
    t = pd.DataFrame({"name": m["name"]})
    for col in ("layer", "module", "expert"):
        t[col] = m[f"{col}_a"] if f"{col}_a" in m else None
    for new, old in (("alpha", "alpha"), ("traps", "rand_num_spikes"), ("log_norm", "log_norm")):
        t[f"{new}_a"] = pd.to_numeric(m[f"{old}_a"], errors="coerce")
        t[f"{new}_b"] = pd.to_numeric(m[f"{old}_b"], errors="coerce")
        t[f"d_{new}"] = t[f"{new}_b"] - t[f"{new}_a"]
    for side in ("a", "b"):
        t[f"warning_{side}"] = m[f"warning_{side}"].fillna("") if f"warning_{side}" in m else ""
    order = pd.DataFrame({"t": t["d_traps"].abs().fillna(-1), "a": t["d_alpha"].abs().fillna(-1),
                          "n": t["d_log_norm"].abs().fillna(-1)})
    idx = order.sort_values(["t", "a", "n"], ascending=False, kind="stable").index
    t = t.loc[idx, list(DIFF_COLUMNS)].reset_index(drop=True)
    names_a, names_b = set(a["name"]), set(b["name"])
    return DiffResult(label_a, label_b, t,
                      tuple(n for n in a["name"] if n not in names_b),
                      tuple(n for n in b["name"] if n not in names_a))
