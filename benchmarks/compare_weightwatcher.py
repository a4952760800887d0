"""llm-audit vs WeightWatcher 0.7.7 on every matrix of all-MiniLM-L6-v2.

    python benchmarks/compare_weightwatcher.py [--ww-python PATH | --ww-csv FILE] [--seeds 5]

WeightWatcher runs in its own venv (`--ww-python`, default $WW_PYTHON or /work/wwvenv/bin/python;
set it up with `python -m venv V && V/bin/pip install torch==2.13.0 weightwatcher==0.7.7
safetensors pandas`) through benchmarks/ww_reference.py, `analyze(randomize=True, mp_fit=True)`.
Criteria (issue 2): alpha, xmin, D to 1e-3; lambda_max, log_norm to 1e-4 relative; trap counts
equal except noise-level cases. Trap counts depend on the random shuffle, so llm-audit is run with
several seeds: a count that differs from WW's for some seed is explained by the distance of the
shuffled spectrum's top eigenvalue to the threshold.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import minilm_dir  # noqa: E402

import llm_audit  # noqa: E402

HERE = Path(__file__).resolve().parent
EXACT = {"alpha": 1e-3, "xmin": 1e-3, "D": 1e-3}  # absolute (α, D) / relative (xmin) tolerance
RELATIVE = {"lambda_max": 1e-4, "log_norm": 1e-4, "alpha_weighted": 1e-4, "stable_rank": 1e-4,
            "entropy": 1e-4, "sigma_mp": 1e-4, "bulk_max": 1e-4, "num_spikes": 0,
            "num_pl_spikes": 0}


def run_ww(model: Path, ww_python: str, out: Path) -> pd.DataFrame:
    subprocess.run([ww_python, str(HERE / "ww_reference.py"), str(model), str(out)], check=True)
    return pd.read_csv(out)


def compare_columns(ours: pd.DataFrame, ww: pd.DataFrame) -> list[str]:
    lines, ok = [], True
    for col, tol in {**EXACT, **RELATIVE}.items():
        a, b = ours[col].astype(float), ww[col].astype(float)
        rel = ((a - b).abs() / b.abs().clip(lower=1e-300))
        err = (a - b).abs() if col in ("alpha", "D") else rel
        worst = err.idxmax()
        good = bool((err <= tol).all())
        ok &= good
        lines.append(f"{col:15s} max {'abs' if col in ('alpha', 'D') else 'rel'} diff "
                     f"{err.max():.2e} (tol {tol:g}) {'ok' if good else 'FAIL'}  worst: {worst}")
    lines.append(f"columns: {'PASS' if ok else 'FAIL'}")
    return lines


def compare_traps(model: Path, ww: pd.DataFrame, seeds: int, precision: str) -> list[str]:
    counts = {}
    for seed in range(seeds):
        d = llm_audit.audit(model, seed=seed, precision=precision).details
        counts[seed] = d.set_index("name").loc[ww.index]
    table = pd.DataFrame({f"seed{s}": d["rand_num_spikes"] for s, d in counts.items()})
    table.insert(0, "ww", ww["rand_num_spikes"])
    equal_seed0 = int((table["ww"] == table["seed0"]).sum())
    in_range = ((table["ww"] >= table.iloc[:, 1:].min(axis=1))
                & (table["ww"] <= table.iloc[:, 1:].max(axis=1)))
    lines = [f"trap counts equal to WW with seed 0: {equal_seed0}/{len(table)}; "
             f"WW's count within llm-audit's range over {seeds} seeds: "
             f"{int(in_range.sum())}/{len(table)}"]
    varying = table[(table.iloc[:, 1:].nunique(axis=1) > 1) | (table["ww"] != table["seed0"])]
    if len(varying):
        d0 = counts[0].loc[varying.index]
        margin = (d0["max_rand_eval"] / d0["trap_threshold"] - 1) * 100
        show = varying.assign(**{"top/threshold-1 %": margin.round(2)})
        lines += ["matrices whose count depends on the shuffle (noise level: it changes from "
                  "seed to seed; WW's own shuffle is unseeded and varies the same way):",
                  show.to_string()]
    flagged = table[table["ww"] > 0]
    lines += ["matrices with traps (WW > 0):", flagged.to_string()]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ww-python", default=os.environ.get("WW_PYTHON", "/work/wwvenv/bin/python"))
    ap.add_argument("--ww-csv", type=Path, help="reuse a WW reference CSV instead of running WW")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "float64"],
                    help="llm-audit's eigenvalue precision (float64 reproduces WW's digits)")
    args = ap.parse_args()
    model = minilm_dir() / "model.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        ww = (pd.read_csv(args.ww_csv) if args.ww_csv
              else run_ww(model, args.ww_python, Path(tmp) / "ww.csv"))
    ww = ww.set_index("name")
    ours = llm_audit.audit(model, precision=args.precision).details.set_index("name")
    only_ours = sorted(set(ours.index) - set(ww.index))
    print(f"llm-audit precision {args.precision}: "
          f"{int((ours['precision'] == 'float64').sum())} of {len(ours)} matrices in float64")
    print(f"model: {model}\nmatrices: WW {len(ww)}, llm-audit {len(ours)} "
          f"(only llm-audit: {only_ours or 'none'}; WW skips M < 8)")
    ours = ours.loc[ww.index]
    print("\n".join(compare_columns(ours, ww)))
    print("\n".join(compare_traps(model, ww, args.seeds, args.precision)))


if __name__ == "__main__":
    main()
