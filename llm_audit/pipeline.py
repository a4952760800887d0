"""The pipeline: source -> decode -> spectral/detect -> result table. ``audit()`` is the API."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import streaming
from .batching import shuffle_key
from .decode import TensorReader, decode
from .errors import AuditError, UsageError
from .executors import executor_for
from .hub import resolve_source
from .journal import Journal, job_key
from .options import AuditOptions, resolve_options
from .plan import plan_checkpoint
from .progress import AuditStarted, JobDone, Observer
from .records import COLUMNS, TRAP_COLUMNS, MatrixResult, trap_table_rows
from .routing import MatrixJob, Skipped
from .source import Checkpoint
from .spectra import MAX_SPECTRA, Spectra, compute_spectra, suspicious
from .summary import AuditSummary, summarise

log = logging.getLogger(__name__)
SKIPPED_COLUMNS = ("name", "dtype", "shape", "reason")


@dataclass(frozen=True)
class AuditResult:
    """What an audit returns: `.details` has one row per matrix (the columns of layers.csv)."""

    model: str
    details: pd.DataFrame
    skipped: pd.DataFrame
    summary: AuditSummary
    spectra: tuple[Spectra, ...] = ()  # eigenvalues of the most suspicious matrices (figures)
    traps: pd.DataFrame | None = None  # one row per trap: the columns of traps.csv

    def write(self, out: str | Path, formats: tuple[str, ...] | None = None) -> list[Path]:
        from .report import FORMATS, write_reports

        return write_reports(Path(out), self.details, self.summary, self.skipped,
                             formats or FORMATS, spectra=self.spectra, traps=self.traps)


def audit(source: str | Path | torch.nn.Module | Mapping[str, torch.Tensor], *,
          allow_pickle: bool = False,
          progress: Observer | None = None, workdir: str | Path | None = None,
          resume: bool = False, max_spectra: int = MAX_SPECTRA,
          options: AuditOptions | None = None, **option_fields) -> AuditResult:
    """Audit a checkpoint (a .safetensors file or a model folder), or in-memory weights (a
    ``torch.nn.Module``, e.g. a transformers model, or a state dict: ``memory.py``).

    Options: an :class:`AuditOptions` as `options=`, and/or its fields as keywords (include,
    exclude, device, seed, randomize, trap_rule, fix_fingers, precision; keywords win).
    `progress(event)` gets an `AuditStarted` and then a `JobDone` per job. With `workdir`,
    results are appended durably to `workdir/.partial/rows.jsonl` as they are computed, and
    `resume=True` reuses the rows an interrupted run left there. `max_spectra` matrices (the
    most suspicious) keep their eigenvalues for the figures.
    """
    opts = resolve_options(options, option_fields)
    opts.torch_device()  # a bad --device fails here, before anything is read or downloaded
    if resume and workdir is None:
        raise UsageError("--resume needs the output folder of the interrupted audit")
    if isinstance(source, torch.nn.Module | Mapping):
        if workdir is not None:
            raise UsageError("workdir/resume: in-memory weights have no files to journal")
        from .memory import audit_weights

        return audit_weights(source, opts, progress=progress, max_spectra=max_spectra)
    t0 = time.perf_counter()
    ckpt = resolve_source(source, opts, allow_pickle=allow_pickle)
    jobs, skipped = plan(ckpt, opts)
    with contextlib.ExitStack() as stack:
        journal = stack.enter_context(Journal(workdir, resume)) if workdir is not None else None
        rows = list(iter_audit(jobs, opts, progress=progress, journal=journal, model=ckpt.name))
    result = assemble(ckpt, opts, rows, skipped, time.perf_counter() - t0)
    if max_spectra > 0:
        spectra = collect_spectra(jobs, result.details, opts, max_spectra, traps=result.traps)
        result = dataclasses.replace(result, spectra=spectra)
    return result


def default_out(source: str | Path) -> Path:
    """The default report folder: reports/<model name> (as the source stage names models)."""
    p = Path(source)
    if p.is_dir():
        return Path("reports") / p.resolve().name
    return Path("reports") / (p.parent.name if p.stem == "model" and p.parent.name else p.stem)


def plan(ckpt: Checkpoint, opts: AuditOptions) -> tuple[list[MatrixJob], list[Skipped]]:
    """The matrix jobs of a checkpoint after --include/--exclude, and the skipped tensors."""
    if ckpt.format == "gguf":
        from .gguf_plan import plan_gguf

        jobs, skipped = plan_gguf(ckpt.tensors)
    else:
        jobs, skipped = plan_checkpoint(ckpt.tensors, ckpt.config_dict)
    jobs = [j for j in jobs if opts.wants(j.parts[0].name)]  # the stored tensor's name
    skipped = [s for s in skipped if opts.wants(s.name)]
    return jobs, skipped


def iter_audit(jobs: list[MatrixJob], opts: AuditOptions, progress: Observer | None = None,
               journal: Journal | None = None, model: str = "") -> Iterator[MatrixResult]:
    """Decode and analyse each job in turn; one bad matrix never stops the others.

    Jobs are decoded in a background thread while earlier ones are analysed; consecutive
    experts of one stored tensor are analysed as one batch. A job whose rows are in `journal`
    (a resumed audit) is not recomputed; every computed job is recorded there durably before
    its rows are yielded.
    """
    device = opts.torch_device()
    keys = [job_key(j, opts) for j in jobs] if journal is not None else [None] * len(jobs)
    cached = [journal.cached(k) if journal is not None else None for k in keys]
    if journal is not None and len(journal.done) > sum(c is not None for c in cached):
        log.warning("%d finished job(s) in the journal do not match this checkpoint's files "
                    "(another checkpoint, or it changed since): computed again",
                    len(journal.done) - sum(c is not None for c in cached))
    total = sum(j.nbytes for j in jobs)
    if progress is not None:
        progress(AuditStarted(model, len(jobs), total, sum(c is not None for c in cached)))
    todo = [i for i, c in enumerate(cached) if c is None]
    done_bytes = 0
    with contextlib.ExitStack() as stack:
        computed = stack.enter_context(contextlib.closing(
            executor_for(opts)([jobs[i] for i in todo], opts, device)))
        ready: dict[int, tuple[MatrixResult, ...]] = {}
        for i, (job, key, rows) in enumerate(zip(jobs, keys, cached, strict=True)):
            hit = rows is not None
            if not hit:
                while i not in ready:  # the executor groups experts: it may run ahead
                    got, got_rows = next(computed)
                    ready[todo[got]] = got_rows
                rows = ready.pop(i)
                if journal is not None:
                    journal.record(key, rows)
            done_bytes += job.nbytes
            if progress is not None:
                progress(JobDone(job.name, rows, i + 1, len(jobs), done_bytes, total, hit))
            yield from rows


def assemble(ckpt: Checkpoint, opts: AuditOptions, rows: list[MatrixResult],
             skipped: list[Skipped], elapsed: float) -> AuditResult:
    details = pd.DataFrame([r.as_row() for r in rows], columns=list(COLUMNS))
    for col in ("layer", "expert"):
        details[col] = details[col].astype("Int64")
    skipped_df = pd.DataFrame([(s.name, s.dtype, s.shape, s.reason) for s in skipped],
                              columns=list(SKIPPED_COLUMNS))
    traps = pd.DataFrame([t for r in rows for t in trap_table_rows(r, opts.trap_rule)],
                         columns=list(TRAP_COLUMNS))
    summary = summarise(ckpt, opts, details, skipped_df, elapsed)
    return AuditResult(ckpt.name, details, skipped_df, summary, traps=traps)


def collect_spectra(jobs: list[MatrixJob], details: pd.DataFrame, opts: AuditOptions,
                    limit: int = MAX_SPECTRA, traps: pd.DataFrame | None = None
                    ) -> tuple[Spectra, ...]:
    """Re-read the most suspicious matrices and compute their spectra for the figures."""
    wanted = dict(suspicious(details, limit))
    if not wanted:
        return ()
    rows = {r["name"]: r for _, r in details[details["name"].isin(list(wanted))].iterrows()}
    found: dict[str, Spectra] = {}
    device = opts.torch_device()
    with TensorReader() as reader:
        for job in jobs:
            if not any(n == job.name or n.startswith((job.name + "[", job.name + "."))
                       for n in wanted):
                continue
            try:
                if streaming.streams(job):  # never decoded whole
                    found[job.name] = streaming.spectra(job, rows[job.name], wanted[job.name],
                                                        opts, device, traps)
                    continue
                for m in decode(job, reader, device):
                    name = m.name
                    if name in wanted:
                        found[name] = compute_spectra(
                            m.W, rows[name], wanted[name], opts, shuffle_key=shuffle_key(m),
                            traps=None if traps is None else traps[traps["name"] == name])
            except (AuditError, RuntimeError) as e:
                log.warning("%s: no spectrum for the report: %s", job.name, e)
    return tuple(found[n] for n in wanted if n in found)
