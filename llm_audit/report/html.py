"""report.html: one self-contained page (inline CSS, JS and base64 PNG figures; nothing remote).

Every string from the checkpoint (tensor names, reasons, metadata) goes through jinja2's
autoescaping; the figures' file names never come from header names.
"""

from __future__ import annotations

import base64
import math
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # jinja2 and matplotlib load only when an HTML report is written
    import jinja2

    from .figures import Figure

TABLE_COLUMNS = ("name", "layer", "module", "expert", "N", "M", "dtype", "alpha", "D",
                 "num_pl_spikes", "log_norm", "rand_num_spikes", "traps_mean", "traps_entries",
                 "traps_tail", "trap_entries", "max_rand_eval", "rand_bulk_max",
                 "max_abs_w_over_std", "warning", "status")
NUMERIC = {"layer", "expert", "N", "M", "alpha", "D", "num_pl_spikes", "log_norm",
           "rand_num_spikes", "traps_mean", "traps_entries", "traps_tail", "trap_entries",
           "max_rand_eval", "rand_bulk_max", "max_abs_w_over_std"}


def environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("llm_audit", "report/templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def render_html(details: pd.DataFrame, summary: dict, skipped: pd.DataFrame,
                figures: list[Figure], title: str = "llm-audit") -> str:
    template = environment().get_template("report.html.j2")
    return template.render(
        title=f"{title}: {summary.get('model', '')}",
        summary=summary_items(summary),
        figures=[_figure(f) for f in figures if not f.key.startswith("spectra_")],
        spectra=[_figure(f) for f in figures if f.key.startswith("spectra_")],
        flagged=table(flagged_rows(details)),
        skipped=[(str(r.name), str(r.dtype), str(list(r.shape)), str(r.reason))
                 for r in skipped.itertuples()],
        table=table(details),
    )


def summary_items(s: dict) -> list[tuple[str, str]]:
    items = [("model", s.get("model")), ("revision", s.get("revision") or "—"),
             ("matrices analysed", s.get("matrices_analysed")),
             ("matrices failed", s.get("matrices_failed")),
             ("tensors skipped", s.get("tensors_skipped")),
             ("mean α", fmt(s.get("mean_alpha"))),
             ("over-trained (α < 2)", s.get("num_over_trained")),
             ("under-trained (α > 6)", s.get("num_under_trained")),
             ("correlation traps (total)", s.get("total_traps")),
             ("traps by class", trap_classes_text(s)),
             ("matrices with traps", s.get("matrices_with_traps"))]
    opts = s.get("options") or {}
    if "trap_rule" in opts:
        items.append(("trap rule", opts["trap_rule"]))
    if "precision" in opts:
        items.append(("eigenvalue precision", precision_text(s)))
    if "elapsed_seconds" in s:
        items.append(("elapsed", elapsed_text(s)))
    return [(k, "—" if v is None else str(v)) for k, v in items]


def trap_classes_text(s: dict) -> str | None:
    """'mean 1, entries 4, tail 0' (see README, How to read traps)."""
    by = s.get("traps_by_class")
    return None if by is None else ", ".join(f"{k} {v}" for k, v in by.items())


def precision_text(s: dict) -> str:
    """'auto (3 of 40 matrices in float64)'."""
    n = s.get("matrices_in_float64")
    tail = f" ({n} of {s.get('matrices_analysed')} matrices in float64)" if n is not None else ""
    return f"{(s.get('options') or {}).get('precision', '—')}{tail}"


def elapsed_text(s: dict) -> str:
    """'12.3 s (eigenvalues 5.1 s, fit 1.0 s, traps 3.2 s; waited 0.1 s for data)'."""
    st = s.get("stage_seconds")
    if not st:
        return f"{s['elapsed_seconds']:.1f} s"
    return (f"{s['elapsed_seconds']:.1f} s (eigenvalues {st['eigen']:.1f} s, fit {st['fit']:.1f} "
            f"s, traps {st['traps']:.1f} s; waited {st['wait']:.1f} s for data)")


def flagged_rows(details: pd.DataFrame) -> pd.DataFrame:
    return details[(details["warning"].fillna("") != "") | (details["rand_num_spikes"] > 0)]


def table(df: pd.DataFrame, columns: tuple[str, ...] = TABLE_COLUMNS,
          numeric: frozenset[str] | set[str] = NUMERIC) -> dict:
    """Header and rows for the template: each cell is (text, sort key, numeric?)."""
    cols = [c for c in columns if c in df.columns]
    rows = []
    for rec in df[cols].itertuples(index=False):
        cells = []
        for c, v in zip(cols, rec, strict=True):
            num = c in numeric
            cells.append((fmt(v), _sort_key(v) if num else fmt(v), num))
        rows.append(cells)
    return {"columns": [(c, c in numeric) for c in cols], "rows": rows}


def _sort_key(v) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(x) else repr(x)


def fmt(v) -> str:
    if v is None or v is pd.NA:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _figure(f: Figure) -> dict:
    return {"key": f.key, "title": f.title, "caption": f.caption,
            "src": "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")}
