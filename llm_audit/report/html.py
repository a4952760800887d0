"""report.html: one self-contained page (inline CSS, JS and base64 PNG figures; nothing remote).

Every string from the checkpoint (tensor names, reasons, metadata) goes through jinja2's
autoescaping; the figures' file names never come from header names.
"""

from __future__ import annotations

import base64
import math
from typing import TYPE_CHECKING

import pandas as pd

from .fmt import fmt, summary_rows

if TYPE_CHECKING:  # jinja2 and matplotlib load only when an HTML report is written
    import jinja2

    from ..summary import AuditSummary
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


def render_html(details: pd.DataFrame, summary: AuditSummary, skipped: pd.DataFrame,
                figures: list[Figure], title: str = "llm-audit") -> str:
    template = environment().get_template("report.html.j2")
    return template.render(
        title=f"{title}: {summary.model}",
        summary=summary_items(summary),
        figures=[_figure(f) for f in figures if not f.key.startswith("spectra_")],
        spectra=[_figure(f) for f in figures if f.key.startswith("spectra_")],
        flagged=table(flagged_rows(details)),
        skipped=[(str(r.name), str(r.dtype), str(list(r.shape)), str(r.reason))
                 for r in skipped.itertuples()],
        table=table(details),
    )


def summary_items(s: AuditSummary) -> list[tuple[str, str]]:
    """The summary table: model, revision and the rows report.md shows (`fmt.summary_rows`)."""
    return [("model", s.model), ("revision", s.revision or "—"),
            *summary_rows(s, missing="—")]


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


def _figure(f: Figure) -> dict:
    return {"key": f.key, "title": f.title, "caption": f.caption,
            "src": "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")}
