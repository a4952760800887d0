"""Measurement machinery shared by the toy experiments (MNIST MLP, modular addition).

Model-agnostic: every function takes a ``torch.nn.Module`` and, where activations are needed,
a ``forward`` callable ``forward(model, x) -> (logits, hiddens)`` where ``logits`` is
(batch, classes) and ``hiddens`` is a list of hidden activation tensors (any shapes).

- ``log_schedule``: the log-spaced steps at which to measure;
- ``comparison_signals``: the paper's baselines (ℓ2 norm, activation sparsity, absolute weight
  entropy, approximate local circuit complexity);
- ``audit_rows``: the data-free audit via ``llm_audit.monitor_weights``, history + layer rows;
- ``append_csv``, ``save_snapshot``: outputs;
- figure helpers (re-exported from ``toy_experiments.figures``): ``plot_accuracy``,
  ``plot_layer_metric``, ``plot_signals``, ``plot_prototypes``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from llm_audit import AuditOptions, monitor_weights
from llm_audit.records import trap_table_rows

from .figures import plot_accuracy, plot_layer_metric, plot_prototypes, plot_signals

__all__ = [
    "AUDIT_COLUMNS", "LAYER_COLUMNS", "SIGNAL_COLUMNS", "Forward", "abs_weight_entropy",
    "activation_sparsity", "append_csv", "audit_rows", "circuit_complexity", "comparison_signals",
    "l2_norm", "log_schedule", "notebook_signals", "plot_accuracy", "plot_layer_metric",
    "plot_prototypes", "plot_signals", "save_snapshot", "snapshot_path", "truncate_csv",
    "weight_tensors", "zero_fraction",
]

Forward = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]

SIGNAL_COLUMNS = ("l2_norm", "activation_sparsity", "abs_weight_entropy", "circuit_complexity")
AUDIT_COLUMNS = ("mean_alpha", "num_traps")
TRAP_RULES = ("ww", "tw")
#: per-rule columns of layers.csv (suffixed _ww / _tw)
RULE_COLUMNS = ("rand_num_spikes", "max_rand_eval", "trap_threshold", "traps_mean",
                "traps_entries", "traps_tail", "trap_entries", "trap_rows", "trap_cols")
LAYER_COLUMNS = ("step", "name", "N", "M", "alpha", "num_pl_spikes", "lambda_max", "log_norm",
                 "stable_rank", "entropy", "num_spikes", "rand_num_spikes", "max_rand_eval",
                 "trap_threshold", "rand_distance", "entry_mean", "entry_std",
                 "max_abs_w_over_std", "warning", "status")


# ---------------------------------------------------------------- schedule

def log_schedule(total_steps: int, per_decade: int = 12, first: int = 1) -> list[int]:
    """Steps 0, first, ..., total_steps, log-spaced with ``per_decade`` points per decade."""
    if total_steps < 0 or per_decade < 1 or first < 1:
        raise ValueError("total_steps >= 0, per_decade >= 1 and first >= 1 are required")
    steps = {0, total_steps}
    if total_steps >= first:
        n = math.ceil(per_decade * math.log10(total_steps / first)) + 1
        for i in range(n):
            steps.add(min(total_steps, round(first * 10 ** (i / per_decade))))
    return sorted(steps)


# ---------------------------------------------------------------- comparison signals

def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights (parameters with >= 2 dimensions: no biases, no norms' gains)."""
    return [p.detach() for p in model.parameters() if p.dim() >= 2]


@torch.no_grad()
def l2_norm(model: torch.nn.Module) -> float:
    """ℓ2 norm of all parameters together (float64 accumulation)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


@torch.no_grad()
def abs_weight_entropy(model: torch.nn.Module) -> float:
    """Absolute weight entropy −Σ |w| ln |w| over all weights (0 ln 0 = 0)."""
    total = 0.0
    for w in weight_tensors(model):
        a = w.double().abs()
        total -= float(torch.xlogy(a, a).sum())
    return total


@torch.no_grad()
def activation_sparsity(hiddens: Sequence[torch.Tensor], threshold: float = 1e-3) -> float:
    """Fraction of hidden activations with |h| below ``threshold`` (pooled over all layers)."""
    below = sum(int((h.abs() < threshold).sum()) for h in hiddens)
    total = sum(h.numel() for h in hiddens)
    return below / total if total else math.nan


@torch.no_grad()
def zero_fraction(model: torch.nn.Module, fraction: float,
                  generator: torch.Generator) -> torch.nn.Module:
    """A copy of ``model`` with ``fraction`` of each weight tensor's entries set to zero."""
    pruned = copy.deepcopy(model)
    for p in pruned.parameters():
        if p.dim() >= 2:
            r = torch.rand(p.shape, generator=generator, device=generator.device)
            p.masked_fill_((r < fraction).to(p.device), 0.0)
    return pruned


@torch.no_grad()
def circuit_complexity(model: torch.nn.Module, x: torch.Tensor, forward: Forward,
                       generator: torch.Generator, fraction: float = 0.1) -> float:
    """Approximate local circuit complexity Σ_k KL(softmax f_W(x_k) ‖ softmax f_W'(x_k)),
    W' = W with ``fraction`` of the weights zeroed (Golechha 2024)."""
    logp = torch.log_softmax(forward(model, x)[0].double(), dim=-1)
    logq = torch.log_softmax(forward(zero_fraction(model, fraction, generator), x)[0].double(),
                             dim=-1)
    return float((logp.exp() * (logp - logq)).sum())


@torch.no_grad()
def comparison_signals(model: torch.nn.Module, x: torch.Tensor, forward: Forward, *,
                       generator: torch.Generator, fraction: float = 0.1,
                       sparsity_threshold: float = 1e-3) -> dict[str, float]:
    """The four comparison signals of the paper, keyed by ``SIGNAL_COLUMNS``."""
    _, hiddens = forward(model, x)
    return dict(l2_norm=l2_norm(model),
                activation_sparsity=activation_sparsity(hiddens, sparsity_threshold),
                abs_weight_entropy=abs_weight_entropy(model),
                circuit_complexity=circuit_complexity(model, x, forward, generator, fraction))


@torch.no_grad()
def notebook_signals(model: torch.nn.Module, x: torch.Tensor, *, generator: torch.Generator,
                     first: str = "fc1", tau: float = 1.0, p: float = 0.5) -> dict[str, float]:
    """The comparison signals as the authors' notebook computes them (``progress_measures``)
    on one fixed batch ``x`` of training images, keyed by ``SIGNAL_COLUMNS``:

    - activation sparsity: the fraction of the first ReLU's outputs below ``tau`` (= 1);
    - absolute weight entropy of the first layer: −Σ |w| ln(|w| + 1e-8);
    - circuit complexity: mean over the batch of KL(softmax f_W(x) ‖ softmax f_W'(x)), with
      W' = ``F.dropout(W, p)`` on every weight matrix (biases kept): entries zeroed with
      probability p, the rest × 1/(1 − p); 1e-8 added to both softmaxes; the dropout mask
      from ``generator`` (the notebook draws it from the global RNG);
    - the ℓ2 norm of all parameters.
    """
    lin = getattr(model, first)
    h = torch.relu(lin(x))
    w = lin.weight.abs()
    pruned = copy.deepcopy(model)
    for name, q in pruned.named_parameters():
        if name.endswith("weight"):
            keep = torch.rand(q.shape, generator=generator, device=generator.device) >= p
            q.mul_(keep.to(q.device, q.dtype) / (1 - p))
    p1 = torch.softmax(model(x), dim=1) + 1e-8
    p2 = torch.softmax(pruned(x), dim=1) + 1e-8
    return dict(l2_norm=l2_norm(model),
                activation_sparsity=float((h < tau).double().mean()),
                abs_weight_entropy=-float((w * torch.log(w + 1e-8)).sum()),
                circuit_complexity=float((p1 * (p1.log() - p2.log())).sum(1).mean()))


# ---------------------------------------------------------------- audit

def audit_rows(model: torch.nn.Module | dict, step: int, options: AuditOptions | None = None,
               *, min_evals: int = 1,
               columns: Sequence[str] = LAYER_COLUMNS) -> tuple[dict, list[dict]]:
    """Audit the current weights with ``llm_audit.monitor_weights``.

    Returns (history fields ``mean_alpha``, ``num_traps`` + ``alert``, and ``traps``: the rows
    of traps.csv of every layer; one dict per layer with
    those of ``columns`` that are fields of the audit's rows, and ``step``).
    """
    report = monitor_weights(model, options=options, min_evals=min_evals)
    rule = (options or AuditOptions()).trap_rule
    hist = dict(mean_alpha=report.mean_alpha, num_traps=report.total_traps, alert=report.alert,
                traps=[t for r in report.layers for t in trap_table_rows(r, rule)])
    layers = [{"step": step, **{c: getattr(r, c) for c in columns if hasattr(r, c)}}
              for r in report.layers]
    return hist, layers


def both_rules_columns(base: Sequence[str] = LAYER_COLUMNS) -> tuple[str, ...]:
    """layers.csv columns: ``base`` plus each rule's RULE_COLUMNS."""
    return (*base, "xmin", "D", "num_fingers", "raw_alpha",
            *(f"{c}_{r}" for r in TRAP_RULES for c in RULE_COLUMNS))


TRAP_CSV_COLUMNS = ("step", "name", "rule", "trap", "eigenvalue", "class", "half_mass_entries",
                    "entries")


def audit_both_rules(weights, step: int, out: Path, *, seed: int, device: str,
                     min_evals: int, columns: Sequence[str],
                     fix_fingers: str = "clip_xmax") -> tuple[dict, list[dict]]:
    """The ``ww`` audit (history's mean α and num_traps, WeightWatcher's rule) with each layer
    row carrying both rules' RULE_COLUMNS, ``num_traps_tw`` in the history fields, and every
    trap of both rules appended to ``out/traps.csv``."""
    rows, traps = {}, []
    for rule in TRAP_RULES:
        opts = AuditOptions(seed=seed, device=device, trap_rule=rule, fix_fingers=fix_fingers)
        rows[rule] = audit_rows(weights, step, opts, min_evals=min_evals,
                                columns=(*columns, *RULE_COLUMNS))
        traps += [{"step": step, **t} for t in rows[rule][0].pop("traps")]
    append_csv(Path(out) / "traps.csv", traps, TRAP_CSV_COLUMNS)
    audit, layer_rows = rows["ww"]
    for row, ww, tw in zip(layer_rows, rows["ww"][1], rows["tw"][1], strict=True):
        for rule, other in (("ww", ww), ("tw", tw)):
            row.update({f"{c}_{rule}": other[c] for c in RULE_COLUMNS})
    audit["num_traps_tw"] = rows["tw"][0]["num_traps"]
    return audit, layer_rows


# ---------------------------------------------------------------- outputs

def append_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Append ``rows`` (only ``columns``, in that order) to a CSV, writing the header if new."""
    if not rows:
        return
    path = Path(path)
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=list(columns))
    new = not path.exists() or path.stat().st_size == 0
    df.to_csv(path, mode="w" if new else "a", header=new, index=False)


def truncate_csv(path: Path, last_step: int) -> None:
    """Drop the rows with step > ``last_step`` (used when resuming from a checkpoint)."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        df = pd.read_csv(path)
        df[df["step"] <= last_step].to_csv(path, index=False)


def snapshot_path(out_dir: Path, step: int | str) -> Path:
    name = f"step_{step:09d}" if isinstance(step, int) else step
    return Path(out_dir) / "snapshots" / f"{name}.safetensors"


def save_snapshot(model: torch.nn.Module, out_dir: Path, step: int | str,
                  dtype: torch.dtype | None = None) -> Path:
    """Save the weights at ``step`` as ``out_dir/snapshots/step_XXXXXXXXX.safetensors`` (or
    ``<step>.safetensors`` for a name such as "best"), cast to ``dtype`` if given."""
    path = snapshot_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)
    return path


def load_checkpoint(out_dir: Path, model: torch.nn.Module, opt, device) -> dict | None:
    """Resume from ``out_dir/checkpoint.pt`` if present: load model and optimizer state, cut the
    CSVs back to its step, and return the checkpoint dict (None when starting fresh)."""
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    for name in ("history.csv", "layers.csv"):
        truncate_csv(out_dir / name, int(ck["step"]))
    print(f"resuming from {path} at step {int(ck['step'])}", flush=True)
    return ck


def print_progress(row: dict, t0: float, steps_done: int) -> None:
    """One console line per measurement: accuracies, mean α, traps, norm, speed since t0."""
    dt = time.perf_counter() - t0
    rate = steps_done / dt if dt > 0 else float("nan")
    print(f"step {row['step']:>9d}  train {row['train_acc']:.3f}  test {row['test_acc']:.3f}  "
          f"alpha {row['mean_alpha']:.2f}  traps {row['num_traps']}  "
          f"norm {row['l2_norm']:.1f}  [{dt:.0f}s, {rate:.1f} steps/s]", flush=True)
