"""One matrix in, one result row out: spectral metrics + correlation traps + verdict.

Shared by the checkpoint audit and the in-memory training monitor. Never raises for a bad
matrix: the row comes back with status 'failed' and the reason in `warning`.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass

import torch

from . import detect, spectral
from .errors import SpectralError
from .mp import mp_fit
from .options import AuditOptions
from .records import MatrixResult

log = logging.getLogger(__name__)
MIN_EVALS = 8  # smaller matrices (e.g. BERT's 2-row token_type_embeddings) say nothing; WW skips


@dataclass(frozen=True)
class MatrixMeta:
    name: str
    layer: int | None
    module: str
    expert: int | None
    dtype: str


def matrix_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, matrix name): results do not depend on audit order."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def analyse_matrix(W: torch.Tensor, meta: MatrixMeta, opts: AuditOptions) -> MatrixResult:
    """Analyse one (rows, cols) float matrix on its own device."""
    t0 = time.perf_counter()
    N, M = max(W.shape), min(W.shape)
    base = dict(name=meta.name, layer=meta.layer, module=meta.module, expert=meta.expert,
                N=N, M=M, dtype=meta.dtype)
    try:
        _check_analysable(W)
        fields = _metrics(W, N, M, meta, opts)
    except SpectralError as e:
        return MatrixResult(**base, warning=f"failed: {e}", status="failed",
                            seconds=time.perf_counter() - t0)
    except (RuntimeError, torch.linalg.LinAlgError) as e:  # e.g. eigensolver did not converge
        log.warning("matrix %s failed: %s", meta.name, e)
        return MatrixResult(**base, warning=f"failed: {type(e).__name__}: {e}"[:300],
                            status="failed", seconds=time.perf_counter() - t0)
    return MatrixResult(**base, **fields, seconds=time.perf_counter() - t0)


def _check_analysable(W: torch.Tensor) -> None:
    if min(W.shape) < MIN_EVALS:
        raise SpectralError(f"only {min(W.shape)} eigenvalues (shape {list(W.shape)}); a spectral "
                            f"analysis needs at least {MIN_EVALS}")
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        n_nan, n_inf = int(torch.isnan(W).sum()), int(torch.isinf(W).sum())
        raise SpectralError(f"non-finite entries ({n_nan} NaN, {n_inf} Inf)")
    if not bool((W != 0).any()):
        raise SpectralError("all entries are zero")


def _metrics(W: torch.Tensor, N: int, M: int, meta: MatrixMeta, opts: AuditOptions) -> dict:
    evals = spectral.esd(W)
    fit = spectral.fit_power_law(evals, fix_fingers=opts.fix_fingers)
    norms = spectral.spectral_norms(evals)
    mp = mp_fit(evals, N, M)
    out = dict(
        alpha=fit.alpha, xmin=fit.xmin, D=fit.D, sigma=fit.sigma,
        num_pl_spikes=fit.num_pl_spikes, num_fingers=fit.num_fingers, raw_alpha=fit.raw_alpha,
        alpha_weighted=spectral.alpha_weighted(fit.alpha, norms.lambda_max),
        lambda_max=norms.lambda_max, log_norm=norms.log_norm,
        log_spectral_norm=norms.log_spectral_norm, stable_rank=norms.stable_rank,
        entropy=norms.entropy, matrix_rank=norms.rank,
        num_spikes=mp.num_spikes, sigma_mp=mp.sigma_mp, bulk_max=mp.bulk_max,
    )
    out.update(_confounds(W))
    if opts.randomize:
        gen = matrix_generator(opts.seed, meta.name, W.device)
        traps = detect.correlation_traps(W, evals, rule=opts.trap_rule, generator=gen)
        out.update(rand_num_spikes=traps.num_traps, max_rand_eval=traps.max_rand_eval,
                   rand_bulk_max=traps.bulk_max, rand_sigma_mp=traps.sigma_mp,
                   rand_distance=traps.distance, trap_threshold=traps.threshold)
    out["warning"] = detect.warning_for(fit)
    out["status"] = "ok" if fit.ok else "failed"  # the norms are still reported
    return out


def _confounds(W: torch.Tensor) -> dict:
    """Entry statistics that can fake a trap: a non-zero mean, a single huge entry."""
    n = W.numel()
    mean, var = spectral.entry_moments(W)
    std = math.sqrt(var * n / max(n - 1, 1))  # unbiased, as torch.std
    return dict(entry_mean=mean, entry_std=std, mean_spike=mean * mean * n,
                max_abs_w_over_std=float(W.abs().max()) / std if std > 0 else math.inf)
