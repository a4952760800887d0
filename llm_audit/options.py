"""Audit options: one frozen record, validated once, passed down the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError
from .rules import RULES
from .safetext import clip

TRAP_RULES = tuple(RULES)
FIX_FINGERS = ("none", "clip_xmax")
PRECISIONS = ("auto", "float32", "float64")


@dataclass(frozen=True)
class AuditOptions:
    include: str | None = None  # regex on tensor names: analyse only matches
    exclude: str | None = None  # regex on tensor names: skip matches
    device: str = "auto"  # auto | cpu | cuda[:i]
    seed: int = 0
    randomize: bool = True  # compute correlation traps
    trap_rule: str = "ww"  # a name of rules.RULES: ww (WeightWatcher's) | tw | perm
    fix_fingers: str = "none"
    # eigenvalue precision. auto: float32, redone in float64 for a matrix whose float32 answer
    # (xmin choice, a trap or spike count) is within round-off of changing
    precision: str = "auto"

    def __post_init__(self) -> None:
        for flag, rx in (("--include", self.include), ("--exclude", self.exclude)):
            if rx is not None:
                compile_filter(rx, flag)
        if self.trap_rule not in TRAP_RULES:
            raise UsageError(f"--trap-rule must be one of {', '.join(TRAP_RULES)}, "
                             f"got {self.trap_rule!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.fix_fingers not in FIX_FINGERS:
            raise UsageError(f"--fix-fingers must be one of {', '.join(FIX_FINGERS)}, "
                             f"got {self.fix_fingers!r}")

    def wants(self, name: str) -> bool:
        """Whether --include/--exclude keep the tensor `name` (linear-time matching: a pattern
        like '(a+)+$' against a hostile header name cannot hang the audit)."""
        if self.include is not None and not compile_filter(self.include).search(name):
            return False
        return not (self.exclude is not None and compile_filter(self.exclude).search(name))

    def eig_dtype(self) -> torch.dtype:
        """The precision eigenvalues are first computed in."""
        return torch.float64 if self.precision == "float64" else torch.float32

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise UsageError(f"--device {self.device!r} is not a device (use auto, cpu or cuda)") \
                from e
        if dev.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {clip(self.device)!r} is not supported (use auto, cpu or "
                             "cuda[:i])")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA device is available; "
                             "use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {self.device}: there are only "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return dev


def compile_filter(pattern: str, flag: str = "--include"):
    """A compiled --include/--exclude pattern. RE2 (google-re2), not Python's backtracking
    `re`: tensor names come from untrusted headers, and RE2 matches in time linear in the
    name whatever the pattern (it has no backreferences or lookaround; those are refused)."""
    import re2

    opts = re2.Options()
    opts.log_errors = False  # the reason goes into our one-line error, not to stderr
    try:
        return re2.compile(pattern, options=opts)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise UsageError(f"{flag} {clip(pattern)!r} is not a regular expression the linear-time "
                         f"matcher accepts ({reason}; backreferences and lookaround are not "
                         "supported)") from e
