"""Reports of `llm-audit diff`: diff.csv, diff.json, diff.md and a self-contained diff.html."""

from __future__ import annotations

from pathlib import Path

from ..jsonio import dumps
from .fmt import code, fmt
from .html import environment, table
from .writers import atomic_write, csv_text

MAX_MD_ROWS = 50
NUMERIC = ("alpha_a", "alpha_b", "d_alpha", "traps_a", "traps_b", "d_traps", "log_norm_a",
           "log_norm_b", "d_log_norm")


def write_diff_reports(out: Path, result, formats: tuple[str, ...]) -> list[Path]:
    written = []
    if "csv" in formats:
        written.append(out / "diff.csv")
        atomic_write(written[-1], csv_text(result.table))
    if "json" in formats:
        written.append(out / "diff.json")
        data = {"summary": result.summary, "only_a": list(result.only_a),
                "only_b": list(result.only_b)}
        atomic_write(written[-1], dumps(data) + "\n")
    if "md" in formats:
        written.append(out / "diff.md")
        atomic_write(written[-1], render_diff_markdown(result))
    if "html" in formats:
        written.append(out / "diff.html")
        atomic_write(written[-1], render_diff_html(result))
    return written


def render_diff_markdown(result) -> str:
    s = result.summary
    t = result.table
    lines = [f"# llm-audit diff: {code(s['a'])} → {code(s['b'])}", "",
             "| | |", "|---|---|",
             f"| matrices matched | {s['matched']} |",
             f"| only in A / only in B | {s['only_a']} / {s['only_b']} |",
             f"| mean Δα | {fmt(s['mean_d_alpha'])} |",
             f"| largest \\|Δα\\| | {fmt(s['max_abs_d_alpha'])} |",
             f"| Δtraps (total) | {s['total_d_traps']} |",
             f"| matrices gaining traps | {s['matrices_gaining_traps']} |", "",
             f"## Biggest changes ({min(len(t), MAX_MD_ROWS)} of {len(t)})", "",
             "| name | α A | α B | Δα | traps A | traps B | Δtraps | Δlog_norm |",
             "|---|---|---|---|---|---|---|---|"]
    for r in t.head(MAX_MD_ROWS).itertuples():
        name = code(r.name) if r.name_b == r.name else f"{code(r.name)} → {code(r.name_b)}"
        lines.append(f"| {name} | {fmt(r.alpha_a)} | {fmt(r.alpha_b)} | "
                     f"{fmt(r.d_alpha)} | {fmt(r.traps_a)} | {fmt(r.traps_b)} | "
                     f"{fmt(r.d_traps)} | {fmt(r.d_log_norm)} |")
    lines.append("")
    for label, names in (("Only in A", result.only_a), ("Only in B", result.only_b)):
        if names:
            lines += [f"## {label} ({len(names)})", ""]
            lines += [f"- {code(n)}" for n in names[:MAX_MD_ROWS]]
            if len(names) > MAX_MD_ROWS:
                lines.append(f"- … and {len(names) - MAX_MD_ROWS} more (see diff.json)")
            lines.append("")
    return "\n".join(lines)


def render_diff_html(result) -> str:
    cols = ("name", "name_b", "layer", "hf_module", "expert") + NUMERIC + ("warning_a", "warning_b")
    data = table(result.table, cols, set(NUMERIC) | {"layer", "expert"})
    s = result.summary
    return environment().get_template("diff.html.j2").render(
        title=f"llm-audit diff: {s['a']} → {s['b']}",
        summary=[(k.replace("_", " "), fmt(v)) for k, v in s.items()],
        table=data, only_a=list(result.only_a), only_b=list(result.only_b))
