"""The data-free audit of a toy model's weights, as rows of history.csv, layers.csv and
traps.csv (no I/O: ``outputs.py`` writes them).

- ``audit_rows``: one audit through ``llm_audit.monitor_weights``;
- ``audit_both_rules``: the ``ww`` audit with both trap rules' columns on every layer row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_audit import AuditOptions, monitor_weights
from llm_audit.records import trap_table_rows

AUDIT_COLUMNS = ("mean_alpha", "num_traps")
TRAP_RULES = ("ww", "tw")
#: per-rule columns of layers.csv (suffixed _ww / _tw)
RULE_COLUMNS = ("rand_num_spikes", "max_rand_eval", "trap_threshold", "traps_mean",
                "traps_entries", "traps_tail", "trap_entries", "trap_rows", "trap_cols")
LAYER_COLUMNS = ("step", "name", "N", "M", "alpha", "num_pl_spikes", "lambda_max", "log_norm",
                 "stable_rank", "entropy", "num_spikes", "rand_num_spikes", "max_rand_eval",
                 "trap_threshold", "rand_distance", "entry_mean", "entry_std",
                 "max_abs_w_over_std", "warning", "status")
TRAP_CSV_COLUMNS = ("step", "name", "rule", "trap", "eigenvalue", "class", "half_mass_entries",
                    "entries")


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


def audit_both_rules(weights, step: int, *, seed: int, device: str, min_evals: int,
                     columns: Sequence[str], fix_fingers: str = "clip_xmax"
                     ) -> tuple[dict, list[dict], list[dict]]:
    """The ``ww`` audit (history's mean α and num_traps, WeightWatcher's rule) with each layer
    row carrying both rules' RULE_COLUMNS and ``num_traps_tw`` in the history fields.

    Returns (history fields, layer rows, the traps.csv rows of both rules)."""
    rows, traps = {}, []
    for rule in TRAP_RULES:
        opts = AuditOptions(seed=seed, device=device, trap_rule=rule, fix_fingers=fix_fingers)
        rows[rule] = audit_rows(weights, step, opts, min_evals=min_evals,
                                columns=(*columns, *RULE_COLUMNS))
        traps += [{"step": step, **t} for t in rows[rule][0].pop("traps")]
    audit, layer_rows = rows["ww"]
    for row, ww, tw in zip(layer_rows, rows["ww"][1], rows["tw"][1], strict=True):
        for rule, other in (("ww", ww), ("tw", tw)):
            row.update({f"{c}_{rule}": other[c] for c in RULE_COLUMNS})
    audit["num_traps_tw"] = rows["tw"][0]["num_traps"]
    return audit, layer_rows, traps
