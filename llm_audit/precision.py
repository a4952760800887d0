"""The precision policy: one object decides every change of eigenvalue precision.

``--precision`` is ``float64`` (everything in float64), ``float32`` (everything in float32,
never redone: round-off is accepted, trap counts included) or ``auto`` (float32 first; a
matrix whose answer float32 round-off could change is redone in float64: its α/xmin choice,
its MP spike count, its rank (analysis.py), or its trap count near the rule's threshold
(rules.py)). Every change shows in the row: ``precision`` (the spectrum's) and
``trap_precision`` (the shuffled spectrum's the trap count was decided in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODES = ("auto", "float32", "float64")


@dataclass(frozen=True)
class PrecisionPolicy:
    mode: str = "auto"

    def first(self) -> torch.dtype:
        """The precision eigenvalues are first computed in."""
        import torch

        return torch.float64 if self.mode == "float64" else torch.float32

    def redo(self, dtype: torch.dtype, undecided: bool) -> bool:
        """Whether an answer computed in `dtype` is recomputed in float64: only under ``auto``,
        only from float32, only when round-off could change it (`undecided`)."""
        import torch

        return self.mode == "auto" and dtype != torch.float64 and bool(undecided)


def name(dtype: torch.dtype) -> str:
    """'float32' / 'float64': how a precision is written in a row."""
    return str(dtype).removeprefix("torch.")
