"""The one JSON sanitizer of every file and line the package writes (summary.json, diff.json,
trend.json, plan.json, audit_key.json, --log-json): strict JSON, never ``NaN`` or ``Infinity``.

The journal (``journal.py``) is not a report: it keeps NaN, so resumed rows come back equal.
"""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(x: Any) -> Any:
    """A copy of `x` that strict JSON can hold: NaN and ±Inf -> None (null), numpy and torch
    scalars -> Python numbers, tuples -> lists, pandas' NA -> None, any other object -> str."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):  # numpy / torch scalars
        return json_safe(x.item())
    if type(x).__name__ == "NAType":  # pandas.NA, without importing pandas
        return None
    return str(x)


def dumps(obj: Any, indent: int | None = 2) -> str:
    """`obj` as strict JSON text (``json_safe``; ``allow_nan=False`` is the proof)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
