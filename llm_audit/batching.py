"""How jobs are batched and seeded, and the executor seam of the pipeline.

Decides what changes results, in one place: which jobs form a stack (`stack_key`: the experts
of one tensor, whatever the storage), what seeds a matrix's shuffle (`shuffle_key`), the
order jobs are analysed in (`grouped`), and how big a batch or the read-ahead may be.
`analyse_jobs(jobs, opts)` is the serial executor: it yields (job index, rows) pairs; the
pipeline puts them back in order, so another executor can stand behind the same seam.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator

import torch

from . import streaming
from .analysis import MatrixMeta, analyse_stack
from .decode import DecodedMatrix
from .errors import AuditError
from .options import AuditOptions
from .prefetch import DecodedJob, prefetch
from .records import MatrixResult
from .routing import MatrixJob

log = logging.getLogger(__name__)
BATCH_BYTES = {"cpu": 256 << 20, "cuda": 4 << 30}
# decoded jobs waiting for the analysis (float32 bytes; one job always): enough to hide reading
# and decoding behind compute, small enough that peak memory does not grow with the model
PREFETCH_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}
_EXPERT_INDEX = re.compile(r"experts\.\d+\.")
_EXPERT_SUFFIX = re.compile(r"\[\d+\]$")


def analyse_jobs(jobs: list[MatrixJob], opts: AuditOptions, device: torch.device | None = None,
                 workers: int = 1) -> Iterator[tuple[int, tuple[MatrixResult, ...]]]:
    """(index into `jobs`, its result rows) for every job, in the order they finish: decoded
    ahead in a background thread, experts of one tensor (or of one per-expert tensor
    pattern) moved next to each other and analysed in batches of up to BATCH_BYTES of
    float32 matrices. The executor seam: another one (processes, a cluster) yields the same
    pairs; results do not depend on which (shuffles are seeded per matrix or stack). Dense
    matrices too large to decode whole are analysed first, in row chunks (streaming.py).
    `workers` > 1: that many batches are analysed at once in threads (`in_threads`)."""
    device = opts.torch_device() if device is None else device
    streamed = [streaming.streams(j) for j in jobs]
    for i in (i for i, st in enumerate(streamed) if st):  # never decoded whole
        yield i, (streaming.analyse_job(jobs[i], opts, device),)
    whole = [i for i, st in enumerate(streamed) if not st]
    # order[p]: the index of the p-th job decoded
    order = [whole[k] for k in grouped([jobs[i] for i in whole])]
    limit = BATCH_BYTES.get(device.type, BATCH_BYTES["cpu"]) // max(workers, 1)
    ahead = PREFETCH_BYTES.get(device.type, PREFETCH_BYTES["cpu"])
    with prefetch([jobs[i] for i in order], device, ahead) as decoded:
        batches = _batches(decoded, order, limit)
        if workers <= 1:
            for idx, batch in batches:
                yield from zip(idx, _analyse_batch(batch, opts), strict=True)
        else:
            yield from in_threads(batches, opts, workers)


def _batches(decoded: Iterator[DecodedJob], order: list[int], limit: int
             ) -> Iterator[tuple[list[int], list[DecodedJob]]]:
    """(job indices, decoded jobs) of each batch: consecutive jobs of one stack key, at most
    `limit` bytes (one job always); a job without a key is a batch of its own."""
    batch: list[DecodedJob] = []
    idx: list[int] = []
    for p, d in enumerate(decoded):
        key = stack_key(d.job)
        if batch and (key is None or key != stack_key(batch[0].job)
                      or _nbytes(batch) + _nbytes([d]) > limit):
            yield idx, batch
            batch, idx = [], []
        batch.append(d)
        idx.append(order[p])
    if batch:
        yield idx, batch


def in_threads(batches: Iterator[tuple[list[int], list[DecodedJob]]], opts: AuditOptions,
               workers: int) -> Iterator[tuple[int, tuple[MatrixResult, ...]]]:
    """The batches analysed `workers` at a time in threads, each with cores/workers of torch's
    intra-op threads (restored after), yielding (job index, rows) as batches finish.

    Why threads: on CPU much of a matrix's analysis does not scale with torch's threads (the
    eigensolver's tridiagonalisation, the shuffle's randperm, the anatomy's numpy passes), so
    two matrices on one thread each finish sooner than one after the other on two (1.3-1.5x
    at 2880², two cores: benchmarks/RESULTS.md); torch and numpy release the GIL in all of
    them. At most `workers` batches are in flight (their share of BATCH_BYTES each): memory as
    the serial path's."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    flying: dict = {}

    def finished(block: bool):
        done = (wait(flying, return_when=FIRST_COMPLETED).done if block
                else [f for f in flying if f.done()])
        for f in done:
            yield from zip(flying.pop(f), f.result(), strict=True)

    fixed_mmap_threshold()
    with intra_op_threads(max(1, cores() // workers)):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="llm-audit")
        try:
            for idx, batch in batches:
                while len(flying) >= workers:
                    yield from finished(block=True)
                flying[pool.submit(lambda b=batch: list(_analyse_batch(b, opts)))] = idx
                yield from finished(block=False)
            while flying:
                yield from finished(block=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


MMAP_THRESHOLD = 1 << 20  # bytes: larger blocks are mmapped, and returned to the OS when freed


def fixed_mmap_threshold() -> None:
    """glibc's malloc: blocks of MMAP_THRESHOLD bytes or more always come from mmap. By
    default the threshold grows with each freed large block (up to 32 MB), after which
    matrices come from per-thread heaps that fragment: with two analysis threads, the CLI's
    peak RSS grew 596 -> 722 MB from 2 to 8 layers of the issue-13 checkpoint, and with this
    531 -> 572 MB (benchmarks/memory_streaming.py). Process-wide and not undone (glibc has no
    getter): it only makes freed matrices go back to the OS. Without glibc nothing is done."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n for the block (process-wide), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def grouped(jobs: list[MatrixJob]) -> list[int]:
    """The indices of `jobs` with each stack key moved up to the first of them (Mixtral
    stores expert 0's w1, w2, w3, then expert 1's, ...); everything else keeps its order."""
    first: dict[str, int] = {}
    pos = [i if (k := stack_key(j)) is None else first.setdefault(k, i)
           for i, j in enumerate(jobs)]
    return sorted(range(len(jobs)), key=lambda i: (pos[i], i))


def stack_key(job: MatrixJob) -> str | None:
    """Jobs with the same key are experts of one tensor (or one per-expert tensor pattern):
    equal-shaped, batched together and shuffled with one shared permutation."""
    if job.expert is None:
        return None
    # the logical name (row names drop MXFP4's `_blocks`), not the stored tensor or scheme: an
    # MXFP4 checkpoint and its BF16 copy shuffle each expert with the same permutation
    return _EXPERT_INDEX.sub("experts.*.", _EXPERT_SUFFIX.sub("", job.name))


def shuffle_key(m: DecodedMatrix) -> str:
    """What seeds a matrix's shuffle: its stack (tensor + module) for experts, else its name."""
    key = stack_key(m.job)
    return m.name if key is None else f"{key}/{m.module}"


def _nbytes(batch: list[DecodedJob]) -> int:
    return sum(m.W.numel() * m.W.element_size() for d in batch for m in d.matrices)


def _analyse_batch(batch: list[DecodedJob],
                   opts: AuditOptions) -> Iterator[tuple[MatrixResult, ...]]:
    """Analyse a batch of decoded jobs; matrix p of every job (gate, up, ...) forms a stack."""
    rows: dict[int, list[MatrixResult]] = {i: [] for i in range(len(batch))}
    ok = [i for i, d in enumerate(batch) if d.error is None]
    for i, d in enumerate(batch):
        if d.error is not None:
            rows[i].append(failed_job(d.job, d.error))
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i in ok:
        for p, m in enumerate(batch[i].matrices):
            groups.setdefault((p, tuple(m.W.shape)), []).append((i, p))
    for members in groups.values():
        for (i, _), res in zip(members, _analyse_group(batch, members, opts), strict=True):
            rows[i].append(res)
    for i, d in enumerate(batch):  # groups come in matrix order p, so rows[i] is in order
        share = max(len(rows[i]), 1)
        yield tuple(dataclasses.replace(r, read_seconds=d.read_seconds / share,
                                               decode_seconds=d.decode_seconds / share,
                                               wait_seconds=d.wait_seconds / share)
                           for r in rows[i])


def _analyse_group(batch: list[DecodedJob], members: list[tuple[int, int]],
                   opts: AuditOptions) -> list[MatrixResult]:
    mats = [batch[i].matrices[p] for i, p in members]
    metas = [MatrixMeta(m.name, m.job.layer, m.module, m.expert, _dtype(m.job), m.job.hf_module)
             for m in mats]
    key = shuffle_key(mats[0])
    W = mats[0].W[None] if len(mats) == 1 else torch.stack([m.W for m in mats])
    results = analyse_stack(W, metas, opts, key=key)
    return [dataclasses.replace(r, nan_scales=m.nan_scales) if m.nan_scales else r
            for r, m in zip(results, mats, strict=True)]


def _dtype(job: MatrixJob) -> str:
    return job.parts[0].dtype if job.scheme in ("dense", "gguf") else job.scheme


def failed_job(job: MatrixJob, error: AuditError) -> MatrixResult:
    """The row of a job whose bytes could not be decoded."""
    shape = job.matrix_shape
    log.warning("%s: %s", job.name, error)
    return MatrixResult(name=job.name, layer=job.layer, module=job.module, expert=job.expert,
                        N=max(shape), M=min(shape), dtype=_dtype(job), hf_module=job.hf_module,
                        warning=f"failed: {error}", status="failed")
