"""report.md: a summary a person reads in a PR comment, the flagged matrices, the pictures.

Names from the checkpoint are written as code spans (so no header name can inject a link, an
image or HTML into the comment) with table-breaking characters escaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .fmt import cell, code, fmt, summary_rows

if TYPE_CHECKING:
    from ..summary import AuditSummary

TABLE_COLUMNS = ("name", "layer", "module", "expert", "N", "M", "alpha", "D", "num_pl_spikes",
                 "log_norm", "rand_num_spikes", "traps_mean", "traps_entries", "traps_tail",
                 "max_rand_eval", "rand_bulk_max", "warning")
MAX_FLAGGED_ROWS = 50
MAX_TABLE_ROWS = 300


def render_markdown(details: pd.DataFrame, summary: AuditSummary, skipped: pd.DataFrame,
                    figures: list[tuple[str, str]] = ()) -> str:
    """`figures`: (title, relative path) of PNGs written beside report.md."""
    lines = [f"# llm-audit: {code(summary.model)}", ""]
    if summary.revision:
        lines += [f"Revision {code(summary.revision)}.", ""]
    lines += _summary_table(summary)
    flagged = details[(details["warning"].fillna("") != "") | (details["rand_num_spikes"] > 0)]
    lines += [f"## Flagged matrices ({len(flagged)})", ""]
    lines += _table(flagged, MAX_FLAGGED_ROWS) if len(flagged) else ["None.", ""]
    lines += _expert_tables(details)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{cell(title)}]({path})\n" for title, path in figures]
    if len(skipped):
        lines += [f"## Skipped tensors ({len(skipped)})", "", "| name | dtype | shape | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {code(r.name)} | {cell(r.dtype)} | {list(r.shape)} | {cell(r.reason)} |"
                  for r in skipped.head(MAX_TABLE_ROWS).itertuples()] + [""]
    lines += [f"<details><summary>All matrices ({len(details)})</summary>", ""]
    lines += _table(details, MAX_TABLE_ROWS) + ["</details>", ""]
    return "\n".join(lines)


def expert_grid(details: pd.DataFrame, column: str, how: str) -> pd.DataFrame:
    """Layer × expert table of `column` aggregated over the expert's modules (mean or sum)."""
    moe = details[details["expert"].notna() & details["layer"].notna()]
    grid = moe.pivot_table(index="layer", columns="expert", values=column, aggfunc=how)
    return grid.sort_index().sort_index(axis=1)


def _expert_tables(details: pd.DataFrame) -> list[str]:
    """MoE checkpoints: a layer × expert table of mean α and one of traps."""
    if "expert" not in details.columns or details["expert"].notna().sum() == 0:
        return []
    out = []
    for title, col, how in (("Mean α per layer × expert", "alpha", "mean"),
                            ("Correlation traps per layer × expert", "rand_num_spikes", "sum")):
        grid = expert_grid(details, col, how)
        out += [f"<details><summary>{title}</summary>", "",
                "| layer | " + " | ".join(f"e{int(e)}" for e in grid.columns) + " |",
                "|---|" + "---|" * len(grid.columns)]
        for layer, row in grid.iterrows():
            cells = [fmt(float(v)) if how == "mean" else fmt(int(v)) if v == v else ""
                     for v in row]
            out.append(f"| {int(layer)} | " + " | ".join(cells) + " |")
        out += ["", "</details>", ""]
    return out


def _summary_table(s: AuditSummary) -> list[str]:
    rows = [f"| {k} | {v} |" for k, v in summary_rows(s, rule=code)]
    return (["| | |", "|---|---|"] + rows + [
        "", "α is the power-law exponent of the eigenvalue spectrum's tail (≈ 2 ideal, < 2 "
        "over-fit, > 6 under-trained); a correlation trap is an eigenvalue of the element-shuffled "
        "matrix beyond its Marchenko–Pastur bulk. Its class says what it is made of: `mean` (a "
        "non-zero entry mean), `entries` (≤ 16 outlier entries, listed in traps.csv), `tail` (a "
        "heavy-tailed entry distribution).", ""])


def _table(df: pd.DataFrame, limit: int) -> list[str]:
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df[cols].head(limit).itertuples(index=False):
        cells = [code(v) if c == "name" else cell(fmt(v))
                 for c, v in zip(cols, row, strict=True)]
        out.append("| " + " | ".join(cells) + " |")
    if len(df) > limit:
        out.append(f"\n… and {len(df) - limit} more (see layers.csv).")
    return out + [""]
