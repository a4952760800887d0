"""Phase landmarks and figures of a modular-addition run folder (history.csv, layers.csv)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import figures


def _first(h: pd.DataFrame, mask: pd.Series) -> pd.Series | None:
    rows = h[mask]
    return rows.iloc[0] if len(rows) else None


def phases(history: pd.DataFrame, sat: float = 0.99, grok: float = 0.9,
           drop: float = 0.1) -> dict:
    """Landmarks: memorisation (first step with train acc >= ``sat``, test acc then), grokking
    (first later step with test acc >= ``grok``), the test peak, the collapse (first step after
    the peak with test acc <= peak − ``drop``, train acc then), the lowest test acc after the
    peak, the end, the first step with a trap, mean α at the peak and at the end."""
    h = history.sort_values("step").reset_index(drop=True)
    out: dict = {}
    mem = _first(h, h["train_acc"] >= sat)
    if mem is not None:
        out["memorised_step"], out["test_at_memorised"] = int(mem["step"]), mem["test_acc"]
        g = _first(h, (h["step"] >= mem["step"]) & (h["test_acc"] >= grok))
        out["grok_step"] = None if g is None else int(g["step"])
        out["test_at_grok"] = None if g is None else float(g["test_acc"])
    ipk = int(h["test_acc"].idxmax())
    pk = h.iloc[ipk]
    out["test_peak_step"], out["test_peak"] = int(pk["step"]), float(pk["test_acc"])
    after = h.iloc[ipk:]
    col = _first(after, after["test_acc"] <= pk["test_acc"] - drop)
    out["collapse_step"] = None if col is None else int(col["step"])
    out["test_at_collapse"] = None if col is None else float(col["test_acc"])
    out["train_at_collapse"] = None if col is None else float(col["train_acc"])
    imin = int(after["test_acc"].idxmin())
    out["test_min_after_peak"], out["test_min_step"] = (float(h["test_acc"][imin]),
                                                        int(h["step"][imin]))
    out["final_step"], out["final_test"] = int(h["step"].iloc[-1]), float(h["test_acc"].iloc[-1])
    out["final_train"] = float(h["train_acc"].iloc[-1])
    trap = _first(h, h["num_traps"] > 0)
    out["first_trap_step"] = None if trap is None else int(trap["step"])
    out["alpha_at_peak"] = float(pk["mean_alpha"])
    out["alpha_final"] = float(h["mean_alpha"].iloc[-1])
    out["traps_at_peak"], out["traps_final"] = int(pk["num_traps"]), int(h["num_traps"].iloc[-1])
    return out


def _marks(ph: dict) -> dict[str, int]:
    keys = {"memorised": "memorised_step", "grokked": "grok_step",
            "collapse": "collapse_step", "1st trap": "first_trap_step"}
    return {label: ph[k] for label, k in keys.items() if ph.get(k)}


def make_figures(out: str | Path, title: str = "modular addition") -> list[Path]:
    """Accuracy, traps per layer (the paper's Fig. 8), α per layer, comparison signals, and the
    largest entry per layer in units of its std (a single huge entry is a trap by itself)."""
    out = Path(out)
    history = pd.read_csv(out / "history.csv")
    layers = pd.read_csv(out / "layers.csv")
    marks = _marks(phases(history))
    fig_dir = out / "figures"
    return [
        figures.plot_accuracy(history, fig_dir / "accuracy.png", f"{title}: accuracy", marks),
        figures.plot_layer_metric(layers, "rand_num_spikes", fig_dir / "traps_per_layer.png",
                                  "correlation traps", marks=marks),
        figures.plot_layer_metric(layers, "alpha", fig_dir / "alpha_per_layer.png", "α",
                                  hline=2.0, marks=marks),
        figures.plot_signals(history, fig_dir / "comparison_signals.png", marks=marks),
        figures.plot_layer_metric(layers, "max_abs_w_over_std", fig_dir / "max_entry_per_layer.png",
                                  "max |w| / std(w)", marks=marks),
    ]


def describe(ph: dict) -> str:
    """One line per landmark, for logs and READMEs."""
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else v
    return "\n".join(f"{k}: {fmt(v)}" for k, v in ph.items())
