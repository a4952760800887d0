"""The synthetic matrices of tests/data/ww077_synth_reference.csv (WeightWatcher 0.7.7's output
on them, analyze(randomize=True, mp_fit=True), with and without fix_fingers='clip_xmax')."""

import numpy as np


def synth_matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {}
    t["a.gauss_60x300.weight"] = rng.standard_normal((60, 300)).astype(np.float32)
    t["b.student_15x50.weight"] = rng.standard_t(2.5, (15, 50)).astype(np.float32)
    t["c.gauss_12x12.weight"] = rng.standard_normal((12, 12)).astype(np.float32)
    W = rng.standard_normal((300, 100)) / 10
    W[:, :1] += 5.0  # one big spike
    t["d.finger_300x100.weight"] = W.astype(np.float32)
    t["e.student_200x200.weight"] = rng.standard_t(3, (200, 200)).astype(np.float32)
    L = rng.standard_normal((100, 50)) @ rng.standard_normal((50, 400)) / 20
    t["f.lowrank50_100x400.weight"] = L.astype(np.float32)
    L5 = rng.standard_normal((50, 5)) @ rng.standard_normal((5, 50))
    t["g.rank5_50x50.weight"] = L5.astype(np.float32)
    t["h.ones_30x30.weight"] = np.ones((30, 30), np.float32)
    t["i.student_embed_2000x64.weight"] = rng.standard_t(2, (2000, 64)).astype(np.float32)
    t["j.mean_shift_150x150.weight"] = (rng.standard_normal((150, 150)) + 0.3).astype(np.float32)
    t["k.rank12_40x40.weight"] = (rng.standard_normal((40, 12))
                                  @ rng.standard_normal((12, 40))).astype(np.float32)
    return t


def heavy_tailed_stack(B: int, rows: int, cols: int, seed: int = 0, *,
                       entries: tuple[int, ...] | None = None):
    """A float32 torch stack (B, rows, cols) of heavy-tailed matrices: Gaussian / sqrt(rows)
    plus a power-law spectrum (singular values 3·i^-0.6), and in matrix b `entries[b]` (default
    b + 1) planted large entries 2.5, 3.0, ... (correlation traps)."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    M = min(rows, cols)
    s = 3.0 * torch.arange(1, M + 1, dtype=torch.float64) ** -0.6
    out = []
    for b in range(B):
        W = torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)
        U, _ = torch.linalg.qr(torch.randn(rows, M, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(cols, M, generator=g, dtype=torch.float64))
        W += U @ torch.diag(s) @ V.T
        for k in range(b + 1 if entries is None else entries[b]):
            W[(7 * k + b) % rows, (11 * k + 3) % cols] = 2.5 + 0.5 * k
        out.append(W)
    return torch.stack(out).float()
