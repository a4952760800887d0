"""The audit's summary: one frozen record (`AuditSummary`), built by `summarise`, written as
summary.json (`to_json`), read back by `from_dict`; reports read its attributes."""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .anatomy import TRAP_CLASSES
from .jsonio import json_safe

if TYPE_CHECKING:
    import pandas as pd

    from .options import AuditOptions
    from .source import Checkpoint

#: stage_seconds key -> the per-matrix column it sums
STAGE_COLUMNS = {"read": "read_seconds", "decode": "decode_seconds", "eigen": "eigen_seconds",
                 "fit": "fit_seconds", "traps": "trap_seconds", "wait": "wait_seconds"}
_NAN_FIELDS = ("mean_alpha", "median_alpha")  # null in summary.json -> NaN here


@dataclass(frozen=True)
class AuditSummary:
    """One audit in numbers: the keys of summary.json, in its order. Trap fields are None
    without the trap analysis (``randomize=False``); α statistics are NaN when no fit
    succeeded (null in summary.json)."""

    model: str
    source: str = ""
    revision: str | None = None
    matrices_analysed: int = 0
    matrices_failed: int = 0
    matrices_in_float64: int = 0
    tensors_skipped: int = 0
    mean_alpha: float = math.nan  # over the matrices whose α fit succeeded
    median_alpha: float = math.nan
    num_over_trained: int = 0
    num_under_trained: int = 0
    total_traps: int | None = None
    matrices_with_traps: int | None = None
    traps_by_class: dict[str, int] | None = None  # anatomy.TRAP_CLASSES -> traps
    bytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # AuditOptions' fields
    versions: dict[str, str] = field(default_factory=dict)  # llm_audit, torch, python
    elapsed_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # STAGE_COLUMNS' keys

    def as_dict(self) -> dict[str, Any]:
        """The summary as a plain dict (summary.json's keys; NaN stays NaN)."""
        return dataclasses.asdict(self)

    def to_json(self) -> dict[str, Any]:
        """summary.json's object: `as_dict` with NaN and ±Inf as None (null)."""
        return json_safe(self.as_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditSummary:
        """The summary of a summary.json object (``json.loads`` of the file): null α back to
        NaN; keys it does not know are ignored, keys an older writer lacked take defaults."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        for k in _NAN_FIELDS:
            if kw.get(k) is None:
                kw[k] = math.nan
        return cls(**kw)


def summarise(ckpt: Checkpoint, opts: AuditOptions, details: pd.DataFrame,
              skipped: pd.DataFrame, elapsed: float) -> AuditSummary:
    """The summary of an audit's rows (`details`, the columns of layers.csv)."""
    import torch

    from . import __version__

    ok = details[details["status"] == "ok"]
    alpha = ok["alpha"].dropna()
    traps = opts.randomize
    return AuditSummary(
        model=ckpt.name,
        source=str(ckpt.root),
        revision=ckpt.revision,
        matrices_analysed=int(len(ok)),
        matrices_failed=int((details["status"] != "ok").sum()),
        matrices_in_float64=int((ok["precision"] == "float64").sum()),
        tensors_skipped=int(len(skipped)),
        mean_alpha=float(alpha.mean()) if len(alpha) else math.nan,
        median_alpha=float(alpha.median()) if len(alpha) else math.nan,
        num_over_trained=int((ok["warning"] == "over-trained").sum()),
        num_under_trained=int((ok["warning"] == "under-trained").sum()),
        total_traps=int(ok["rand_num_spikes"].sum()) if traps else None,
        matrices_with_traps=int((ok["rand_num_spikes"] > 0).sum()) if traps else None,
        traps_by_class=({c: int(ok[f"traps_{c}"].sum()) for c in TRAP_CLASSES}
                        if traps else None),
        bytes=ckpt.total_bytes,
        options={k: getattr(opts, k) for k in opts.__dataclass_fields__},
        versions={"llm_audit": __version__, "torch": torch.__version__,
                  "python": platform.python_version()},
        elapsed_seconds=elapsed,
        stage_seconds={stage: float(details[col].fillna(0).sum())
                       for stage, col in STAGE_COLUMNS.items()},
    )
