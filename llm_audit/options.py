"""Audit options: one frozen record, validated once, passed down the pipeline.

Each field declares its command-line flag and help once (its metadata); the CLI builds its
options from them (`cli_flags`), so defaults and choices cannot drift apart. No torch at
import time: `llm-audit --help` reads this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .precision import MODES as PRECISION_MODES
from .precision import PrecisionPolicy
from .rules import RULES
from .safetext import clip

if TYPE_CHECKING:
    import torch

TRAP_RULES = tuple(RULES)
FIX_FINGERS = ("none", "clip_xmax")
PRECISIONS = PRECISION_MODES


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         metavar: str | None = None, negated: str | None = None) -> Any:
    """A field with its CLI declaration: ``negated`` names the flag that turns a True
    default off (``--no-randomize``)."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "metavar": metavar, "negated": negated})


@dataclass(frozen=True)
class AuditOptions:
    include: str | None = _opt(None, "Analyse only tensors whose name matches.",
                               metavar="REGEX")
    exclude: str | None = _opt(None, "Skip tensors whose name matches.", metavar="REGEX")
    device: str = _opt("auto", "auto | cpu | cuda[:i]")
    seed: int = _opt(0, "Seed of the shuffles.")
    randomize: bool = _opt(True, "Skip the correlation-trap analysis.", negated="--no-randomize")
    trap_rule: str = _opt("ww", "", choices=TRAP_RULES)  # help: rules.rules_help()
    anatomy: bool = _opt(True, "Count the traps without classing or locating them (class "
                         "'unclassified', as WeightWatcher reports traps): about half the trap "
                         "stage on heavy-tailed matrices.", negated="--no-anatomy")
    fix_fingers: str = _opt("none", "WeightWatcher's finger clipping of the alpha fit.",
                            choices=FIX_FINGERS)
    # auto: float32, redone in float64 for a matrix whose float32 answer (xmin choice, a trap
    # or spike count, the rank) is within round-off of changing
    precision: str = _opt("auto", "Eigenvalue precision. auto: float32, redone in float64 for "
                          "any matrix whose answer float32 round-off could change.",
                          choices=PRECISIONS)

    executor: str = _opt("auto", "Who analyses the matrices: auto (threads on CPU, serial on "
                         "CUDA) | serial | threads[:N] (N matrices at once in this process, "
                         "cores/N threads each; default N: the cores, at most 8) | "
                         "processes[:N] (N local worker processes; one per GPU with --device "
                         "cuda) | ray[:ADDRESS] (Ray tasks; no address: a local cluster; "
                         "ray:auto: the running one). Results are the same up to float "
                         "round-off of multi-threaded sums (exactly the same on matrices too "
                         "small for torch to split).", metavar="SPEC")

    def __post_init__(self) -> None:
        parse_executor(self.executor)
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

    def policy(self) -> PrecisionPolicy:
        """The precision policy of ``--precision`` (precision.py): every change of precision
        is decided there."""
        return PrecisionPolicy(self.precision)

    def eig_dtype(self) -> torch.dtype:
        """The precision eigenvalues are first computed in."""
        return self.policy().first()

    def torch_device(self) -> torch.device:
        import torch

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


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str  # auto | serial | threads | processes | ray
    workers: int | None = None  # threads:N, processes:N
    address: str | None = None  # ray:ADDRESS


def parse_executor(spec: str) -> ExecutorSpec:
    """``auto``, ``serial``, ``threads[:N]`` or ``processes[:N]`` (N >= 1) or ``ray[:ADDRESS]``
    (an address may hold colons: ``ray:10.0.0.1:6379``)."""
    kind, _, arg = str(spec).partition(":")
    if kind in ("auto", "serial") and not arg:
        return ExecutorSpec(kind)
    if kind in ("threads", "processes"):
        if not arg:
            return ExecutorSpec(kind)
        if arg.isdigit() and int(arg) >= 1:
            return ExecutorSpec(kind, workers=int(arg))
    if kind == "ray":
        return ExecutorSpec("ray", address=arg or None)
    raise UsageError(f"--executor {clip(str(spec))!r} is not an executor: use auto, serial, "
                     "threads[:N], processes[:N] (N >= 1) or ray[:ADDRESS]")


def resolve_options(options: AuditOptions | None, fields_: dict) -> AuditOptions:
    """`options=` and/or keyword fields (keywords win): every entry point takes either."""
    from dataclasses import replace

    base = options if options is not None else AuditOptions()
    return replace(base, **fields_) if fields_ else base


def cli_flags() -> list[tuple[str, str, dict]]:
    """(field name, flag, click.option keyword arguments) of every option, from the fields."""
    from .rules import rules_help

    out = []
    for f in fields(AuditOptions):
        meta = f.metadata
        if meta["negated"]:
            out.append((f.name, meta["negated"], dict(is_flag=True, help=meta["help"])))
            continue
        kw: dict = dict(default=f.default, show_default=f.default is not None,
                        help=meta["help"] or rules_help() + ".")
        if meta["choices"]:
            kw["type"] = _choice(meta["choices"])
        elif isinstance(f.default, int) and not isinstance(f.default, bool):
            kw["type"] = int
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        out.append((f.name, "--" + f.name.replace("_", "-"), kw))
    return out


def from_cli(kw: dict) -> dict:
    """AuditOptions keyword arguments from the parsed CLI flags (`cli_flags`)."""
    out = {}
    for name, flag, _ in cli_flags():
        key = flag.lstrip("-").replace("-", "_")
        out[name] = not kw[key] if flag.startswith("--no-") else kw[key]
    return out


def _choice(choices: tuple[str, ...]):
    import click

    return click.Choice(list(choices))


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
