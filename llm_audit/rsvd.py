"""Randomized top-k singular values by block Krylov iteration (Musco & Musco, 2015).

Used for the part of a spectrum an answer needs when a full decomposition costs too much: the
top of a shuffled matrix's spectrum for trap counts. Works on one matrix (rows, cols) or a batch
(B, rows, cols) at once. Pure function: explicit generator, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import spectral

OVERSAMPLE = 8
ITERS = 6
MAX_ITERS = 16  # with a threshold: iterate until the count above it has settled
SETTLE = 2.0  # remaining growth of a Ritz value ≈ SETTLE × its last step (ratio ≤ 2/3)


def top_singular_values(W: torch.Tensor, k: int, *,
                        generator: torch.Generator | Sequence[torch.Generator],
                        **kwargs) -> torch.Tensor:
    """The k largest singular values of W (..., rows, cols), descending: (..., k)."""
    return top_eigenvalues(W, k, generator=generator, **kwargs).clamp_min(0).sqrt()


def top_eigenvalues(W: torch.Tensor, k: int, *,
                    generator: torch.Generator | Sequence[torch.Generator],
                    oversample: int = OVERSAMPLE, iters: int = ITERS,
                    dtype: torch.dtype = torch.float64,
                    threshold: torch.Tensor | float | None = None,
                    max_iters: int = MAX_ITERS) -> torch.Tensor:
    """The k largest eigenvalues of WᵀW (= squared singular values of W (..., rows, cols)),
    descending: (..., k), float64 (computed in `dtype` on W times a power of two that brings
    max|W| into [1, 2), as `spectral.esd`, then divided back).

    Block Krylov: the Ritz values of WᵀW on span{WΩ, (WWᵀ)WΩ, ..., (WWᵀ)^iters WΩ}, each block
    re-orthogonalised twice against all earlier ones (safe in float32), read off as the
    eigenvalues of the small matrix (KᵀW)(KᵀW)ᵀ. With the same matrix products, Krylov reaches
    a given accuracy on the top of a gap-free spectrum (the MP edge of a shuffled matrix) in
    about the square root of the iterations subspace iteration needs.

    Ritz values only grow towards the eigenvalues. With a `threshold` (a number, or one per
    matrix of the batch), iterations go on past `iters` (up to `max_iters`) while a Ritz value
    at or below it could still cross it: while its distance to the threshold is less than
    SETTLE × its growth in the last iteration; each matrix of a batch keeps the values of the
    iteration it settled at, so its answer does not depend on its batch-mates. Counts above the
    threshold are then exact unless convergence is slower than that geometric estimate.

    Work happens on W's device in `dtype`. Ω is drawn in float64 on the generator's device
    (the same Ω in any dtype); with a sequence of generators, one per matrix of the batch, each
    matrix's Ω comes from its own, so a matrix gets the same answer alone or in a batch.
    """
    A, c2 = _scaled(W, dtype)
    if threshold is not None:
        threshold = torch.as_tensor(threshold, dtype=torch.float64, device=c2.device) * c2
    ritz, _ = _top_eigenvalues(A, k, generator, oversample, iters, dtype, threshold, max_iters)
    return ritz.to(torch.float64) / c2[..., None]


def _scaled(W: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(c·W in `dtype`, c² (...,) float64) for the power of two c of `spectral.pow2_scale`:
    scale-invariant, as spectral.esd, no float32 over- or underflow."""
    c = spectral.pow2_scale(W)
    return W.to(dtype) * c.to(W.device, dtype), c.reshape(c.shape[:-2]) ** 2


def top_triplets_above(W: torch.Tensor, k: int, *, generator: torch.Generator,
                       dtype: torch.dtype, threshold: float
                       ) -> tuple[torch.Tensor, Callable[[], tuple]]:
    """`top_eigenvalues(W, k, generator=, dtype=, threshold=)` of one matrix W (rows, cols),
    except that when more than k values are above the threshold up to k + OVERSAMPLE + k of
    them come from the same sketch, and a function giving the singular triplets that come
    with them: (top (k,), triplets) with triplets() = (U (rows, k), s (k,), V (cols, k)),
    float64, s = √top. The vectors are read off the Krylov basis the values settled on (one
    SVD of the small KᵀA, its singular values unused), so a trap count and its anatomy share
    one sketch instead of two (the anatomy's own float64 sketch measured 0.7-1.0 s at 2880²,
    one thread); computed only when asked for (a sketch too narrow for the count is redone)."""
    A, c2 = _scaled(W, dtype)
    c2 = float(c2)
    t = torch.as_tensor(threshold, dtype=torch.float64) * c2
    ritz, basis = _top_eigenvalues(A, k, generator, OVERSAMPLE, ITERS, dtype, t, MAX_ITERS,
                                   extend=True)
    top = ritz.to(torch.float64) / c2

    def triplets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = top.shape[-1]
        An = A.T if A.shape[0] < A.shape[1] else A  # (n, m), n >= m: where the basis lives
        if basis is None:  # the exact route
            Ub, _, Vh = torch.linalg.svd(An.to(torch.float64), full_matrices=False)
            U = Ub[:, :n]
        else:
            K, Y = basis  # Y = AᵀK, so KᵀA = Yᵀ = Ub diag(s) Vh and V = Y Ub / s
            # from the eigenvectors of the small YᵀY (8x cheaper than an SVD of Yᵀ at
            # 2880², one thread; the top ones are as accurate: their gaps are not small)
            Y = Y.to(torch.float64)
            lam, Ub = torch.linalg.eigh(Y.T @ Y)
            Ub = Ub.flip(-1)[:, :n]
            U = K.to(torch.float64) @ Ub
            Vt = Y @ Ub
            Vh = (Vt / torch.linalg.vector_norm(Vt, dim=0)).T
        V, s = Vh[:n].T, top.clamp_min(0).sqrt()
        return (V, s, U) if A.shape[0] < A.shape[1] else (U, s, V)

    return top, triplets


def _top_eigenvalues(A: torch.Tensor, k: int, generator, oversample: int, iters: int,
                     dtype: torch.dtype, threshold: torch.Tensor | None,
                     max_iters: int, extend: bool = False) -> tuple[torch.Tensor, tuple | None]:
    """(Ritz values (..., k), the basis (K, Y = AᵀK) they were read from, or None when exact
    or when the members of a batch settled at different iterations). `extend` (one matrix,
    with a threshold): when the top k are all above the threshold, k + b values are read
    off the same basis instead (as many as the threshold needs, up to that)."""
    if A.shape[-2] < A.shape[-1]:
        A = A.mT  # (..., n, m) with n >= m: iterate in the small dimension
    n, m = A.shape[-2:]
    k = min(k, m)
    b = k + oversample
    if b * (iters + 1) >= m // 2:  # the basis is as big as the problem: exact is cheaper
        return torch.linalg.svdvals(A)[..., :k] ** 2, None
    last = iters if threshold is None else max(iters, min(max_iters, m // (2 * b) - 1))
    omega = _sketch(A.shape[:-2], m, b, generator).to(A.device, dtype)  # (..., m, b)
    K = torch.empty(*A.shape[:-2], n, b * (last + 1), dtype=dtype, device=A.device)
    Y = torch.empty(*A.shape[:-2], m, b * (last + 1), dtype=dtype, device=A.device)
    K[..., :b] = torch.linalg.qr(A @ omega).Q  # (..., n, b) blocks of the Krylov basis K
    Y[..., :b] = A.mT @ K[..., :b]  # Y = AᵀK, so (KᵀA)(KᵀA)ᵀ = YᵀY: Ritz values come cheap
    prev = out = settled = None
    want = k  # values read; with a threshold, k + b once the top k are all above it
    for j in range(1, last + 1):
        Z = A @ Y[..., (j - 1) * b:j * b]  # (..., n, b) = (AAᵀ) K_{j-1}
        done = K[..., :j * b]
        for _ in range(2):
            Z = Z - done @ (done.mT @ Z)
        K[..., j * b:(j + 1) * b] = torch.linalg.qr(Z).Q
        Y[..., j * b:(j + 1) * b] = A.mT @ K[..., j * b:(j + 1) * b]
        if j < iters - (threshold is not None):
            continue
        Yj = Y[..., :(j + 1) * b]
        ritz = torch.linalg.eigvalsh(Yj.mT @ Yj).flip(-1)
        if threshold is None:
            return ritz[..., :k], (K[..., :(j + 1) * b], Yj)
        if extend and want == k < m and float(ritz[k - 1]) > float(threshold):
            # (one matrix) more than k values above the threshold: the basis (b·(j+1)
            # columns) also holds the next b, converging behind the first; reading them
            # saves a wider sketch (benchmarks/RESULTS.md), settled by the same test
            want, prev = min(k + b, m, ritz.shape[-1]), None
        ritz = ritz[..., :want]
        if prev is None:
            out, settled = ritz, torch.zeros(ritz.shape[:-1], dtype=torch.bool,
                                             device=ritz.device)
        else:  # each matrix keeps the values it settled at: batch-mates do not change them
            now = _settled(ritz, prev, threshold) & ~settled
            out = torch.where(now[..., None], ritz, out)
            settled = settled | now
            if bool(settled.all()):
                single = ritz.ndim == 1  # then `out` is this iteration's values
                return out, ((K[..., :(j + 1) * b], Yj) if single else None)
        prev = ritz
    basis = (K, Y) if ritz.ndim == 1 else None  # the last iteration's, unsettled
    return torch.where(settled[..., None], out, ritz), basis


def _settled(ritz: torch.Tensor, prev: torch.Tensor, threshold) -> torch.Tensor:
    """Per matrix (...,): no Ritz value at or below the threshold is within SETTLE × its last
    growth of it."""
    t = torch.as_tensor(threshold, dtype=ritz.dtype, device=ritz.device)
    t = t.reshape(*t.shape, *([1] * (ritz.ndim - t.ndim)))  # (...,) -> (..., 1)
    below = ritz <= t
    close = (t - ritz) <= SETTLE * (ritz - prev).clamp_min(0)
    return ~(below & close).any(dim=-1)


def _sketch(batch: torch.Size, m: int, b: int,
            generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return torch.randn(*batch, m, b, generator=generator, dtype=torch.float64,
                           device=generator.device)
    if len(batch) != 1 or batch[0] != len(generator):
        raise ValueError(f"{len(generator)} generators for a batch of shape {tuple(batch)}")
    return torch.stack([torch.randn(m, b, generator=g, dtype=torch.float64, device=g.device)
                        for g in generator])


def top_singular_triplets(W: torch.Tensor, k: int, *, generator: torch.Generator,
                          oversample: int = OVERSAMPLE, iters: int = ITERS
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (rows, k), s (k,), V (cols, k)): the k largest singular triplets of one matrix W
    (rows, cols), W ≈ U diag(s) Vᵀ on them, in float64. The same block Krylov basis K as
    `top_eigenvalues` (fixed `iters`); the SVD of the small KᵀA gives the vectors. Exact
    (a full SVD) when the basis would be as big as the problem."""
    A = W.to(torch.float64)
    flip = A.shape[0] < A.shape[1]
    if flip:
        A = A.T  # (n, m), n >= m
    n, m = A.shape
    k = min(k, m)
    b = k + oversample
    if b * (iters + 1) >= m // 2:
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        U, s, V = U[:, :k], s[:k], Vh[:k].T
    else:
        omega = _sketch(torch.Size(), m, b, generator).to(A.device)
        blocks = [torch.linalg.qr(A @ omega).Q]
        for _ in range(iters):
            Z = A @ (A.T @ blocks[-1])
            done = torch.cat(blocks, dim=1)
            for _ in range(2):
                Z = Z - done @ (done.T @ Z)
            blocks.append(torch.linalg.qr(Z).Q)
        K = torch.cat(blocks, dim=1)  # (n, b·(iters+1)), orthonormal
        Ub, s, Vh = torch.linalg.svd(K.T @ A, full_matrices=False)
        U, s, V = K @ Ub[:, :k], s[:k], Vh[:k].T
    return (V, s, U) if flip else (U, s, V)
