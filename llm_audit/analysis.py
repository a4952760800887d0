"""Matrices in, result rows out: spectral metrics + correlation traps + verdict.

Shared by the checkpoint audit and the in-memory training monitor. `analyse_stack` takes B
equal-shaped matrices (the experts of one MoE tensor) and does the expensive parts batched: one
Gram product and eigensolve for the stack, one shuffle permutation, one batched sketch. Never
raises for a bad matrix: its row comes back with status 'failed' and the reason in `warning`.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import detect, spectral
from .errors import SpectralError
from .mp import mp_fit
from .options import AuditOptions
from .precision import name as precision_name
from .records import MatrixResult

log = logging.getLogger(__name__)
# precision='auto' accepts float32 when round-off cannot move α by more than
# max(ALPHA_TOL, ALPHA_TOL_SIGMAS·σ(α)), σ(α) being the fit's own standard error
ALPHA_TOL, ALPHA_TOL_SIGMAS = 0.01, 0.25
PERTURB_ULPS, PERTURB_TRIALS = 8, 2  # round-off probe when the bound alone cannot decide
MIN_EVALS = 8  # smaller matrices (e.g. BERT's 2-row token_type_embeddings) say nothing; WW skips


@dataclass(frozen=True)
class MatrixMeta:
    name: str
    layer: int | None
    module: str
    expert: int | None
    dtype: str
    hf_module: str = ""  # empty: the row's hf_module is `module`


@dataclass(frozen=True)
class MatrixAccess:
    """What the spectral fields need of a matrix besides its eigenvalues: a decoded tensor
    (`dense_access`) or one streamed in row chunks (streaming.py)."""

    N: int
    M: int
    esd64: Callable[[], torch.Tensor]  # the ESD in float64 (a float32 spectrum redone)
    full_rank: Callable[[float], bool]  # spectral.full_rank given λ_max
    confounds: Callable[[], dict]  # entry statistics (`_confounds`)


def dense_access(W: torch.Tensor) -> MatrixAccess:
    return MatrixAccess(N=max(W.shape), M=min(W.shape), esd64=lambda: spectral.esd(W),
                        full_rank=lambda lmax: spectral.full_rank(W, lmax),
                        confounds=lambda: _confounds(W))


def matrix_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, name): results do not depend on audit order, batch
    size or device (random numbers are drawn on the CPU and moved)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def analyse_matrix(W: torch.Tensor, meta: MatrixMeta, opts: AuditOptions) -> MatrixResult:
    """Analyse one (rows, cols) float matrix on its own device."""
    return analyse_stack(W[None], (meta,), opts, key=meta.name)[0]


def analyse_stack(W: torch.Tensor, metas: Sequence[MatrixMeta], opts: AuditOptions, *,
                  key: str) -> list[MatrixResult]:
    """Analyse B equal-shaped matrices W (B, rows, cols) on W's device.

    `key` names the stack (the stored tensor): it seeds the one shuffle permutation all its
    matrices share, so results do not depend on how a stack is cut into batches.
    """
    rows: list[MatrixResult | None] = [None] * len(metas)
    good = []
    for b, meta in enumerate(metas):
        try:
            _check_analysable(W[b])
            good.append(b)
        except SpectralError as e:
            rows[b] = _failed(W[b], meta, f"failed: {e}", 0.0)
    if good:
        Wg = W if len(good) == len(metas) else W[good]
        for b, row in zip(good, _analyse_checked(Wg, [metas[b] for b in good], opts, key),
                          strict=True):
            rows[b] = row
    return rows  # type: ignore[return-value]


def _analyse_checked(W: torch.Tensor, metas: list[MatrixMeta], opts: AuditOptions,
                     key: str) -> list[MatrixResult]:
    """Batched analysis; an eigensolver failure is retried matrix by matrix to isolate it."""
    try:
        return _analyse_batch(W, metas, opts, key)
    except Exception as e:  # noqa: BLE001 - one bad matrix must not sink the audit
        if len(metas) > 1:
            return [_analyse_checked(W[b:b + 1], [m], opts, key)[0] for b, m in enumerate(metas)]
        log.warning("matrix %s failed: %s", metas[0].name, e)
        log.debug("matrix %s failed", metas[0].name, exc_info=True)
        kind = type(e).__name__.lstrip("_")  # torch's LinAlgError is named _LinAlgError
        return [_failed(W[0], metas[0], f"failed: {kind}: {e}"[:300], math.nan)]


def _analyse_batch(W: torch.Tensor, metas: list[MatrixMeta], opts: AuditOptions,
                   key: str) -> list[MatrixResult]:
    B, clock = len(metas), _Clock(W.device)
    dtype = opts.policy().first()
    try:
        evals = spectral.esd(W, dtype=dtype)  # (B, M), float64
    except torch.linalg.LinAlgError:  # float32 eigensolver did not converge: float64 decides
        if not opts.policy().redo(dtype, True):
            raise
        evals = spectral.esd(W)
    t_eig = clock.lap()
    fields = []
    for b in range(B):
        ev, out = spectral_fields(dense_access(W[b]), evals[b], opts, metas[b].name)
        evals[b] = ev
        fields.append(out)
    t_fit = clock.lap()
    if opts.randomize:
        _add_traps(W, evals, metas, fields, opts, key)
    t_trap = clock.lap()
    cost = dict(eigen_seconds=t_eig / B, fit_seconds=t_fit / B, trap_seconds=t_trap / B,
                seconds=(t_eig + t_fit + t_trap) / B)
    return [MatrixResult(**_base(W[b], m), **_without(fields[b], "entry_var"), **cost)
            for b, m in enumerate(metas)]


def _add_traps(W: torch.Tensor, evals: torch.Tensor, metas: list[MatrixMeta],
               fields: list[dict], opts: AuditOptions, key: str) -> None:
    """Traps of a stack, each matrix in its own eigen precision: the members redone in float64
    form their own sub-stack (same shared permutation, drawn again from `key`), so a matrix's
    result does not depend on its stack-mates."""
    for prec in ("float32", "float64"):
        idx = [b for b, f in enumerate(fields) if f["precision"] == prec]
        if not idx:
            continue
        whole = len(idx) == len(fields)
        traps = detect.stack_traps(
            W if whole else W[idx], evals if whole else evals[idx], rule=opts.trap_rule,
            generator=matrix_generator(opts.seed, key),
            generators=[matrix_generator(opts.seed, metas[b].name) for b in idx],
            moments=[(fields[b]["entry_mean"], fields[b]["entry_var"]) for b in idx],
            dtype=getattr(torch, prec), policy=opts.policy(), anatomy=opts.anatomy)
        for b, tr in zip(idx, traps, strict=True):
            fields[b].update(trap_fields(tr))


def trap_fields(tr: detect.TrapResult) -> dict:
    """The result columns a trap count fills."""
    an = tr.anatomy
    return dict(rand_num_spikes=tr.num_traps, max_rand_eval=tr.max_rand_eval,
                rand_bulk_max=tr.bulk_max, rand_sigma_mp=tr.sigma_mp,
                rand_distance=tr.distance, trap_threshold=tr.threshold,
                traps_mean=an.count("mean"), traps_entries=an.count("entries"),
                traps_tail=an.count("tail"), trap_entries=an.trap_entries,
                trap_rows=an.trap_rows, trap_cols=an.trap_cols,
                traps=an.traps, outliers=an.outliers, trap_precision=tr.precision)


def spectral_fields(m: MatrixAccess, evals: torch.Tensor, opts: AuditOptions,
                    name: str) -> tuple[torch.Tensor, dict]:
    """Fit, norms, MP fit and confounds of one matrix from its eigenvalues. With precision
    'auto', a float32 spectrum whose xmin choice or spike count round-off could change is
    recomputed in float64 (returned along with the fields)."""
    N, M = m.N, m.M
    prec = opts.policy().first()
    round_off = spectral.FLOAT32_ROUND_OFF if prec == torch.float32 else 0.0
    fit = spectral.fit_power_law(evals, fix_fingers=opts.fix_fingers, round_off=round_off)
    mp = mp_fit(evals, N, M)
    full_rank = False  # float32 read rank-deficient, float64 Cholesky says full rank
    if opts.policy().redo(prec, True):  # auto, float32 spectrum: may float32 decide it?
        decided = _float32_decided(evals, fit, mp.threshold, opts, name)
        if decided and spectral.spectral_norms(evals).rank < evals.numel():
            # float32 cannot tell an eigenvalue below the rank threshold from round-off of
            # either sign; a float64 Cholesky decides full rank at a third of a redo's cost
            decided = full_rank = m.full_rank(float(evals.max()))
        if not decided:
            prec = torch.float64
            evals = m.esd64()
            fit = spectral.fit_power_law(evals, fix_fingers=opts.fix_fingers)
            mp = mp_fit(evals, N, M)
    norms = spectral.spectral_norms(evals, full_rank=full_rank)
    out = dict(
        alpha=fit.alpha, xmin=fit.xmin, D=fit.D, sigma=fit.sigma,
        num_pl_spikes=fit.num_pl_spikes, num_fingers=fit.num_fingers, raw_alpha=fit.raw_alpha,
        alpha_weighted=spectral.alpha_weighted(fit.alpha, norms.lambda_max),
        lambda_max=norms.lambda_max, log_norm=norms.log_norm,
        log_spectral_norm=norms.log_spectral_norm, stable_rank=norms.stable_rank,
        entropy=norms.entropy, matrix_rank=norms.rank,
        num_spikes=mp.num_spikes, sigma_mp=mp.sigma_mp, bulk_max=mp.bulk_max,
        warning=detect.warning_for(fit), status="ok" if fit.ok else "failed",  # norms still kept
        precision=precision_name(prec),
    )
    out.update(m.confounds())
    return evals, out


def _float32_decided(evals: torch.Tensor, fit: spectral.PowerLawFit, mp_threshold: float,
                     opts: AuditOptions, name: str) -> bool:
    """Whether float32 eigenvalues give the float64 answer. The fit must be decided beyond
    round-off: by the bound (`alpha_spread`) or, failing that, by refitting twice with every
    eigenvalue perturbed by PERTURB_ULPS ulps of λ_max (the measured size of float32's error);
    α may move by at most max(ALPHA_TOL, ALPHA_TOL_SIGMAS·σ(α)). No eigenvalue may sit within
    round-off of the MP spike threshold. A failed fit is redone in float64 (round-off?). (The
    rank is decided by the caller: README, Precision.)"""
    if not bool(torch.isfinite(evals).all()) or not fit.ok:
        return False
    tol = max(ALPHA_TOL, ALPHA_TOL_SIGMAS * fit.sigma)
    lmax = float(evals.max())
    if fit.alpha_spread > tol:
        gen = matrix_generator(opts.seed, name + "/round-off")
        scale = PERTURB_ULPS * torch.finfo(torch.float32).eps * lmax
        for _ in range(PERTURB_TRIALS):
            noise = torch.randn(evals.shape, generator=gen, dtype=torch.float64) * scale
            refit = spectral.fit_power_law(evals + noise.to(evals.device),
                                           fix_fingers=opts.fix_fingers)
            if not refit.ok or abs(refit.alpha - fit.alpha) > tol:
                return False
    err = spectral.float32_eig_err(lmax)
    return not bool(((evals - mp_threshold).abs() <= err).any())


def _check_analysable(W: torch.Tensor) -> None:
    if min(W.shape) < MIN_EVALS:
        raise SpectralError(f"only {min(W.shape)} eigenvalues (shape {list(W.shape)}); a spectral "
                            f"analysis needs at least {MIN_EVALS}")
    lo, hi = (float(x) for x in torch.aminmax(W))  # one pass: NaN propagates, Inf shows
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_nan, n_inf = int(torch.isnan(W).sum()), int(torch.isinf(W).sum())
        raise SpectralError(f"non-finite entries ({n_nan} NaN, {n_inf} Inf)")
    if lo == 0 and hi == 0:
        raise SpectralError("all entries are zero")
    tiny = torch.finfo(W.dtype).tiny
    if max(-lo, hi) < tiny:
        dtype = str(W.dtype).removeprefix("torch.")
        raise SpectralError(f"every entry is subnormal in {dtype} (max |w| = {max(-lo, hi):.3g} "
                            f"< {tiny:.3g}): too few significant bits left to analyse")


def _confounds(W: torch.Tensor) -> dict:
    """Entry statistics that can fake a trap: a non-zero mean, a single huge entry."""
    mean, var = spectral.entry_moments(W)
    lo, hi = (float(x) for x in torch.aminmax(W))
    return confounds(W.numel(), mean, var, lo, hi)


def confounds(n: int, mean: float, var: float, lo: float, hi: float) -> dict:
    """`_confounds` from n entries' mean, population variance, min and max."""
    std = math.sqrt(var * n / max(n - 1, 1))  # unbiased, as torch.std
    return dict(entry_mean=mean, entry_std=std, entry_var=var, mean_spike=mean * mean * n,
                max_abs_w_over_std=max(-lo, hi) / std if std > 0 else math.inf)


def _base(W: torch.Tensor, meta: MatrixMeta) -> dict:
    return base_fields(tuple(W.shape), meta)


def base_fields(shape: tuple[int, ...], meta: MatrixMeta) -> dict:
    return dict(name=meta.name, layer=meta.layer, module=meta.module, expert=meta.expert,
                N=max(shape), M=min(shape), dtype=meta.dtype, hf_module=meta.hf_module)


def _failed(W: torch.Tensor, meta: MatrixMeta, warning: str, seconds: float) -> MatrixResult:
    return MatrixResult(**_base(W, meta), warning=warning, status="failed", seconds=seconds)


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


class _Clock:
    """Lap times of a sequence of stages; waits for the device's queue at each lap so that
    asynchronous CUDA work is charged to the stage that issued it."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device
        self._t = time.perf_counter()

    def lap(self) -> float:
        if self._cuda:
            torch.cuda.current_stream(self._device).synchronize()
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt
