"""`llm-audit diff A B`: what changed between two checkpoints (e.g. a base model and its fine-tune).

A and B are each a checkpoint (audited here) or a folder of an earlier audit holding layers.csv.
Matrices are matched by `name`; those left, by (layer, hf_module, expert) where that is unique
on both sides and one side's module is translated: a GGUF copy of a model
(``blk.3.attn_q.weight``, hf_module q_proj) meets its safetensors original
(``model.layers.3.self_attn.q_proj.weight``). Per matrix Δα, Δtraps and Δlog_norm, biggest
changes first (largest |Δtraps|, then |Δα|, then |Δlog_norm|); `name_b` is B's name of the
matrix; unmatched names are listed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import FormatError
from .safetext import clip

DIFF_COLUMNS = ("name", "name_b", "layer", "module", "hf_module", "expert", "alpha_a",
                "alpha_b", "d_alpha", "traps_a", "traps_b", "d_traps", "log_norm_a",
                "log_norm_b", "d_log_norm", "warning_a", "warning_b")
_KEEP = ("name", "layer", "module", "hf_module", "expert", "alpha", "rand_num_spikes",
         "log_norm", "warning")
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
            table = pd.read_csv(csv, dtype={"name": str, "module": str, "hf_module": str,
                                            "warning": str},
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
    """Match rows by name, the rest by (layer, hf_module, expert), and compute B − A."""
    a, b = _normalise(a), _normalise(b)
    m = match_rows(a, b)
    t = pd.DataFrame({"name": m["name_a"], "name_b": m["name_b"]})
    for col in ("layer", "module", "hf_module", "expert"):
        t[col] = m[f"{col}_a"]
    for new, old in (("alpha", "alpha"), ("traps", "rand_num_spikes"), ("log_norm", "log_norm")):
        t[f"{new}_a"] = pd.to_numeric(m[f"{old}_a"], errors="coerce")
        t[f"{new}_b"] = pd.to_numeric(m[f"{old}_b"], errors="coerce")
        t[f"d_{new}"] = t[f"{new}_b"] - t[f"{new}_a"]
    for side in ("a", "b"):
        t[f"warning_{side}"] = m[f"warning_{side}"].fillna("")
    order = pd.DataFrame({"t": t["d_traps"].abs().fillna(-1), "a": t["d_alpha"].abs().fillna(-1),
                          "n": t["d_log_norm"].abs().fillna(-1)})
    idx = order.sort_values(["t", "a", "n"], ascending=False, kind="stable").index
    t = t.loc[idx, list(DIFF_COLUMNS)].reset_index(drop=True)
    names_a, names_b = set(t["name"]), set(t["name_b"])
    return DiffResult(label_a, label_b, t,
                      tuple(n for n in a["name"] if n not in names_a),
                      tuple(n for n in b["name"] if n not in names_b))


def _normalise(t: pd.DataFrame) -> pd.DataFrame:
    """The columns a diff reads, every one present; hf_module defaults to module (a layers.csv
    written before the column existed)."""
    t = t.copy()
    for col in _KEEP:
        if col not in t.columns:
            t[col] = None
    hf = t["hf_module"].astype("string")
    t["hf_module"] = hf.where(hf.notna() & (hf != ""), t["module"].astype("string"))
    return t[list(_KEEP)].drop_duplicates("name")


def match_rows(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows of A and B side by side (columns `<col>_a`, `<col>_b`): equal names first; then
    rows left over whose (layer, hf_module, expert) is unique on both sides, where one of the
    two has a translated module (hf_module != module), so that a GGUF's ``blk.3.attn_q.weight``
    meets the safetensors ``model.layers.3.self_attn.q_proj.weight`` (two safetensors audits
    match by name only, as before)."""
    by_name = a.merge(b, on="name", suffixes=("_a", "_b"))
    by_name["name_a"] = by_name["name_b"] = by_name.pop("name")
    rest_a = a[~a["name"].isin(set(b["name"]))].assign(_key=match_key)
    rest_b = b[~b["name"].isin(set(a["name"]))].assign(_key=match_key)
    by_key = rest_a.dropna(subset=["_key"]).merge(rest_b.dropna(subset=["_key"]), on="_key",
                                                  suffixes=("_a", "_b")).drop(columns="_key")
    renamed = (by_key["module_a"] != by_key["hf_module_a"]) | \
        (by_key["module_b"] != by_key["hf_module_b"])
    return pd.concat([by_name, by_key[renamed]], ignore_index=True)


def match_key(t: pd.DataFrame) -> pd.Series:
    """'layer|hf_module|expert' per row; None where hf_module is empty or the key is not
    unique in `t` (BERT's several `dense` of one layer match by name only)."""
    parts = [pd.to_numeric(t["layer"], errors="coerce").astype("Int64").astype("string"),
             t["hf_module"].astype("string"),
             pd.to_numeric(t["expert"], errors="coerce").astype("Int64").astype("string")]
    key = parts[0].fillna("") + "|" + parts[1].fillna("") + "|" + parts[2].fillna("")
    key = key.where(parts[1].notna() & (parts[1] != ""))
    return key.where(key.isna() | ~key.duplicated(keep=False))
