"""Dense matrices too large to decode whole, analysed in row chunks (the 201088 × 2880 BF16
embedding and lm_head of gpt-oss: 1.16 GB stored, 2.3 GB as float32, 4.6 GB more for a
materialised shuffle). Peak memory: one chunk and two M × M Gram matrices.

Passes over the stored bytes (each reads the file again, through the page cache):

1. `histogram`: how often each bit pattern occurs. A 16- or 8-bit dtype has at most 65,536
   values, so the multiset of entries is a small table; min, max, mean, variance and the
   finite check come from it exactly.
2. the Gram matrix WᵀW accumulated over row chunks (each chunk's product in the precision
   policy's dtype, the sum in float64) → the ESD, fitted as `analysis` fits a decoded one.
3. per shuffle: a uniformly random permutation of the multiset, generated chunk by chunk
   (`shuffled_chunks`), its Gram accumulated → the shuffled ESD → the rule's count
   (`TrapRule.count_esd`).

Hand-written because no library draws a uniform permutation of a 579M-entry array in bounded
memory. The exact part — how many copies of each value land in each chunk — is numpy's
multivariate hypergeometric; the order inside a chunk is torch.randperm. A streamed matrix's
shuffle is therefore another random permutation than the decoded path's (same distribution):
its trap count is a different draw of the same statistic. Its traps are not classified (the
anatomy needs the matrix in memory): class ``unclassified`` in traps.csv.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import analysis, detect, spectral
from .anatomy import unclassified
from .decode import TORCH_DTYPES
from .errors import AuditError, SpectralError
from .options import AuditOptions
from .precision import name as precision_name
from .records import MatrixResult
from .routing import MatrixJob

log = logging.getLogger(__name__)
STREAM_NUMEL = 1 << 27  # dense matrices of at least this many entries (512 MiB as float32)
CHUNK_NUMEL = 1 << 23  # entries per row chunk (64 MiB as float64)
PATTERN_DTYPES = {2: (np.int16, torch.int16), 1: (np.uint8, torch.uint8)}  # bytes per entry


def streams(job: MatrixJob) -> bool:
    """Whether a job is analysed streamed: one dense 2-D tensor of a 16- or 8-bit float dtype,
    at least STREAM_NUMEL entries, stored taller than wide (row chunks hold whole rows)."""
    if job.scheme != "dense" or job.fused or job.transposed or len(job.parts) != 1:
        return False
    info = job.parts[0]
    dtype = TORCH_DTYPES.get(info.dtype)
    return (len(info.shape) == 2 and dtype is not None and dtype.is_floating_point
            and dtype.itemsize in PATTERN_DTYPES and info.shape[0] >= info.shape[1]
            and math.prod(info.shape) >= STREAM_NUMEL)


@dataclass(frozen=True)
class Multiset:
    """The entries of a matrix as distinct values and their counts (float64, int64)."""

    values: np.ndarray
    counts: np.ndarray

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def moments(self) -> tuple[float, float]:
        mean = float((self.values * self.counts).sum()) / self.n
        return mean, float((self.counts * (self.values - mean) ** 2).sum()) / self.n


class StreamedMatrix:
    """Row chunks of one stored tensor, decoded to float32 on `device` as they are read."""

    def __init__(self, job: MatrixJob, device: torch.device) -> None:
        self.info = info = job.parts[0]
        self.rows, self.cols = info.shape
        self.dtype = TORCH_DTYPES[info.dtype]
        self.device = device
        self.chunk_rows = max(1, CHUNK_NUMEL // self.cols)
        self.read_seconds = 0.0

    def raw_chunks(self) -> Iterator[torch.Tensor]:
        """The stored bytes, chunk by chunk, as (rows, cols) tensors of the stored dtype."""
        row_bytes = self.cols * self.dtype.itemsize
        with open(self.info.file, "rb") as f:
            for r0 in range(0, self.rows, self.chunk_rows):
                n = min(self.chunk_rows, self.rows - r0)
                t0 = time.perf_counter()
                f.seek(self.info.begin + r0 * row_bytes)
                buf = bytearray(n * row_bytes)
                if f.readinto(buf) != len(buf):
                    raise AuditError(f"{self.info.file}: tensor {self.info.name!r}: file "
                                     f"truncated at row {r0} of {self.rows}")
                self.read_seconds += time.perf_counter() - t0
                yield torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).view(n, self.cols)

    def chunks(self) -> Iterator[torch.Tensor]:
        for raw in self.raw_chunks():
            yield raw.to(self.device).to(torch.float32)

    def histogram(self) -> Multiset:
        """The multiset of entries, from a count of every bit pattern."""
        np_bits, torch_bits = PATTERN_DTYPES[self.dtype.itemsize]
        K = 1 << (8 * self.dtype.itemsize)
        counts = torch.zeros(K, dtype=torch.int64)
        for raw in self.raw_chunks():
            bits = raw.view(torch_bits).reshape(-1).to(torch.int64) & (K - 1)
            counts += torch.bincount(bits, minlength=K)
        patterns = np.arange(K, dtype=np.uint16 if K > 256 else np.uint8).view(np_bits)
        values = torch.from_numpy(patterns).view(self.dtype).double()
        keep = counts.numpy() > 0
        return Multiset(values.numpy()[keep], counts.numpy()[keep])


def check_analysable(ms: Multiset, dtype: torch.dtype) -> None:
    """`analysis._check_analysable` from the multiset (shape checked by the planner)."""
    bad = ~np.isfinite(ms.values)
    if bad.any():
        n_nan = int(ms.counts[np.isnan(ms.values)].sum())
        raise SpectralError(f"non-finite entries ({n_nan} NaN, "
                            f"{int(ms.counts[bad].sum()) - n_nan} Inf)")
    amax = float(np.abs(ms.values).max())
    if amax == 0:
        raise SpectralError("all entries are zero")
    if amax < torch.finfo(dtype).tiny:
        name = str(dtype).removeprefix("torch.")
        raise SpectralError(f"every entry is subnormal in {name} (max |w| = {amax:.3g} "
                            f"< {torch.finfo(dtype).tiny:.3g}): too few significant bits left")


def esd_of_chunks(chunks: Iterator[torch.Tensor], M: int, amax: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Ascending eigenvalues of Σ XᵀX over the chunks X (rows, M): each chunk's Gram in
    `dtype` (scaled by a power of two as `spectral.esd` does), the sum and eigvalsh in float64."""
    c = spectral.pow2_scale(torch.tensor([[amax]], dtype=torch.float64))  # (1, 1)
    G = None
    for X in chunks:
        if X.shape[0] >= X.shape[1]:
            g = spectral.gram(X, dtype=dtype, scale=c)  # lower triangle
        else:  # a short last chunk: still XᵀX (spectral.gram takes the smaller side)
            A = X.to(dtype) * c.to(X.device, dtype)
            g = A.T @ A
        G = g.to(torch.float64) if G is None else G.add_(g.to(torch.float64))
    lam = torch.linalg.eigvalsh(G).clamp_min_(0.0)
    return lam / float(c) ** 2


def shuffled_chunks(ms: Multiset, rows: int, cols: int, chunk_rows: int, seed: int,
                    device: torch.device, centre: float = 0.0) -> Iterator[torch.Tensor]:
    """A uniformly random arrangement of the multiset as a (rows, cols) matrix, yielded in
    row chunks of float32 (minus `centre`): chunk k draws its values without replacement from
    what earlier chunks left (multivariate hypergeometric), in a random order (randperm)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    left = ms.counts.copy()
    values = torch.from_numpy(ms.values - centre).to(torch.float32)
    idx = torch.arange(len(ms.values))
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        take = rng.multivariate_hypergeometric(left, n * cols, method="marginals")
        left -= take
        which = torch.repeat_interleave(idx, torch.from_numpy(take))
        chunk = values[which[torch.randperm(n * cols, generator=g)]]
        yield chunk.view(n, cols).to(device)


def analyse_job(job: MatrixJob, opts: AuditOptions, device: torch.device) -> MatrixResult:
    """One streamed matrix's row, or a failed row saying why (never raises)."""
    meta = analysis.MatrixMeta(job.name, job.layer, job.module, job.expert,
                               job.parts[0].dtype, job.hf_module)
    sm = StreamedMatrix(job, device)
    t0 = time.perf_counter()
    try:
        return _analyse(sm, meta, opts)
    except (AuditError, RuntimeError, ValueError) as e:
        log.warning("matrix %s failed: %s", job.name, e)
        log.debug("matrix %s failed", job.name, exc_info=True)
        return MatrixResult(**analysis.base_fields((sm.rows, sm.cols), meta),
                            warning=f"failed: {e}"[:300], status="failed",
                            seconds=time.perf_counter() - t0)


def _analyse(sm: StreamedMatrix, meta: analysis.MatrixMeta, opts: AuditOptions) -> MatrixResult:
    t0 = time.perf_counter()
    ms = sm.histogram()
    check_analysable(ms, torch.float32)
    amax = float(np.abs(ms.values).max())
    mean, var = ms.moments()
    first = opts.policy().first()
    evals = esd_of_chunks(sm.chunks(), sm.cols, amax, first)
    t_eig = time.perf_counter() - t0
    access = analysis.MatrixAccess(
        N=sm.rows, M=sm.cols,
        esd64=lambda: esd_of_chunks(sm.chunks(), sm.cols, amax, torch.float64),
        full_rank=lambda lmax: False,  # a float32 reading of rank deficiency is redone
        confounds=lambda: analysis.confounds(ms.n, mean, var, float(ms.values.min()),
                                             float(ms.values.max())))
    evals, fields = analysis.spectral_fields(access, evals, opts, meta.name)
    t_fit = time.perf_counter() - t0 - t_eig
    if opts.randomize:
        seed = int(torch.randint(2**62, (1,),
                                 generator=analysis.matrix_generator(opts.seed, meta.name)))
        fields.update(analysis.trap_fields(streamed_traps(sm, ms, evals, opts, seed,
                                                          (mean, var))))
    t_all = time.perf_counter() - t0
    fields.pop("entry_var")
    return MatrixResult(**analysis.base_fields((sm.rows, sm.cols), meta), **fields,
                        read_seconds=sm.read_seconds, eigen_seconds=t_eig, fit_seconds=t_fit,
                        trap_seconds=t_all - t_eig - t_fit, seconds=t_all)


def shuffled_esds(sm: StreamedMatrix, ms: Multiset, rule: str, seed: int,
                  dtype: torch.dtype, count: int | None = None) -> list[torch.Tensor]:
    """The first `count` (default: all) shuffled ESDs the rule counts in, the mean removed
    first if the rule removes it; shuffle k is drawn from seed + k."""
    from .rules import RULES

    r = RULES[rule]
    centre = ms.moments()[0] if r.removes_mean else 0.0
    amax = float(np.abs(ms.values - centre).max())
    return [esd_of_chunks(shuffled_chunks(ms, sm.rows, sm.cols, sm.chunk_rows, seed + k,
                                          sm.device, centre), sm.cols, amax, dtype)
            for k in range(r.shuffles(sm.cols) if count is None else count)]


def streamed_traps(sm: StreamedMatrix, ms: Multiset, evals: torch.Tensor, opts: AuditOptions,
                   seed: int, moments: tuple[float, float]) -> detect.TrapResult:
    """The rule's trap count from streamed shuffles; a float32 count within round-off of its
    threshold is redone in float64 (the same shuffles, drawn again from `seed`)."""
    from .rules import RULES

    rule, policy = RULES[opts.trap_rule], opts.policy()
    dtype = policy.first()
    esds = shuffled_esds(sm, ms, rule.name, seed, dtype)
    tr = rule.count_esd(esds, evals, sm.rows, sm.cols, moments, precision_name(dtype))
    pooled = torch.cat(esds)
    if policy.redo(dtype, detect.near(pooled, tr.threshold, detect.eig_err(pooled))):
        esds = shuffled_esds(sm, ms, rule.name, seed, torch.float64)
        tr = rule.count_esd(esds, evals, sm.rows, sm.cols, moments, "float64")
    return dataclasses.replace(tr, anatomy=unclassified(tr.trap_evals[:tr.num_traps]))


def spectra(job: MatrixJob, row, reason: str, opts: AuditOptions, device: torch.device,
            traps=None):
    """The report's `Spectra` of a streamed matrix: its ESD and the shuffled ESD its rule
    counted in (the same seeded shuffles), in the policy's first precision (a figure)."""
    from .spectra import spectra_record

    sm = StreamedMatrix(job, device)
    ms = sm.histogram()
    evals: tuple[float, ...] = ()
    rand: tuple[float, ...] = ()
    if np.isfinite(ms.values).all() and np.abs(ms.values).max() > 0:
        amax = float(np.abs(ms.values).max())
        dtype = opts.policy().first()
        evals = tuple(esd_of_chunks(sm.chunks(), sm.cols, amax, dtype).tolist())
        if opts.randomize:
            seed = int(torch.randint(2**62, (1,),
                                     generator=analysis.matrix_generator(opts.seed, job.name)))
            from .rules import RULES

            n = RULES[opts.trap_rule].figure_shuffles(sm.cols)
            esds = shuffled_esds(sm, ms, opts.trap_rule, seed, dtype, count=n)
            rand = tuple(sorted(torch.cat(esds).tolist()))
    sub = None if traps is None else traps[traps["name"] == job.name]
    return spectra_record(evals, rand, (sm.rows, sm.cols), row, reason, sub)
