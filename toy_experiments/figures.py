"""Figure helpers shared by the toy experiments (the paper's panels). Headless (Agg backend).

All take the DataFrames of ``history.csv`` / ``layers.csv`` and write one PNG each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

SIGNAL_LABELS = {"l2_norm": "ℓ2 norm of all weights",
                 "activation_sparsity": "activation sparsity",
                 "abs_weight_entropy": "absolute weight entropy −Σ|w|ln|w|",
                 "circuit_complexity": "local circuit complexity (KL, 10% zeroed)"}


def _positive_steps(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["step"] > 0]


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark(ax: plt.Axes, marks: dict[str, int] | None) -> None:
    for label, step in (marks or {}).items():
        if step and step > 0:
            ax.axvline(step, color="grey", ls=":", lw=1)
            ax.text(step, ax.get_ylim()[1], label, rotation=90, va="top", ha="right",
                    fontsize=7, color="grey")


def plot_accuracy(history: pd.DataFrame, path: Path, title: str = "",
                  marks: dict[str, int] | None = None) -> Path:
    """Train and test accuracy vs step (log x)."""
    h = _positive_steps(history)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(h["step"], h["train_acc"], "o-", ms=3, label="train")
    ax.plot(h["step"], h["test_acc"], "o-", ms=3, label="test")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _mark(ax, marks)
    return _save(fig, path)


def plot_layer_metric(layers: pd.DataFrame, metric: str, path: Path, ylabel: str = "",
                      hline: float | None = None, marks: dict[str, int] | None = None) -> Path:
    """One line per layer of ``metric`` vs step (log x), e.g. traps or α per layer."""
    lay = _positive_steps(layers)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, g in lay.groupby("name", sort=False):
        ax.plot(g["step"], g[metric], "o-", ms=3, label=str(name))
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _mark(ax, marks)
    return _save(fig, path)


def plot_signals(history: pd.DataFrame, path: Path, columns: Sequence[str] | None = None,
                 marks: dict[str, int] | None = None) -> Path:
    """The comparison signals vs step, one panel each, test accuracy in grey behind them."""
    cols = list(columns or SIGNAL_LABELS)
    h = _positive_steps(history)
    fig, axes = plt.subplots(len(cols), 1, figsize=(6.4, 2.1 * len(cols)), sharex=True)
    for ax, c in zip(np.atleast_1d(axes), cols, strict=True):
        ax.plot(h["step"], h[c], "o-", ms=3, color="C2")
        ax.set_ylabel(SIGNAL_LABELS.get(c, c), fontsize=7)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if "test_acc" in h:
            tw = ax.twinx()
            tw.plot(h["step"], h["test_acc"], color="grey", alpha=0.4, lw=1)
            tw.set_ylim(0, 1.02)
            tw.set_ylabel("test acc", fontsize=7, color="grey")
        _mark(ax, marks)
    np.atleast_1d(axes)[-1].set_xlabel("step")
    return _save(fig, path)


def plot_prototypes(matrices: dict[str, torch.Tensor], path: Path, image_shape=(28, 28),
                    k: int = 8) -> Path:
    """Top-k right singular vectors of each (out, in) matrix as images, one row per matrix.

    For an MLP's first layer these are the input-space templates; localized, digit-like
    templates after the collapse are the paper's 'prototype overfitting'.
    """
    fig, axes = plt.subplots(len(matrices), k, figsize=(1.3 * k, 1.5 * len(matrices)),
                             squeeze=False)
    for row, (label, W) in enumerate(matrices.items()):
        _, s, vh = torch.linalg.svd(W.detach().double().cpu(), full_matrices=False)
        for j in range(k):
            ax = axes[row, j]
            v = vh[j].numpy().reshape(image_shape)
            lim = float(np.abs(v).max()) or 1.0
            ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"σ{j + 1}={float(s[j]):.3g}", fontsize=6)
        axes[row, 0].set_ylabel(label, fontsize=7)
    return _save(fig, path)
