"""The pipeline: source -> decode -> spectral/detect -> result table. ``audit()`` is the API."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import __version__
from .analysis import MatrixMeta, analyse_matrix
from .decode import TensorReader, decode
from .errors import AuditError
from .hub import resolve_source
from .moe import plan_checkpoint
from .options import AuditOptions
from .records import COLUMNS, MatrixResult
from .routing import MatrixJob, Skipped
from .source import Checkpoint

log = logging.getLogger(__name__)
SKIPPED_COLUMNS = ("name", "dtype", "shape", "reason")


@dataclass(frozen=True)
class AuditResult:
    """What an audit returns: `.details` has one row per matrix (the columns of layers.csv)."""

    model: str
    details: pd.DataFrame
    skipped: pd.DataFrame
    summary: dict

    def write(self, out: str | Path, formats: tuple[str, ...] | None = None) -> list[Path]:
        from .report import FORMATS, write_reports

        return write_reports(Path(out), self.details, self.summary, self.skipped,
                             formats or FORMATS)


def audit(source: str | Path, *, allow_pickle: bool = False,
          progress: Callable[[MatrixResult, int], None] | None = None,
          **options) -> AuditResult:
    """Audit a checkpoint (a .safetensors file or a model folder).

    Options are the fields of :class:`AuditOptions` (include, exclude, device, seed, randomize,
    trap_rule, fix_fingers). `progress(result, bytes_read)` is called after every matrix.
    """
    opts = AuditOptions(**options)
    t0 = time.perf_counter()
    ckpt = resolve_source(source, opts, allow_pickle=allow_pickle)
    jobs, skipped = plan(ckpt, opts)
    rows = list(iter_audit(jobs, opts, progress=progress))
    return assemble(ckpt, opts, rows, skipped, time.perf_counter() - t0)


def plan(ckpt: Checkpoint, opts: AuditOptions) -> tuple[list[MatrixJob], list[Skipped]]:
    """The matrix jobs of a checkpoint after --include/--exclude, and the skipped tensors."""
    jobs, skipped = plan_checkpoint(ckpt.tensors, ckpt.config_dict)
    jobs = [j for j in jobs if opts.wants(j.parts[0].name)]  # the stored tensor's name
    skipped = [s for s in skipped if opts.wants(s.name)]
    return jobs, skipped


def iter_audit(jobs: list[MatrixJob], opts: AuditOptions,
               progress: Callable[[MatrixResult, int], None] | None = None
               ) -> Iterator[MatrixResult]:
    """Decode and analyse each job in turn; one bad matrix never stops the others."""
    device = opts.torch_device()
    with TensorReader() as reader:
        for job in jobs:
            for res in _run_job(job, reader, device, opts):
                if progress is not None:
                    progress(res, job.nbytes)
                yield res


def _run_job(job: MatrixJob, reader: TensorReader, device: torch.device,
             opts: AuditOptions) -> Iterator[MatrixResult]:
    dtype = job.parts[0].dtype if job.scheme == "dense" else job.scheme
    try:
        for m in decode(job, reader, device):
            meta = MatrixMeta(m.name, job.layer, m.module, m.expert, dtype)
            res = analyse_matrix(m.W, meta, opts)
            yield dataclasses.replace(res, nan_scales=m.nan_scales) if m.nan_scales else res
    except AuditError as e:  # this job's bytes could not be decoded: a failed row
        shape = job.parts[0].shape
        log.warning("%s: %s", job.name, e)
        yield MatrixResult(name=job.name, layer=job.layer, module=job.module, expert=job.expert,
                           N=max(shape[-2:]), M=min(shape[-2:]), dtype=dtype,
                           warning=f"failed: {e}", status="failed")


def assemble(ckpt: Checkpoint, opts: AuditOptions, rows: list[MatrixResult],
             skipped: list[Skipped], elapsed: float) -> AuditResult:
    details = pd.DataFrame([r.as_row() for r in rows], columns=list(COLUMNS))
    for col in ("layer", "expert"):
        details[col] = details[col].astype("Int64")
    skipped_df = pd.DataFrame([(s.name, s.dtype, s.shape, s.reason) for s in skipped],
                              columns=list(SKIPPED_COLUMNS))
    summary = summarise(ckpt, opts, details, skipped_df, elapsed)
    return AuditResult(ckpt.name, details, skipped_df, summary)


def summarise(ckpt: Checkpoint, opts: AuditOptions, details: pd.DataFrame,
              skipped: pd.DataFrame, elapsed: float) -> dict:
    ok = details[details["status"] == "ok"]
    alpha = ok["alpha"].dropna()
    return {
        "model": ckpt.name,
        "source": str(ckpt.root),
        "revision": ckpt.revision,
        "matrices_analysed": int(len(ok)),
        "matrices_failed": int((details["status"] != "ok").sum()),
        "tensors_skipped": int(len(skipped)),
        "mean_alpha": float(alpha.mean()) if len(alpha) else math.nan,
        "median_alpha": float(alpha.median()) if len(alpha) else math.nan,
        "num_over_trained": int((ok["warning"] == "over-trained").sum()),
        "num_under_trained": int((ok["warning"] == "under-trained").sum()),
        "total_traps": int(ok["rand_num_spikes"].sum()) if opts.randomize else None,
        "matrices_with_traps": int((ok["rand_num_spikes"] > 0).sum()) if opts.randomize else None,
        "bytes": ckpt.total_bytes,
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
        "versions": {"llm_audit": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "elapsed_seconds": elapsed,
    }
