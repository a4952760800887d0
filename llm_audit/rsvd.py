"""Randomized top-k singular values (block subspace iteration with re-orthonormalisation).

Used for the part of a spectrum an answer needs when a full decomposition costs too much: the
top of a shuffled matrix's spectrum for trap counts. Pure function: explicit generator, no I/O.
"""

from __future__ import annotations

import torch


def top_singular_values(W: torch.Tensor, k: int, *, generator: torch.Generator,
                        oversample: int = 20, iters: int = 10,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The k largest singular values of W (descending), by randomized subspace iteration.

    W: (rows, cols). Work happens on W's device in `dtype`. With `iters` power iterations the
    relative error of s_i decays like (s_{k+p+1}/s_i)^(2*iters+1); for the gapped spikes of a
    spiked MP matrix a handful of iterations reach float64 round-off on the spikes.
    """
    A = W.to(dtype)
    if A.shape[0] < A.shape[1]:
        A = A.T  # (N, M) with N >= M: iterate in the small dimension
    n, m = A.shape
    k = min(k, m)
    b = min(m, k + oversample)
    if b >= m // 2:  # the sketch is as big as the problem: exact is cheaper and exact
        return torch.linalg.svdvals(A)[:k]
    omega = torch.randn(m, b, generator=generator, dtype=dtype, device="cpu").to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)  # (n, b)
    for _ in range(iters):
        Z, _ = torch.linalg.qr(A.T @ Q)  # (m, b)
        Q, _ = torch.linalg.qr(A @ Z)  # (n, b)
    B = Q.T @ A  # (b, m): small
    return torch.linalg.svdvals(B)[:k]


def top_eigenvalues(W: torch.Tensor, k: int, *, generator: torch.Generator,
                    **kwargs) -> torch.Tensor:
    """The k largest eigenvalues of WᵀW (= squared singular values), descending."""
    return top_singular_values(W, k, generator=generator, **kwargs) ** 2
