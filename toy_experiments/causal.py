"""Does removing the correlation traps restore generalization? (The paper's causal claim.)

For each snapshot of an MNIST run: test accuracy as saved, after ``llm_audit.repair_weights``
of fc1 and fc2 (each method), and after two controls per method that change the weights as
much but not at the traps:

- clip (the trap entries winsorized to the bulk scale, k entries touched) against
  ``clip_random``: k random entries set to the entries' mean (a change of the same count, at
  random places), and ``clip_large``: the k largest-|w − mean| entries that are *not* trap
  entries, winsorized to the same bulk scale (the same operation on other large weights);
- subtract (each trap's rank-1 component σ u vᵀ of the shuffled matrix removed) against
  ``subtract_random``: a rank-1 component of the same σ with random unit vectors, removed
  through the same shuffle (the same ‖ΔW‖_F in a random direction).

    python -m toy_experiments.causal --run reports/toy/mnist_collapse \\
        --data-dir ../shared/data/mnist [--rule ww] [--classes entries,tail]

writes ``RUN/causal_<rule>.csv``: step, test_acc, the traps by class of each repaired matrix,
and the test accuracy of every variant. ``--modadd-preset P`` does the same for a
modular-addition run of preset P (all 8 matrices repaired).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
import torch

from llm_audit import AuditOptions
from llm_audit.trap_repair import matrix_anatomy, repair_matrix

from .data import notebook_subsets
from .mlp import MLP3
from .mnist import evaluate

LAYERS = ("fc1.weight", "fc2.weight")
VARIANTS = ("clip", "clip_random", "clip_large", "subtract", "subtract_random")


def variants(state: dict[str, torch.Tensor], opts: AuditOptions, classes: tuple[str, ...],
             gen: torch.Generator, layers: tuple[str, ...] = LAYERS
             ) -> tuple[dict[str, dict], dict[str, int]]:
    """({variant: state}, {column: count}) for one snapshot: the repaired and control
    weights of LAYERS, and per layer the traps by class and the entries clip touched."""
    out = {v: dict(state) for v in VARIANTS}
    counts: dict[str, int] = {}
    for name in layers:
        W = state[name]
        an = matrix_anatomy(W, opts, name=name)
        short = name.removesuffix(".weight").replace(".", "_")
        for cls in ("mean", "entries", "tail"):
            counts[f"{short}_traps_{cls}"] = an.count(cls)
        clipped, rec = repair_matrix(W, opts, name=name, method="clip", classes=classes)
        out["clip"][name] = clipped
        counts[f"{short}_clip_entries"] = k = rec.entries_touched
        touched = (clipped != W).reshape(-1)
        out["clip_random"][name] = _set_random_to_mean(W, touched, k, gen)
        out["clip_large"][name] = _clip_largest_others(W, touched, k, an.clip_level)
        out["subtract"][name] = repair_matrix(W, opts, name=name, method="subtract",
                                              classes=classes)[0]
        out["subtract_random"][name] = _subtract_random(W, an, classes, gen)
    return out, counts


def _set_random_to_mean(W: torch.Tensor, exclude: torch.Tensor, k: int,
                        gen: torch.Generator) -> torch.Tensor:
    flat = W.clone().reshape(-1)
    pool = torch.nonzero(~exclude).flatten()
    pick = pool[torch.randperm(len(pool), generator=gen)[:k]]
    flat[pick] = W.mean()
    return flat.view(W.shape)


def _clip_largest_others(W: torch.Tensor, exclude: torch.Tensor, k: int,
                         level: float) -> torch.Tensor:
    flat = W.clone().reshape(-1)
    mean = float(W.mean())
    dev = (flat - mean).abs().masked_fill(exclude, -1.0)
    pick = torch.topk(dev, k).indices
    flat[pick] = flat[pick].sub(mean).clamp(-level, level).add(mean)
    return flat.view(W.shape)


def _subtract_random(W: torch.Tensor, an, classes, gen: torch.Generator) -> torch.Tensor:
    flat = W.clone().to(torch.float64).reshape(-1)
    for c in an.components:
        if c.cls in classes:
            u = torch.randn(len(c.u), generator=gen, dtype=torch.float64)
            v = torch.randn(len(c.v), generator=gen, dtype=torch.float64)
            flat[c.perm] -= (c.sigma * (u / u.norm())[:, None] * (v / v.norm())[None, :]
                             ).reshape(-1)
    return flat.view(W.shape).to(W.dtype)


def mnist_accuracy(data_dir):
    """state -> test accuracy of the MNIST MLP3 on the full 10k test set."""
    _, test = notebook_subsets(data_dir)

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        m = MLP3()
        m.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
        return evaluate(m, test)[0]
    return accuracy


def modadd_accuracy(preset: str, seed: int):
    """state -> test accuracy of the modular-addition transformer on its run's test pairs."""
    from . import modadd as ma
    from . import modadd_train as mt

    pr = mt.preset_with(preset)
    data, _, _ = mt.setup(mt.Run(preset=pr, out=Path("unused"), seed=seed))

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        m = ma.ModAddTransformer(ma.ModelConfig(p=pr.p))
        m.load_state_dict({k: v.float() for k, v in state.items()})
        return ma.evaluate(m, data.test_x, data.test_y)[0]
    return accuracy


def snapshots(run: Path) -> list[tuple[int, Path]]:
    out = []
    for p in sorted((run / "snapshots").glob("step_*.safetensors")):
        out.append((int(p.stem.split("_")[1]), p))
    return out


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(prog="python -m toy_experiments.causal")
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--rule", choices=("ww", "tw"), default="ww")
    ap.add_argument("--classes", default="entries,tail")
    ap.add_argument("--seed", type=int, default=0, help="audit seed; controls use seed + 1")
    ap.add_argument("--min-step", type=int, default=1)
    ap.add_argument("--modadd-preset", default=None,
                    help="the run is a modular-addition run of this preset (repairs all 8 "
                         "matrices; MNIST runs repair fc1 and fc2)")
    args = ap.parse_args(argv)
    opts = AuditOptions(trap_rule=args.rule, seed=args.seed, device="cpu")
    classes = tuple(args.classes.split(","))
    if args.modadd_preset:
        from .modadd import AUDITED

        accuracy, layers = modadd_accuracy(args.modadd_preset, args.seed), AUDITED
    else:
        accuracy, layers = mnist_accuracy(args.data_dir), LAYERS
    rows = []
    for step, path in snapshots(args.run):
        if step < args.min_step:
            continue
        state = {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}
        gen = torch.Generator().manual_seed(args.seed + 1 + step)
        states, counts = variants(state, opts, classes, gen, layers)
        row = {"step": step, "rule": args.rule, "test_acc": accuracy(state), **counts}
        row.update({f"test_{v}": accuracy(s) for v, s in states.items()})
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) and not math.isnan(v)
                       else f"{k}={v}" for k, v in row.items()), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.run / f"causal_{args.rule}.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
