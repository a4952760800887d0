"""report.md: a summary a person reads in a PR comment, the flagged matrices, the pictures.

Names from the checkpoint are written as code spans (so no header name can inject a link, an
image or HTML into the comment) with table-breaking characters escaped.
"""

from __future__ import annotations

import pandas as pd

from ..safetext import terminal
from .html import elapsed_text, precision_text, trap_classes_text
from .html import fmt as _fmt

TABLE_COLUMNS = ("name", "layer", "module", "expert", "N", "M", "alpha", "D", "num_pl_spikes",
                 "log_norm", "rand_num_spikes", "traps_mean", "traps_entries", "traps_tail",
                 "max_rand_eval", "rand_bulk_max", "warning")
MAX_FLAGGED_ROWS = 50
NAME_MAX = 300  # characters of a name or reason in a cell
MAX_TABLE_ROWS = 300


def render_markdown(details: pd.DataFrame, summary: dict, skipped: pd.DataFrame,
                    figures: list[tuple[str, str]] = ()) -> str:
    """`figures`: (title, relative path) of PNGs written beside report.md."""
    s = summary
    lines = [f"# llm-audit: {_code(s['model'])}", ""]
    if s.get("revision"):
        lines += [f"Revision {_code(s['revision'])}.", ""]
    lines += _summary_table(s)
    flagged = details[(details["warning"].fillna("") != "") | (details["rand_num_spikes"] > 0)]
    lines += [f"## Flagged matrices ({len(flagged)})", ""]
    lines += _table(flagged, MAX_FLAGGED_ROWS) if len(flagged) else ["None.", ""]
    lines += _expert_tables(details)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{_text(title)}]({path})\n" for title, path in figures]
    if len(skipped):
        lines += [f"## Skipped tensors ({len(skipped)})", "", "| name | dtype | shape | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {_code(r.name)} | {_cell(r.dtype)} | {list(r.shape)} | {_cell(r.reason)} |"
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
            cells = [_fmt(float(v)) if how == "mean" else _fmt(int(v)) if v == v else ""
                     for v in row]
            out.append(f"| {int(layer)} | " + " | ".join(cells) + " |")
        out += ["", "</details>", ""]
    return out


def _summary_table(s: dict) -> list[str]:
    rows = [
        ("matrices analysed", s["matrices_analysed"]), ("matrices failed", s["matrices_failed"]),
        ("tensors skipped", s["tensors_skipped"]), ("mean α", _fmt(s["mean_alpha"])),
        ("over-trained (α < 2)", s["num_over_trained"]),
        ("under-trained (α > 6)", s["num_under_trained"]),
        ("correlation traps (total)", s["total_traps"]),
        ("traps by class (mean, entries, tail)", trap_classes_text(s)),
        ("matrices with traps", s["matrices_with_traps"]),
        ("trap rule", f"`{s['options']['trap_rule']}`"),
        ("eigenvalue precision", precision_text(s)),
        ("elapsed", elapsed_text(s)),
    ]
    return (["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows] + [
        "", "α is the power-law exponent of the eigenvalue spectrum's tail (≈ 2 ideal, < 2 "
        "over-fit, > 6 under-trained); a correlation trap is an eigenvalue of the element-shuffled "
        "matrix beyond its Marchenko–Pastur bulk. Its class says what it is made of: `mean` (a "
        "non-zero entry mean), `entries` (≤ 16 outlier entries, listed in traps.csv), `tail` (a "
        "heavy-tailed entry distribution).", ""])


def _table(df: pd.DataFrame, limit: int) -> list[str]:
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df[cols].head(limit).itertuples(index=False):
        cells = [_code(v) if c == "name" else _cell(_fmt(v)) for c, v in zip(cols, row,
                                                                             strict=True)]
        out.append("| " + " | ".join(cells) + " |")
    if len(df) > limit:
        out.append(f"\n… and {len(df) - limit} more (see layers.csv).")
    return out + [""]


def _code(text) -> str:
    """A code span that holds any text: backtick fence longer than any run inside; control
    characters (CR, LF, escapes) shown as escapes, so no name ends a table row."""
    t = terminal(text, NAME_MAX).replace("|", "\\|")
    fence = "`" * (max((len(x) for x in _backtick_runs(t)), default=0) + 1)
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def _backtick_runs(t: str) -> list[str]:
    runs, cur = [], ""
    for ch in t:
        if ch == "`":
            cur += ch
        elif cur:
            runs.append(cur)
            cur = ""
    return runs + ([cur] if cur else [])


def _cell(text: str) -> str:
    """Plain text in a table cell: no HTML, no markdown links or emphasis, one line."""
    t = terminal(text, NAME_MAX)
    for ch in "\\`*_[]|<>!":
        t = t.replace(ch, "\\" + ch)
    return t


def _text(text: str) -> str:
    return _cell(text)
