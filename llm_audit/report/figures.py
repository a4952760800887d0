"""Matplotlib figures of an audit, rendered to PNG bytes (embedded in HTML, linked from md).

Header names are drawn with '$' escaped, so matplotlib's mathtext never parses a hostile tensor
name; file names of figures never come from header names.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from ..safetext import terminal
from ..spectra import Spectra

DPI = 80
LABEL_MAX = 60  # characters of a header-supplied label in a figure
_RC = {"font.size": 9, "axes.titlesize": 9,
       "svg.fonttype": "none"}


@dataclass(frozen=True)
class Figure:
    key: str  # file stem: alpha_by_layer, traps_by_layer, experts, spectra_01, ...
    title: str
    png: bytes
    caption: str = ""


def make_figures(details: pd.DataFrame, spectra: tuple[Spectra, ...] = ()) -> list[Figure]:
    """Summary figures plus one figure per suspicious matrix."""
    out = []
    with matplotlib.rc_context(_RC):
        ok = details[details["status"] == "ok"]
        if ok["layer"].notna().any():
            out.append(_alpha_by_layer(ok))
            out.append(_traps_by_layer(ok))
        if details["expert"].notna().any():
            out.append(_expert_heatmap(ok))
        for i, sp in enumerate(spectra, 1):
            out.append(_spectra_figure(sp, i))
    return out


def _png(fig: MplFigure, **margins: float) -> bytes:
    """PNG bytes of a figure (no pyplot: no global figure registry, no GUI backend). Fixed
    margins instead of tight_layout, which draws every figure twice (measured: 2.6 of the
    demo's 2.8 s of figures went to layout and log-axis ticks)."""
    for ax in fig.axes:
        ax.minorticks_off()  # log-axis minor ticks: most of a draw's cost, little to read
    fig.subplots_adjust(**{**dict(left=0.08, right=0.97, bottom=0.16, top=0.86, wspace=0.3),
                           **margins})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _hist(ax, values: np.ndarray, bins: np.ndarray, **kw) -> None:
    """A density histogram as one step artist (cheaper to draw than one patch per bin)."""
    h, edges = np.histogram(values, bins=bins, density=True)
    ax.stairs(h, edges, fill=True, **kw)


def _alpha_by_layer(ok: pd.DataFrame) -> Figure:
    fig = MplFigure(figsize=(7, 3.4))
    ax = fig.subplots()
    d = ok[ok["layer"].notna() & ok["alpha"].notna()]
    for module, g in d.groupby("module", sort=True):
        m = g.groupby("layer")["alpha"].mean().sort_index()
        ax.plot(m.index.astype(int), m.values, marker="o", ms=3, label=_safe(str(module)))
    ax.axhspan(2, 6, color="tab:green", alpha=0.08, lw=0)
    ax.axhline(2, color="tab:red", lw=0.8, ls="--")
    ax.axhline(6, color="tab:orange", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("α (mean over experts)")
    ax.set_title("α by layer depth (2–6 shaded: well trained)")
    if d["module"].nunique() <= 12:
        ax.legend(fontsize=7, ncol=2, loc="best")
    return Figure("alpha_by_layer", "α by layer depth, per module type", _png(fig),
                  "Below the red line (α < 2): over-fit; above the orange line (α > 6): "
                  "under-trained.")


def _traps_by_layer(ok: pd.DataFrame) -> Figure:
    fig = MplFigure(figsize=(7, 2.8))
    ax = fig.subplots()
    d = ok[ok["layer"].notna()]
    t = d.groupby("layer")["rand_num_spikes"].sum().sort_index()
    ax.bar(t.index.astype(int), t.values, color="tab:red")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("traps")
    ax.set_title(f"correlation traps by layer (total {int(t.sum())})")
    return Figure("traps_by_layer", "Correlation traps by layer", _png(fig))


def _expert_heatmap(ok: pd.DataFrame) -> Figure:
    d = ok[ok["expert"].notna() & ok["layer"].notna()]
    alpha = d.pivot_table(index="layer", columns="expert", values="alpha", aggfunc="mean")
    traps = d.pivot_table(index="layer", columns="expert", values="rand_num_spikes",
                          aggfunc="sum")
    fig = MplFigure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for ax, table, label, cmap in ((axes[0], alpha, "α (mean over modules)", "viridis"),
                                   (axes[1], traps, "traps (sum over modules)", "Reds")):
        data = table.to_numpy(dtype=float) if table.size else np.zeros((1, 1))
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(label)
        if table.size:
            _ticks(ax, table)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return Figure("experts", "Layer × expert heatmap", _png(fig))


def _ticks(ax, table: pd.DataFrame) -> None:
    for axis, labels in ((ax.set_yticks, table.index), (ax.set_xticks, table.columns)):
        step = max(1, len(labels) // 16)
        pos = list(range(0, len(labels), step))
        axis(pos, [str(int(labels[p])) for p in pos])


CLASS_COLORS = {"mean": "tab:purple", "entries": "tab:red", "tail": "tab:orange"}
IMAGE_SIDE = 28  # a 784-wide input dimension is drawn as a 28 × 28 image (MNIST pixels)


def _spectra_figure(sp: Spectra, i: int) -> Figure:
    where = bool(sp.trap_locations)
    image = where and IMAGE_SIDE ** 2 in sp.shape
    n = 2 + where + image
    fig = MplFigure(figsize=(4.5 * n, 3.3))
    axes = fig.subplots(1, n)
    _esd_panel(axes[0], sp)
    _shuffled_panel(axes[1], sp)
    if where:
        _where_panel(axes[2], sp)
    if image:
        _input_image_panel(axes[3], sp)
    fig.suptitle(_short(sp.name, 90), fontsize=9)
    return Figure(f"spectra_{i:02d}", sp.name, _png(fig, left=0.2 / n + 0.02, wspace=0.35),
                  sp.reason)


def _where_panel(ax, sp: Spectra) -> None:
    """The original entries each trap's contribution is largest on (traps.csv's `entries`)."""
    rows, cols = sp.shape
    for cls, color in CLASS_COLORS.items():
        pts = [(c, r) for r, c, k in sp.trap_locations if k == cls]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.scatter(x, y, s=9, color=color, label=cls, alpha=0.7)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xlabel(f"column (input, of {cols})")
    ax.set_ylabel(f"row (output, of {rows})")
    ax.set_title("where the trap entries sit (original matrix)")
    ax.legend(fontsize=7)


def _input_image_panel(ax, sp: Spectra) -> None:
    """How often each of 784 inputs carries a trap entry, as a 28 × 28 image."""
    axis = 1 if sp.shape[1] == IMAGE_SIDE ** 2 else 0
    counts = np.zeros(IMAGE_SIDE ** 2)
    for r, c, _ in sp.trap_locations:
        counts[c if axis == 1 else r] += 1
    im = ax.imshow(counts.reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="Reds", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("inputs of the trap entries (28 × 28)")
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def _esd_panel(ax, sp: Spectra) -> None:
    lam = np.asarray(sp.evals, dtype=float)
    lam = lam[lam > 1e-5]
    ax.set_title("ESD (log–log) with power-law fit")
    if len(lam) < 2:
        ax.text(0.5, 0.5, "no spectrum", ha="center", transform=ax.transAxes)
        return
    bins = np.logspace(math.log10(lam.min()), math.log10(lam.max()) + 1e-9, 60)
    _hist(ax, lam, bins, color="tab:blue", alpha=0.6, label="ESD")
    if math.isfinite(sp.alpha) and math.isfinite(sp.xmin) and sp.alpha > 1:
        x = np.logspace(math.log10(sp.xmin), math.log10(lam.max()), 50)
        frac = (lam >= sp.xmin).mean()
        y = frac * (sp.alpha - 1) / sp.xmin * (x / sp.xmin) ** -sp.alpha
        ax.plot(x, y, color="tab:red", lw=1.5, label=f"power law α={sp.alpha:.2f}")
        ax.axvline(sp.xmin, color="tab:red", ls="--", lw=0.8, label=f"xmin={sp.xmin:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("λ")
    ax.legend(fontsize=7)


def _shuffled_panel(ax, sp: Spectra) -> None:
    lam = np.asarray(sp.rand_evals, dtype=float)
    ax.set_title("shuffled ESD vs Marchenko–Pastur")
    if len(lam) < 2:
        ax.text(0.5, 0.5, "not randomized", ha="center", transform=ax.transAxes)
        return
    lam = lam[lam > lam.max() * 1e-9]
    bulk = lam[lam <= sp.trap_threshold] if math.isfinite(sp.trap_threshold) else lam
    bins = np.logspace(math.log10(lam.min()), math.log10(lam.max() * 1.05), 80)
    _hist(ax, lam, bins, color="tab:gray", alpha=0.6, label="shuffled ESD")
    if math.isfinite(sp.rand_bulk_max):
        x = np.logspace(math.log10(lam.min()), math.log10(sp.rand_bulk_max), 400)
        ax.plot(x, mp_density(x, sp.rand_bulk_max, sp.N / sp.M) * len(bulk) / len(lam),
                color="tab:green", lw=1.5, label="MP density")
        ax.axvline(sp.rand_bulk_max, color="tab:green", ls="--", lw=0.8, label="MP edge")
    traps = lam[lam > sp.trap_threshold] if math.isfinite(sp.trap_threshold) else lam[:0]
    classes = _classes_of(traps, sp.trap_classes)
    seen = set()
    for v, cls in zip(traps, classes, strict=True):
        label = f"trap: {cls}" if cls not in seen else None
        seen.add(cls)
        ax.axvline(v, color=CLASS_COLORS.get(cls, "tab:red"), lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("λ (shuffled W), log scale")
    ax.legend(fontsize=7)


def _classes_of(traps: np.ndarray, known: tuple[tuple[float, str], ...]) -> list[str]:
    """The class of each drawn trap eigenvalue: the anatomy's eigenvalue nearest to it."""
    if not known:
        return ["?"] * len(traps)
    ev = np.array([e for e, _ in known])
    return [known[int(np.argmin(np.abs(ev - v)))][1] for v in traps]


def mp_density(x: np.ndarray, bulk_max: float, Q: float) -> np.ndarray:
    """MP density of eigenvalues of XᵀX with aspect ratio Q >= 1 whose upper edge is bulk_max."""
    y = 1 / Q
    s = bulk_max / (1 + math.sqrt(y)) ** 2
    a, b = s * (1 - math.sqrt(y)) ** 2, bulk_max
    with np.errstate(all="ignore"):
        d = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * math.pi * s * y * x)
    return np.nan_to_num(np.where((x > a) & (x < b), d, 0.0))


def _short(text: str, n: int) -> str:
    """The end of a long name (its most specific part), drawn safely."""
    return _safe(text if len(text) <= n else "…" + text[-(n - 1):], limit=n)


def _safe(text: str, limit: int = LABEL_MAX) -> str:
    """Text from a header, drawn literally ('$' would start matplotlib mathtext), one line,
    at most `limit` characters (a megabyte name in a legend takes minutes to lay out)."""
    t = terminal(text)
    t = t if len(t) <= limit else t[:limit - 1] + "…"
    return t.replace("$", r"\$")
