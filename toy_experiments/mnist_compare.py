"""Do runs at larger constant learning rates follow the reference run on the lr·steps clock?

    python -m toy_experiments.mnist_compare --ref reports/toy/mnist_notebook \\
        --run reports/toy/mnist_lr/lr_1e-3 --run ... --out reports/toy/mnist_lr

Each run's history is compared with the reference interpolated (in log lr·steps) at the run's
own measurement points; `departures.csv` gives, per run and signal, the largest |Δ| over
lr·steps ≥ ``--from`` and the |Δ| at the end; `compression.png` draws the signals of all
runs against lr·steps on one figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SIGNALS = {"test_acc": "test accuracy", "train_acc": "train accuracy",
           "mean_alpha": "mean α (fc1, fc2, fc3)", "fc1_traps": "fc1 traps (ww)",
           "fc1_traps_tw": "fc1 traps (tw)", "l2_norm": "‖θ‖₂"}


def load(run: Path) -> pd.DataFrame:
    """history.csv with fc1's trap counts (both rules) joined from layers.csv."""
    h = pd.read_csv(run / "history.csv")
    lay = pd.read_csv(run / "layers.csv")
    fc1 = lay[lay["name"] == "fc1.weight"].set_index("step")
    h = h.set_index("step")
    h["fc1_traps"] = fc1["rand_num_spikes_ww"]
    h["fc1_traps_tw"] = fc1["rand_num_spikes_tw"]
    return h.reset_index()


def departures(ref: pd.DataFrame, run: pd.DataFrame, start: float) -> dict[str, tuple]:
    """Per signal: (max |run − ref| over lr·steps ≥ start, |Δ| at the run's last point)."""
    r = ref[ref["lr_steps"] > 0]
    x = run[run["lr_steps"] >= start]
    out = {}
    for col in SIGNALS:
        at = np.interp(np.log(x["lr_steps"]), np.log(r["lr_steps"]), r[col])
        d = np.abs(x[col].to_numpy() - at)
        out[col] = (float(d.max()), float(d[-1]))
    return out


def figure(runs: dict[str, pd.DataFrame], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SIGNALS), 1, figsize=(7, 2.0 * len(SIGNALS)), sharex=True)
    for label, h in runs.items():
        h = h[h["lr_steps"] > 0]
        for ax, (col, name) in zip(axes, SIGNALS.items(), strict=True):
            ax.plot(h["lr_steps"], h[col], "-", lw=1, label=label)
            ax.set_ylabel(name, fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("lr · steps (Σ lr)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toy_experiments.mnist_compare")
    ap.add_argument("--ref", type=Path, required=True, help="the reference run (lr 5e-4)")
    ap.add_argument("--run", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--from", dest="start", type=float, default=1.0,
                    help="compare from this lr·steps on (the first transient is excluded)")
    args = ap.parse_args(argv)
    ref = load(args.ref)
    runs = {f"lr {ref['lr'].iloc[0]:g} (ref)": ref}
    rows = []
    for run in args.run:
        h = load(run)
        runs[f"lr {h['lr'].iloc[0]:g}"] = h
        for col, (mx, end) in departures(ref, h, args.start).items():
            rows.append(dict(lr=h["lr"].iloc[0], signal=col, max_abs_diff=mx,
                             end_abs_diff=end, lr_steps_end=h["lr_steps"].iloc[-1]))
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "departures.csv", index=False)
    figure(runs, args.out / "compression.png")
    print(table.pivot(index="signal", columns="lr", values=["max_abs_diff", "end_abs_diff"])
          .round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
