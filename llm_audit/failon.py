"""`--fail-on EXPR` for CI gating: a tiny parser of `column op number` conditions (no eval).

Several conditions separated by ',' mean OR: `'rand_num_spikes>0,alpha<2'`. The column must be a
numeric column of layers.csv; ops are < <= > >= == !=. A NaN value (a failed quantity) matches no
condition.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pandas as pd

from .errors import UsageError
from .records import COLUMNS
from .safetext import clip

OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
       "<": operator.lt, ">": operator.gt}
_OPS_LONGEST_FIRST = ("<=", ">=", "==", "!=", "<", ">")
_NUMBER_CHARS = frozenset("0123456789.eE+-")
_TEXT_COLUMNS = {"name", "module", "hf_module", "dtype", "warning", "status"}


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"

    def mask(self, details: pd.DataFrame) -> pd.Series:
        col = pd.to_numeric(details[self.column], errors="coerce").astype("float64")
        return OPS[self.op](col, self.value).fillna(False) & col.notna()


@dataclass(frozen=True)
class Match:
    name: str
    condition: Condition
    value: float

    def __str__(self) -> str:
        return f"{self.name}: {self.condition.column}={self.value:g} ({self.condition})"


def numeric_columns() -> tuple[str, ...]:
    return tuple(c for c in COLUMNS if c not in _TEXT_COLUMNS)


def parse_fail_on(expr: str) -> tuple[Condition, ...]:
    """Parse 'col op number[,col op number...]'; raises UsageError on anything else."""
    conds = []
    for part in expr.split(","):
        parsed = _parse_condition(part)
        if parsed is None:
            raise UsageError(f"--fail-on: cannot parse {clip(part.strip())!r}: expected "
                             "'column op number' with op one of < <= > >= == !=")
        column, op, value = parsed
        if column not in COLUMNS:
            raise UsageError(f"--fail-on: {column!r} is not a column of layers.csv")
        if column not in numeric_columns():
            raise UsageError(f"--fail-on: column {column!r} is not numeric")
        conds.append(Condition(column, op, value))
    return tuple(conds)


def _parse_condition(part: str) -> tuple[str, str, float] | None:
    """'column op number' -> (column, op, value), or None. One left-to-right scan, no regex:
    time linear in the text, however long (a backtracking pattern took minutes on 40,000
    digits)."""
    text = part.strip()
    i = 0
    while i < len(text) and (text[i].isascii() and (text[i].isalnum() or text[i] == "_")):
        i += 1
    column, rest = text[:i], text[i:].lstrip()
    if not column or not (column[0].isalpha() or column[0] == "_"):
        return None
    op = next((o for o in _OPS_LONGEST_FIRST if rest.startswith(o)), None)
    if op is None:
        return None
    raw = rest[len(op):].strip()
    if raw.lstrip("+-").lower() != "inf" and not (raw and set(raw) <= _NUMBER_CHARS):
        return None
    try:
        return column, op, float(raw)
    except ValueError:
        return None


def find_matches(details: pd.DataFrame, conditions: tuple[Condition, ...]) -> list[Match]:
    """Each matrix that matches a condition, once (the first condition it matches), table order."""
    out, seen = [], set()
    for cond in conditions:
        hits = details[cond.mask(details)]
        for idx, name, value in zip(hits.index, hits["name"], hits[cond.column], strict=True):
            if idx not in seen:
                seen.add(idx)
                out.append((idx, Match(str(name), cond, float(value))))
    return [m for _, m in sorted(out, key=lambda p: p[0])]

