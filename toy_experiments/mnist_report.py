"""Figures and phase timings of an MNIST run folder (history.csv, layers.csv, snapshots/)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from . import figures
from .outputs import snapshot_path


def phases(history: pd.DataFrame, sat: float = 0.99, drop: float = 0.05,
           layers: pd.DataFrame | None = None) -> dict:
    """Phase landmarks: first step with train acc >= ``sat`` (and test acc then), the test
    peak, the first step after the peak with test acc <= peak − ``drop`` (collapse onset), the
    final test acc, the first step with a trap, the first step with mean α < 2."""
    h = history.sort_values("step").reset_index(drop=True)
    out: dict = {}
    sat_rows = h[h["train_acc"] >= sat]
    if len(sat_rows):
        out["train_sat_step"] = int(sat_rows["step"].iloc[0])
        out["test_at_train_sat"] = float(sat_rows["test_acc"].iloc[0])
    ipk = int(h["test_acc"].idxmax())
    out["test_peak_step"], out["test_peak"] = int(h["step"][ipk]), float(h["test_acc"][ipk])
    after = h.iloc[ipk:]
    fallen = after[after["test_acc"] <= out["test_peak"] - drop]
    out["collapse_step"] = int(fallen["step"].iloc[0]) if len(fallen) else None
    out["final_step"], out["final_test"] = int(h["step"].iloc[-1]), float(h["test_acc"].iloc[-1])
    out["final_train"] = float(h["train_acc"].iloc[-1])
    trapped = h[h["num_traps"] > 0]
    out["first_trap_step"] = int(trapped["step"].iloc[0]) if len(trapped) else None
    for rule in ("ww", "tw"):
        col = f"rand_num_spikes_{rule}"
        if layers is not None and col in layers:
            hit = layers[layers[col] > 0]
            out[f"first_trap_step_{rule}"] = int(hit["step"].min()) if len(hit) else None
    low = h[h["mean_alpha"] < 2.0]
    out["first_alpha_below_2_step"] = int(low["step"].iloc[0]) if len(low) else None
    return out


def _marks(ph: dict) -> dict[str, int]:
    keys = {"train sat": "train_sat_step", "test peak": "test_peak_step",
            "collapse": "collapse_step", "1st trap": "first_trap_step",
            "1st tw trap": "first_trap_step_tw"}
    return {label: ph[k] for label, k in keys.items() if ph.get(k)}


def _fc1(out: Path, step: int | str):
    path = snapshot_path(out, step)
    return load_file(str(path))["fc1.weight"] if path.exists() else None


def prototype_steps(out: Path, ph: dict) -> dict[str, int | str]:
    """Snapshots to show: the earliest saved, the test peak ('best', saved at each new best
    test accuracy: before the collapse), and the latest saved (in the collapse, if any)."""
    saved = sorted(int(p.stem.split("_")[1])
                   for p in (out / "snapshots").glob("step_*.safetensors"))
    picks: dict[str, int | str] = {}
    if saved:
        picks[f"step {saved[0]} (first saved)"] = saved[0]
    picks[f"step {ph['test_peak_step']} (test peak)"] = "best"
    if saved and saved[-1] > ph["test_peak_step"]:
        picks[f"step {saved[-1]} (latest)"] = saved[-1]
    return picks


def make_figures(out: str | Path) -> list[Path]:
    """Write the paper's panels for a run folder; returns the PNG paths."""
    out = Path(out)
    history = pd.read_csv(out / "history.csv")
    layers = pd.read_csv(out / "layers.csv")
    ph = phases(history, layers=layers)
    marks = _marks(ph)
    fig_dir = out / "figures"
    paths = [
        figures.plot_accuracy(history, fig_dir / "accuracy.png", "MNIST MLP3: accuracy", marks),
        figures.plot_layer_metric(layers, "rand_num_spikes", fig_dir / "traps_per_layer.png",
                                  "correlation traps (history's rule)", marks=marks),
        *(figures.plot_layer_metric(layers, f"rand_num_spikes_{r}",
                                    fig_dir / f"traps_per_layer_{r}.png",
                                    f"correlation traps, rule {r}", marks=marks)
          for r in ("ww", "tw") if f"rand_num_spikes_{r}" in layers),
        figures.plot_layer_metric(layers, "alpha", fig_dir / "alpha_per_layer.png", "α",
                                  hline=2.0, marks=marks),
        figures.plot_signals(history, fig_dir / "comparison_signals.png", marks=marks),
    ]
    mats = {label: w for label, s in prototype_steps(out, ph).items()
            if (w := _fc1(out, s)) is not None}
    if mats:
        paths.append(figures.plot_prototypes(mats, fig_dir / "prototypes_fc1.png"))
    return paths


def describe(ph: dict) -> str:
    """One line per landmark, for logs and READMEs."""
    def fmt(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return "\n".join(f"{k}: {fmt(v)}" for k, v in ph.items())
