"""`llm-audit diff A B`: per-matrix changes matched by name, biggest first, in all formats."""

import io
import json

import pandas as pd
import torch
from safetensors.torch import save_file

from llm_audit.cli import main
from llm_audit.diff import diff_tables
from llm_audit.progress import AuditStarted, JobDone, ProgressBar


def _table(rows):
    return pd.DataFrame([dict(name=n, layer=i, module="q", expert=None, alpha=a,
                              rand_num_spikes=t, log_norm=ln, warning="")
                         for i, (n, a, t, ln) in enumerate(rows)])


def test_diff_tables_known_answer():
    a = _table([("x", 3.0, 0, 1.0), ("y", 4.0, 0, 2.0), ("z", 2.5, 1, 1.5), ("gone", 3, 0, 1)])
    b = _table([("x", 3.5, 0, 1.1), ("y", 1.5, 0, 2.0), ("z", 2.4, 4, 1.5), ("new", 3, 0, 1)])
    r = diff_tables(a, b, "base", "tuned")
    assert list(r.table["name"]) == ["z", "y", "x"]  # |Δtraps| first, then |Δα|
    z = r.table.iloc[0]
    assert (z.alpha_a, z.alpha_b, z.traps_a, z.traps_b, z.d_traps) == (2.5, 2.4, 1, 4, 3)
    assert r.table["d_alpha"].round(6).tolist() == [-0.1, -2.5, 0.5]
    assert r.table["d_log_norm"].round(6).tolist() == [0.0, 0.0, 0.1]
    assert (r.only_a, r.only_b) == (("gone",), ("new",))
    s = r.summary
    assert (s["matched"], s["only_a"], s["only_b"], s["total_d_traps"],
            s["matrices_gaining_traps"]) == (3, 1, 1, 3, 1)
    assert round(s["max_abs_d_alpha"], 6) == 2.5


def test_diff_cli_checkpoint_vs_audit_folder(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.q.weight": torch.randn(128, 64, generator=g) for i in range(3)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["layers.1.q.weight"][7, 9] = 50.0  # the fine-tune planted a trap in layer 1
    del tuned["layers.2.q.weight"]
    tuned["layers.3.q.weight"] = torch.randn(128, 64, generator=g)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    assert main([str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "a"), "-q",
                 "--format", "csv,json"]) == 0
    code = main(["diff", str(tmp_path / "a"), str(tmp_path / "tuned.safetensors"),
                 "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 0
    assert err.splitlines()[0].startswith("base -> tuned: 2 matched, 1 only in A, 1 only in B;")
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == ["diff.csv", "diff.html", "diff.json", "diff.md"]
    t = pd.read_csv(tmp_path / "d" / "diff.csv")
    assert list(t["name"]) == ["layers.1.q.weight", "layers.0.q.weight"]
    assert t.loc[0, "d_traps"] > 0 and t.loc[1, "d_traps"] == 0 and t.loc[1, "d_alpha"] == 0
    j = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert (j["only_a"], j["only_b"]) == (["layers.2.q.weight"], ["layers.3.q.weight"])
    md = (tmp_path / "d" / "diff.md").read_text()
    assert md.startswith("# llm-audit diff: `base` → `tuned`")
    assert "## Only in A (1)\n\n- `layers.2.q.weight`" in md
    html = (tmp_path / "d" / "diff.html").read_text()
    assert 'id="matrices"' in html and "<script>" in html and "http:" not in html


def test_diff_missing_side_is_exit_2(tmp_path, capsys):
    code = main(["diff", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--out",
                 str(tmp_path / "d")])
    assert code == 2
    assert capsys.readouterr().err == (f"llm-audit: error: {tmp_path / 'nope'}: no such file or "
                                       "folder (give a .safetensors file, a model folder, or a "
                                       "hub id org/name)\n")


def test_progress_bar_reports_matrices_bytes():
    buf = io.StringIO()
    with ProgressBar(buf) as bar:
        bar(AuditStarted("m", jobs_total=2, bytes_total=2000, jobs_cached=0))
        bar(JobDone("a", (), 1, 2, 1000, 2000, False))
        bar.bar.refresh()
        assert "1.00k/2.00k" in buf.getvalue() and "jobs 1/2" in buf.getvalue()
