"""report.md: a summary a person reads in a PR comment, the flagged matrices, the full table."""

from __future__ import annotations

import math

import pandas as pd

TABLE_COLUMNS = ("name", "layer", "module", "expert", "N", "M", "alpha", "D", "num_pl_spikes",
                 "log_norm", "rand_num_spikes", "max_rand_eval", "rand_bulk_max", "warning")


def render_markdown(details: pd.DataFrame, summary: dict, skipped: pd.DataFrame) -> str:
    s = summary
    lines = [f"# llm-audit: {s['model']}", ""]
    if s.get("revision"):
        lines += [f"Revision `{s['revision']}`.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| matrices analysed | {s['matrices_analysed']} |",
        f"| matrices failed | {s['matrices_failed']} |",
        f"| tensors skipped | {s['tensors_skipped']} |",
        f"| mean α | {_fmt(s['mean_alpha'])} |",
        f"| over-trained (α < 2) | {s['num_over_trained']} |",
        f"| under-trained (α > 6) | {s['num_under_trained']} |",
        f"| correlation traps (total) | {s['total_traps']} |",
        f"| matrices with traps | {s['matrices_with_traps']} |",
        f"| trap rule | `{s['options']['trap_rule']}` |",
        f"| elapsed | {s['elapsed_seconds']:.1f} s |", "",
        "α is the power-law exponent of the eigenvalue spectrum's tail (≈ 2 ideal, < 2 over-fit, "
        "> 6 under-trained); a correlation trap is an eigenvalue of the element-shuffled matrix "
        "beyond its Marchenko–Pastur bulk.", "",
    ]
    flagged = details[(details["warning"].fillna("") != "") | (details["rand_num_spikes"] > 0)]
    lines += [f"## Flagged matrices ({len(flagged)})", ""]
    lines += _table(flagged) if len(flagged) else ["None.", ""]
    if len(skipped):
        lines += [f"## Skipped tensors ({len(skipped)})", "", "| name | dtype | shape | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {_esc(r.name)} | {r.dtype} | {list(r.shape)} | {_esc(r.reason)} |"
                  for r in skipped.itertuples()] + [""]
    lines += [f"## All matrices ({len(details)})", ""] + _table(details)
    return "\n".join(lines) + "\n"


def _table(df: pd.DataFrame) -> list[str]:
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df[cols].itertuples(index=False):
        out.append("| " + " | ".join(_esc(_fmt(v)) for v in row) + " |")
    return out + [""]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    return str(v)


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
