"""Formatting shared by every report: numbers (`fmt`), markdown code spans and cells for
untrusted names (`code`, `cell`), and the summary rows report.md and report.html show."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd

from ..safetext import terminal

if TYPE_CHECKING:
    from ..summary import AuditSummary

NAME_MAX = 300  # characters of a name or reason in a markdown cell


def fmt(v) -> str:
    """A value as report text: None, NA and NaN empty, floats to 4 significant digits."""
    if v is None or v is pd.NA:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def code(text) -> str:
    """A markdown code span that holds any text: backtick fence longer than any run inside;
    control characters (CR, LF, escapes) shown as escapes, so no name ends a table row."""
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


def cell(text: str) -> str:
    """Plain text in a markdown table cell: no HTML, no links or emphasis, one line."""
    t = terminal(text, NAME_MAX)
    for ch in "\\`*_[]|<>!":
        t = t.replace(ch, "\\" + ch)
    return t


def summary_rows(s: AuditSummary, missing: str = "",
                 rule: Callable[[str], str] = str) -> list[tuple[str, str]]:
    """(label, text) of the summary table of report.md and report.html; a value that is not
    there (no trap analysis, NaN α) reads `missing`; `rule` formats the trap rule's name."""
    trap_rule = s.options.get("trap_rule")
    rows = [
        ("matrices analysed", s.matrices_analysed), ("matrices failed", s.matrices_failed),
        ("tensors skipped", s.tensors_skipped), ("mean α", fmt(s.mean_alpha) or None),
        ("over-trained (α < 2)", s.num_over_trained),
        ("under-trained (α > 6)", s.num_under_trained),
        ("correlation traps (total)", s.total_traps),
        ("traps by class (mean, entries, tail)", trap_classes_text(s)),
        ("matrices with traps", s.matrices_with_traps),
        ("trap rule", None if trap_rule is None else rule(trap_rule)),
        ("eigenvalue precision", precision_text(s)),
        ("elapsed", elapsed_text(s)),
    ]
    return [(k, missing if v is None else fmt(v)) for k, v in rows]


def trap_classes_text(s: AuditSummary) -> str | None:
    """'mean 1, entries 4, tail 0' (see README, How to read traps)."""
    by = s.traps_by_class
    return None if by is None else ", ".join(f"{k} {v}" for k, v in by.items())


def precision_text(s: AuditSummary) -> str:
    """'auto (3 of 40 matrices in float64)'."""
    return (f"{s.options.get('precision', '—')} ({s.matrices_in_float64} of "
            f"{s.matrices_analysed} matrices in float64)")


def elapsed_text(s: AuditSummary) -> str:
    """'12.3 s (eigenvalues 5.1 s, fit 1.0 s, traps 3.2 s; waited 0.1 s for data)'."""
    st = s.stage_seconds
    if not st:
        return f"{s.elapsed_seconds:.1f} s"
    return (f"{s.elapsed_seconds:.1f} s (eigenvalues {st['eigen']:.1f} s, fit {st['fit']:.1f} "
            f"s, traps {st['traps']:.1f} s; waited {st['wait']:.1f} s for data)")
