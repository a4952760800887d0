"""`llm-audit sweep`: audit a series of checkpoints and follow α and traps against the step.

Each checkpoint is audited by :func:`llm_audit.audit` into its own subfolder of `out` (its
normal reports), resumably (the journal of `journal.py`, per subfolder); a checkpoint whose
subfolder already holds an audit of the same bytes with the same options (`audit_key.json`,
from the journal's job keys) is reused, not recomputed. The trend (a long table: step,
checkpoint and every layers.csv column) and the first step each `--fail-on` condition holds,
per matrix, go to trend.csv, trend.json, trend.html and trend.md (`report/trend.py`).

Ordering and step parsing are pure functions of names (and modification times for `mtime`).
Checkpoints are audited one after another (`_audit_one` per checkpoint: an executor that maps
it over the checkpoints can be added without changing the rest).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import AuditError, SourceError, UsageError
from .failon import Condition, find_matches, parse_fail_on
from .options import AuditOptions, compile_filter, resolve_options
from .records import COLUMNS
from .safetext import clip

log = logging.getLogger(__name__)
ORDERS = ("step", "name", "mtime")
#: the step in checkpoint-1200, step_0001200, global_step1200, step_000400020.safetensors
DEFAULT_STEP_REGEX = r"(?i)(?:checkpoint|global_step|step|ckpt|iter)[-_]?(\d+)"
DEFAULT_CONDITIONS = "rand_num_spikes>0,alpha<2"  # reported when no --fail-on is given
CHECKPOINT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")
KEY_FILE = "audit_key.json"
TREND_COLUMNS = ("step", "checkpoint", *COLUMNS)
_GLOB_CHARS = frozenset("*?[")
_TEXT = {"name": str, "module": str, "dtype": str, "warning": str, "status": str,
         "precision": str}


@dataclass(frozen=True)
class SweepItem:
    """One checkpoint of the series, in sweep order."""

    path: Path
    step: int
    folder: str  # its report subfolder in `out`

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class SweepEntry:
    """One audited (or reused) checkpoint: where its report is and its headline numbers."""

    item: SweepItem
    reused: bool
    matrices: int
    mean_alpha: float
    total_traps: int | None
    failing: tuple[str, ...]  # names of the matrices matching a condition


@dataclass(frozen=True)
class SweepResult:
    out: Path
    entries: tuple[SweepEntry, ...]
    trend: pd.DataFrame  # TREND_COLUMNS, one row per matrix per checkpoint, sweep order
    first_hits: pd.DataFrame  # condition, name, layer, module, step, checkpoint, value
    conditions: tuple[Condition, ...]
    fail_on: bool  # the conditions were given (--fail-on), not the default ones
    options: AuditOptions
    paths: tuple[Path, ...] = field(default=())

    @property
    def failed(self) -> bool:
        """--fail-on was given and a condition holds in some checkpoint."""
        return self.fail_on and len(self.first_hits) > 0


def step_of(name: str, regex: str = DEFAULT_STEP_REGEX, flag: str = "--step-regex") -> int | None:
    """The step in a checkpoint's name: the first group of `regex` (or its whole match), or
    None without a match. A match that is not a number is a UsageError."""
    m = compile_filter(regex, flag).search(name)
    if m is None:
        return None
    text = m.group(1) if m.groups() else m.group(0)
    if text is None or not text.isdigit():
        raise UsageError(f"{flag} '{clip(regex)}' matched {clip(text)!r} in {clip(name)!r}, "
                         "not a number; its first group must capture only the step's digits")
    return int(text)


def order_items(paths: Sequence[Path], order: str = "step",
                step_regex: str | None = None,
                mtime: Callable[[Path], int] | None = None) -> list[SweepItem]:
    """Checkpoints in sweep order with their steps and unique report subfolders.

    `step`: by the step parsed from each name (`step_regex`, default DEFAULT_STEP_REGEX); a
    name without one, or two checkpoints of one step, is a UsageError. `name`, `mtime`: by
    name or modification time; the step is the parsed one when every name has one, else the
    position (0, 1, ...)."""
    if order not in ORDERS:
        raise UsageError(f"--order must be one of {', '.join(ORDERS)}, got {clip(order)!r}")
    regex = step_regex or DEFAULT_STEP_REGEX
    steps = {p: step_of(p.name, regex) for p in paths}
    if order == "step":
        _check_steps(steps, step_regex)
        ordered = sorted(paths, key=lambda p: (steps[p], p.name))
    else:
        key = (lambda p: (p.name, str(p))) if order == "name" else \
            (lambda p: ((mtime or checkpoint_mtime)(p), p.name))
        ordered = sorted(paths, key=key)
        if any(s is None for s in steps.values()):
            steps = {p: i for i, p in enumerate(ordered)}
    return [SweepItem(p, int(steps[p]), f) for p, f in zip(ordered, _folders(ordered),
                                                            strict=True)]


def _check_steps(steps: dict[Path, int | None], step_regex: str | None) -> None:
    how = (f"--step-regex '{clip(step_regex)}'" if step_regex else
           "the default step pattern (checkpoint-N, step_N, global_stepN, ckpt-N, iter_N)")
    for p, s in steps.items():
        if s is None:
            raise UsageError(f"{p}: no step in the name {clip(p.name)!r} by {how}; give "
                             "--step-regex with one group capturing the step, or --order name "
                             "or --order mtime")
    seen: dict[int, Path] = {}
    for p, s in steps.items():
        if s in seen:
            raise UsageError(f"{seen[s]} and {p} both have step {s}; sweep each run "
                             "separately, or give --order name or --order mtime")
        seen[s] = p


def _folders(paths: Sequence[Path]) -> list[str]:
    """Report subfolder names: the checkpoint's name without a checkpoint suffix, reduced to
    [A-Za-z0-9._-] (names come from the file system), made unique."""
    out, used = [], set()
    for p in paths:
        stem = p.name[:-len(p.suffix)] if p.suffix in CHECKPOINT_SUFFIXES else p.name
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem)
        safe = safe.strip(".")[:100] or "checkpoint"
        name, k = safe, 2
        while name in used:
            name, k = f"{safe}-{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def checkpoint_mtime(path: Path) -> int:
    """A checkpoint's modification time: a folder's newest file (or itself) in ns."""
    times = [path.stat().st_mtime_ns]
    if path.is_dir():
        times += [c.stat().st_mtime_ns for c in path.iterdir() if c.is_file()]
    return max(times)


def find_checkpoints(inputs: Iterable[str | Path], step_regex: str | None = None,
                     out: Path | None = None) -> list[Path]:
    """Checkpoints named by the inputs: a glob's matches; a folder's children whose names carry
    a step (a run folder: checkpoint-N/ folders, step_N.safetensors files), or the folder
    itself when none does; a file. Paths under `out` are left out (earlier sweep reports)."""
    regex = step_regex or DEFAULT_STEP_REGEX
    found: dict[Path, Path] = {}
    for raw in inputs:
        text = str(raw)
        p = Path(text)
        if not p.exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text))
            if not matches:
                where = "" if p.is_absolute() else f" (relative to {os.getcwd()})"
                raise SourceError(f"{clip(text)!r}: the pattern matches no file or folder"
                                  f"{where}; check it, or quote it so the shell does not "
                                  "expand it")
            paths = [Path(m) for m in matches]
        elif p.is_dir():
            paths = _run_children(p, regex) or [p]
        elif p.exists():
            paths = [p]
        else:
            raise SourceError(f"{clip(text)}: no such file or folder (sweep takes local "
                              "checkpoints: folders, files or glob patterns)")
        for c in paths:
            if out is None or not _inside(c, out):
                found.setdefault(c.resolve(), c)
    if not found:
        raise SourceError("no checkpoint to sweep: every input is inside --out")
    return list(found.values())


def _run_children(folder: Path, regex: str) -> list[Path]:
    kids = sorted(folder.iterdir())
    return [c for c in kids if (c.is_dir() or c.suffix in CHECKPOINT_SUFFIXES)
            and step_of(c.name, regex) is not None]


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or p.is_relative_to(f)


def sweep(inputs: Iterable[str | Path], out: str | Path, *, order: str = "step",
          step_regex: str | None = None, fail_on: str | None = None,
          formats: tuple[str, ...] = ("md", "html", "csv", "json"),
          allow_pickle: bool = False, progress=None,
          on_checkpoint: Callable[[SweepEntry, int, int], None] | None = None,
          options: AuditOptions | None = None, **option_fields) -> SweepResult:
    """Audit every checkpoint of `inputs` into `out/<checkpoint>/` and write the trend.

    `progress` observes each checkpoint's audit (as `audit()`'s); `on_checkpoint(entry, i, n)`
    is called after each checkpoint. A checkpoint audited before into the same subfolder with
    the same options and bytes is reused; an interrupted one resumes from its journal."""
    from . import executors
    from .report.trend import write_trend

    opts = resolve_options(options, option_fields)
    opts.torch_device()  # a bad --device fails before anything is read
    conditions = parse_fail_on(fail_on or DEFAULT_CONDITIONS)
    out = Path(out)
    paths = find_checkpoints(inputs, step_regex, out)
    for p in paths:
        if p.is_dir() and _inside(out, p):
            raise UsageError(f"--out {out} is inside the checkpoint {p}; writing there would "
                             "change the input; choose another folder")
    items = order_items(paths, order, step_regex)
    args = (out, opts, conditions, formats, allow_pickle)
    if executors.parse_executor(opts.executor).kind == "processes" and len(items) > 1:
        entries = _audit_in_processes(items, args, on_checkpoint)
    else:
        entries = []
        with executors.session(opts):  # a Ray cluster is started once for the whole sweep
            for i, item in enumerate(items, 1):
                entries.append(_audit_one(item, *args, progress))
                if on_checkpoint is not None:
                    on_checkpoint(entries[-1], i, len(items))
    trend = trend_table([(e.item, read_layers(out / e.item.folder)) for e in entries])
    result = SweepResult(out, tuple(entries), trend, first_hits(trend, conditions),
                         conditions, fail_on is not None, opts)
    return dataclasses.replace(result, paths=tuple(write_trend(result, formats)))


def _audit_in_processes(items: list[SweepItem], args: tuple,
                        on_checkpoint: Callable | None) -> list[SweepEntry]:
    """``--executor processes[:N]`` for a sweep: whole checkpoints on N workers, largest first,
    each audited serially by its worker (`executors.map_in_processes`; a checkpoint whose
    worker died is audited again, resuming its journal). Per-matrix progress is not shown."""
    import functools

    from . import executors

    out, opts, *rest = args
    n = min(executors.parse_executor(opts.executor).workers or os.cpu_count() or 1, len(items))
    inner = dataclasses.replace(opts, executor="serial")
    one = functools.partial(_audit_item, out=out, opts=inner, rest=tuple(rest))
    done: dict[SweepItem, SweepEntry] = {}
    try:
        for item, entry in executors.map_in_processes(one, items, n,
                                                      lambda it: _nbytes(it.path)):
            done[item] = entry
            if on_checkpoint is not None:
                on_checkpoint(entry, len(done), len(items))
    except AuditError as e:
        raise AuditError(f"sweep: {e}; run the sweep again (it resumes) or use --executor "
                         "serial") from e
    return [done[it] for it in items]


def _audit_item(item: SweepItem, *, out: Path, opts: AuditOptions, rest: tuple) -> SweepEntry:
    return _audit_one(item, out, opts, *rest, None)


def _nbytes(path: Path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def _audit_one(item: SweepItem, out: Path, opts: AuditOptions,
               conditions: tuple[Condition, ...], formats: tuple[str, ...],
               allow_pickle: bool, progress) -> SweepEntry:
    """Audit one checkpoint into out/<folder> (resuming its journal), or reuse its report."""
    from .journal import discard_journal
    from .jsonio import dumps
    from .pipeline import audit
    from .report.writers import atomic_write
    from .spectra import MAX_SPECTRA

    folder = out / item.folder
    key = checkpoint_key(item.path, opts, allow_pickle)
    wanted = tuple(dict.fromkeys((*formats, "csv")))  # the trend is read from layers.csv
    reused = _reusable(folder, key, wanted)
    if reused:
        log.info("%s: reusing the audit in %s (same options and bytes)", item.path, folder)
    else:
        result = audit(item.path, allow_pickle=allow_pickle, progress=progress,
                       workdir=folder, resume=True, options=opts,
                       max_spectra=MAX_SPECTRA if {"md", "html"} & set(wanted) else 0)
        result.write(folder, wanted)
        atomic_write(folder / KEY_FILE, dumps(
            {"key": key, "source": str(item.path), "formats": list(wanted)}, indent=1) + "\n")
        discard_journal(folder)
    details = read_layers(folder)
    ok = details[details["status"] == "ok"]
    alpha = ok["alpha"].dropna()
    return SweepEntry(item, reused, int(len(ok)),
                      float(alpha.mean()) if len(alpha) else float("nan"),
                      int(ok["rand_num_spikes"].sum()) if opts.randomize else None,
                      tuple(dict.fromkeys(m.name for m in find_matches(details, conditions))))


def checkpoint_key(path: Path, opts: AuditOptions, allow_pickle: bool = False) -> str:
    """What decides a checkpoint's audit: the journal keys of its jobs (options, code version,
    each tensor's file, size, modification time, inode and byte range) after the filters."""
    from .hub import resolve_source
    from .journal import job_key
    from .pipeline import plan

    ckpt = resolve_source(path, opts, allow_pickle=allow_pickle)
    jobs, skipped = plan(ckpt, opts)
    ident = {"jobs": [job_key(j, opts) for j in jobs], "skipped": [s.name for s in skipped]}
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def _reusable(folder: Path, key: str, formats: tuple[str, ...]) -> bool:
    try:
        saved = json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
        same = saved["key"] == key and set(formats) <= set(saved["formats"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return same and (folder / "layers.csv").is_file()


def read_layers(folder: Path) -> pd.DataFrame:
    """A checkpoint's layers.csv as written by the audit (names stay text)."""
    from .errors import FormatError

    path = folder / "layers.csv"
    try:
        table = pd.read_csv(path, dtype=_TEXT, keep_default_na=False, na_values=[""])
    except (ValueError, pd.errors.ParserError) as e:
        raise FormatError(f"{path}: cannot read as CSV ({clip(e)}); delete {folder} to "
                          "audit this checkpoint again") from e
    for c in _TEXT:
        if c in table.columns:
            table[c] = table[c].fillna("")
    for c in ("layer", "expert"):
        table[c] = table[c].astype("Int64")
    return table


def trend_table(tables: Sequence[tuple[SweepItem, pd.DataFrame]]) -> pd.DataFrame:
    """The long table: step, checkpoint, then every layers.csv column, in sweep order."""
    parts = []
    for item, df in tables:
        df = df.reindex(columns=list(COLUMNS)).copy()
        df.insert(0, "checkpoint", item.name)
        df.insert(0, "step", item.step)
        parts.append(df)
    if not parts:
        return pd.DataFrame(columns=list(TREND_COLUMNS))
    return pd.concat(parts, ignore_index=True)


def first_hits(trend: pd.DataFrame, conditions: tuple[Condition, ...]) -> pd.DataFrame:
    """Per condition and matrix, the first checkpoint (sweep order) at which it holds."""
    cols = ["condition", "name", "layer", "module", "step", "checkpoint", "value"]
    rows = []
    for cond in conditions:
        hits = trend[cond.mask(trend)]
        first = hits.drop_duplicates("name", keep="first")
        for r in first.itertuples(index=False):
            rows.append((str(cond), r.name, r.layer, r.module, int(r.step), r.checkpoint,
                         float(getattr(r, cond.column))))
    df = pd.DataFrame(rows, columns=cols)
    df["layer"] = df["layer"].astype("Int64")
    return df
