"""Reports of `llm-audit sweep`: trend.csv, trend.json, trend.md and a self-contained trend.html.

trend.html embeds its figures as base64 PNGs (mean α and total traps against the step; α and
traps per matrix, or per layer for big models, against the step as heatmaps), the first step
each condition holds, and links to each checkpoint's own report (relative paths).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..jsonio import dumps
from .fmt import code, fmt
from .html import environment, table
from .writers import atomic_write, csv_text

if TYPE_CHECKING:
    from ..sweep import SweepEntry, SweepResult
    from .figures import Figure

MAX_HEAT_ROWS = 48  # more matrices than this: the heatmaps have one row per layer
MAX_MD_HITS = 20
MAX_MD_FAILING = 3


def write_trend(result: SweepResult, formats: tuple[str, ...]) -> list[Path]:
    out, written = result.out, []
    if "csv" in formats:
        written.append(out / "trend.csv")
        atomic_write(written[-1], csv_text(result.trend))
    if "json" in formats:
        written.append(out / "trend.json")
        atomic_write(written[-1], dumps(trend_data(result)) + "\n")
    if "md" in formats:
        written.append(out / "trend.md")
        atomic_write(written[-1], render_trend_markdown(result))
    if "html" in formats:
        written.append(out / "trend.html")
        atomic_write(written[-1], render_trend_html(result, formats))
    return written


def trend_data(result: SweepResult) -> dict:
    """trend.json: options, conditions, one entry per checkpoint, the first hits."""
    return {"options": {k: getattr(result.options, k)
                        for k in result.options.__dataclass_fields__},
            "conditions": [str(c) for c in result.conditions], "fail_on": result.fail_on,
            "checkpoints": [_entry_data(e) for e in result.entries],
            "first_hits": [{k: (None if v is pd.NA else v) for k, v in r.items()}
                           for r in result.first_hits.to_dict("records")]}


def _entry_data(e: SweepEntry) -> dict:
    return {"step": e.item.step, "checkpoint": e.item.name, "source": str(e.item.path),
            "report": e.item.folder, "reused": e.reused, "matrices": e.matrices,
            "mean_alpha": e.mean_alpha, "total_traps": e.total_traps,
            "failing": list(e.failing)}


def first_lines(result: SweepResult) -> list[str]:
    """One plain line per condition: 'first rand_num_spikes>0 at step 17,800 (fc1.weight, ...)'
    or 'rand_num_spikes>0: never'."""
    lines = []
    for cond in map(str, result.conditions):
        hits = result.first_hits[result.first_hits["condition"] == cond]
        if not len(hits):
            lines.append(f"{cond}: never")
            continue
        step = int(hits["step"].iloc[0])
        names = hits[hits["step"] == step]["name"].tolist()
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        n = len(hits)
        lines.append(f"first {cond} at step {step:,}: {names[0]}{more}; "
                     f"{n} {'matrix' if n == 1 else 'matrices'} in all")
    return lines


def render_trend_markdown(result: SweepResult) -> str:
    traps = any(e.total_traps is not None for e in result.entries)
    lines = [f"# llm-audit sweep: {len(result.entries)} checkpoints", "",
             "| step | checkpoint | mean α | traps | failing matrices |", "|---|---|---|---|---|"]
    for e in result.entries:
        fail = ", ".join(code(n) for n in e.failing[:MAX_MD_FAILING])
        if len(e.failing) > MAX_MD_FAILING:
            fail += f" and {len(e.failing) - MAX_MD_FAILING} more"
        lines.append(f"| {e.item.step:,} | {code(e.item.name)} | {fmt(e.mean_alpha)} | "
                     f"{e.total_traps if traps else 'n/a'} | {len(e.failing)}"
                     f"{': ' + fail if fail else ''} |")
    lines += ["", "## First step each condition holds", ""]
    for cond in map(str, result.conditions):
        hits = result.first_hits[result.first_hits["condition"] == cond]
        if not len(hits):
            lines.append(f"- `{cond}`: never")
            continue
        lines.append(f"- `{cond}`: first at step {int(hits['step'].iloc[0]):,}")
        lines += [f"  - {code(r.name)} at step {int(r.step):,} ({fmt(r.value)})"
                  for r in hits.head(MAX_MD_HITS).itertuples()]
        if len(hits) > MAX_MD_HITS:
            lines.append(f"  - … and {len(hits) - MAX_MD_HITS} more (see trend.json)")
    return "\n".join(lines) + "\n"


def render_trend_html(result: SweepResult, formats: tuple[str, ...] = ("html",)) -> str:
    from .html import _figure

    report = "report.html" if "html" in formats else "report.md" if "md" in formats \
        else "layers.csv"

    hits = table(result.first_hits, ("condition", "name", "layer", "module", "step", "value"),
                 {"layer", "step", "value"})
    return environment().get_template("trend.html.j2").render(
        title=f"llm-audit sweep: {len(result.entries)} checkpoints",
        summary=_summary(result), first=first_lines(result),
        figures=[_figure(f) for f in trend_figures(result)],
        checkpoints=[_checkpoint_row(e, report) for e in result.entries], hits=hits)


def _summary(result: SweepResult) -> list[tuple[str, str]]:
    steps = [e.item.step for e in result.entries]
    o = result.options
    return [("checkpoints", str(len(result.entries))),
            ("steps", f"{min(steps):,} – {max(steps):,}" if steps else "—"),
            ("reused from an earlier sweep", str(sum(e.reused for e in result.entries))),
            ("conditions", ", ".join(map(str, result.conditions))
             + ("" if result.fail_on else " (default; give --fail-on to choose)")),
            ("trap rule", o.trap_rule if o.randomize else "none (--no-randomize)"),
            ("seed", str(o.seed)), ("precision", o.precision)]


def _checkpoint_row(e: SweepEntry, report: str) -> dict:
    return {"step": f"{e.item.step:,}", "name": e.item.name, "href": f"{e.item.folder}/{report}",
            "mean_alpha": fmt(e.mean_alpha),
            "traps": "n/a" if e.total_traps is None else str(e.total_traps),
            "failing": len(e.failing), "reused": "reused" if e.reused else "audited"}


def trend_figures(result: SweepResult) -> list[Figure]:
    import matplotlib

    from .figures import _RC

    if not result.entries:
        return []
    with matplotlib.rc_context(_RC):
        figs = [_summary_figure(result)]
        ok = result.trend[result.trend["status"] == "ok"]
        if len(ok):
            figs.append(_heatmaps(ok, result.options.randomize))
    return figs


def _summary_figure(result: SweepResult) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    from .figures import Figure, _png

    steps = [e.item.step for e in result.entries]
    fig = MplFigure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.plot(steps, [e.mean_alpha for e in result.entries], marker="o", ms=3, color="tab:blue")
    ax.axhline(2, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("mean α", color="tab:blue")
    if any(e.total_traps is not None for e in result.entries):
        ax2 = ax.twinx()
        ax2.plot(steps, [e.total_traps or 0 for e in result.entries], marker="s", ms=3,
                 color="tab:red")
        ax2.set_ylabel("total traps", color="tab:red")
    ax.set_title("mean α (blue; red dashed: α = 2) and total correlation traps (red) by step")
    return Figure("trend", "Mean α and total traps against the step", _png(fig, right=0.9))


def heat_tables(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(α, traps, row label) tables with one column per checkpoint (sweep order) and one row per
    matrix, or per layer (mean α, summed traps) when there are more than MAX_HEAT_ROWS."""
    by_layer = ok["name"].nunique() > MAX_HEAT_ROWS and ok["layer"].notna().any()
    d = ok[ok["layer"].notna()] if by_layer else ok
    row = "layer" if by_layer else "name"
    cols = list(dict.fromkeys(zip(d["step"], d["checkpoint"], strict=True)))
    d = d.assign(col=[cols.index(k) for k in zip(d["step"], d["checkpoint"], strict=True)])
    order = d.drop_duplicates(row).sort_values(["layer", "name"], na_position="last")[row]
    out = []
    for value, how in (("alpha", "mean"), ("rand_num_spikes", "sum")):
        t = d.pivot_table(index=row, columns="col", values=value, aggfunc=how, dropna=False)
        t = t.reindex(index=list(order), columns=range(len(cols)))
        t.columns = [s for s, _ in cols]
        out.append(t)
    return out[0], out[1], row


def _heatmaps(ok: pd.DataFrame, randomize: bool) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    from .figures import Figure, _png, _safe

    alpha, traps, row = heat_tables(ok)
    panels = [(alpha, "α", "viridis")] + ([(traps, "traps", "Reds")] if randomize else [])
    height = min(2.2 + 0.16 * len(alpha), 12)
    fig = MplFigure(figsize=(6 * len(panels), height))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (t, label, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(t.to_numpy(dtype=float), aspect="auto", cmap=cmap,
                       interpolation="nearest")
        ax.set_title(f"{label} per {'layer' if row == 'layer' else 'matrix'} by step")
        ax.set_xlabel("step")
        _ticks(ax, [f"{s:,}" for s in t.columns], [_safe(str(x), 30) for x in t.index])
        if ax is not axes[0]:
            ax.tick_params(labelleft=False)  # the rows are those of the first panel
        fig.colorbar(im, ax=ax, shrink=0.8)
    left = 0.1 if row == "layer" else 0.22
    return Figure("heatmap", f"α and traps per {row} against the step",
                  _png(fig, left=left, bottom=min(0.3, 1.2 / height), wspace=0.15))


def _ticks(ax, xlabels: list[str], ylabels: list[str]) -> None:
    for axis, labels, rot in ((ax.set_xticks, xlabels, 45), (ax.set_yticks, ylabels, 0)):
        every = max(1, math.ceil(len(labels) / 24))
        pos = list(range(0, len(labels), every))
        axis(pos, [labels[p] for p in pos], rotation=rot, fontsize=7)
