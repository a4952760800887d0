"""End to end through the public API and the CLI on small checkpoints (issue 2's contract)."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit.demo import write_demo_checkpoint
from llm_audit.records import TIMING_COLUMNS
from llm_audit.summary import AuditSummary

REQUIRED = ["name", "layer", "module", "expert", "N", "M", "alpha", "alpha_weighted", "xmin", "D",
            "num_pl_spikes", "lambda_max", "log_norm", "log_spectral_norm", "stable_rank",
            "entropy", "num_spikes", "sigma_mp", "bulk_max", "rand_num_spikes", "max_rand_eval",
            "rand_bulk_max", "rand_distance", "warning"]
SUMMARY_KEYS = ["model", "source", "revision", "matrices_analysed", "matrices_failed",
                "matrices_in_float64", "tensors_skipped", "mean_alpha", "median_alpha",
                "num_over_trained", "num_under_trained", "total_traps", "matrices_with_traps",
                "traps_by_class", "bytes", "options", "versions", "elapsed_seconds",
                "stage_seconds"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "llm-audit-demo")


def test_demo_known_answers(demo):
    d = llm_audit.audit(demo).details.set_index("layer")
    assert list(d.columns[: len(REQUIRED) - 1]) != []  # a DataFrame with the table
    assert set(REQUIRED) <= set(d.reset_index().columns)
    assert 2 <= d.loc[0, "alpha"] <= 6 and d.loc[0, "warning"] == ""
    assert d.loc[1, "warning"] == "under-trained"
    assert d.loc[2, "rand_num_spikes"] == 4  # the four planted entries, found and counted
    assert d.loc[3, "warning"] == "over-trained" and d.loc[3, "rand_num_spikes"] == 0
    assert (d["module"] == "up_proj").all() and d["expert"].isna().all()
    assert d.loc[2, "max_abs_w_over_std"] > 20  # the confound control names the cause


def test_results_do_not_depend_on_order_or_filter(demo):
    full = llm_audit.audit(demo).details.set_index("name")
    one = llm_audit.audit(demo, include=r"layers\.2\.").details.set_index("name")
    assert list(one.index) == ["model.layers.2.mlp.up_proj.weight"]
    pd.testing.assert_series_equal(one.loc[one.index[0]].drop(list(TIMING_COLUMNS)),
                                   full.loc[one.index[0]].drop(list(TIMING_COLUMNS)))


def test_bad_matrices_are_kept_with_a_reason(tmp_path):
    g = torch.Generator().manual_seed(0)
    nan = torch.randn(64, 32, generator=g)
    nan[3, 4] = float("nan")
    f = tmp_path / "m.safetensors"
    save_file({"a.weight": nan, "b.weight": torch.zeros(64, 32),
               "c.weight": torch.randn(64, 32, generator=g),
               "d.weight": torch.randn(2, 384, generator=g)}, f)
    r = llm_audit.audit(f)
    d = r.details.set_index("name")
    assert d.loc["a.weight", "warning"] == "failed: non-finite entries (1 NaN, 0 Inf)"
    assert d.loc["b.weight", "warning"] == "failed: all entries are zero"
    assert d.loc["d.weight", "warning"] == ("failed: only 2 eigenvalues (shape [2, 384]); a "
                                            "spectral analysis needs at least 8")
    assert list(d["status"]) == ["failed", "failed", "ok", "failed"]
    assert r.summary.matrices_failed == 3 and r.summary.matrices_analysed == 1


def test_write_reports(demo, tmp_path):
    r = llm_audit.audit(demo, trap_rule="tw", fix_fingers="clip_xmax")
    r.write(tmp_path)
    csv = pd.read_csv(tmp_path / "layers.csv")
    assert set(REQUIRED) <= set(csv.columns) and len(csv) == 4
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["options"]["trap_rule"] == "tw" and s["total_traps"] == 4
    assert s["model"] == "llm-audit-demo" and s["versions"]["torch"] == torch.__version__
    md = (tmp_path / "report.md").read_text()
    assert "llm-audit-demo" in md.splitlines()[0] and "## Flagged matrices" in md
    n64 = int((r.details["precision"] == "float64").sum())
    assert s["matrices_in_float64"] == n64 and s["options"]["precision"] == "auto"
    assert f"| eigenvalue precision | auto ({n64} of 4 matrices in float64) |" in md
    st = s["stage_seconds"]
    assert (f"| elapsed | {s['elapsed_seconds']:.1f} s (eigenvalues {st['eigen']:.1f} s, fit "
            f"{st['fit']:.1f} s, traps {st['traps']:.1f} s; waited {st['wait']:.1f} s for data) |"
            in md)
    assert list(s) == SUMMARY_KEYS and isinstance(r.summary, AuditSummary)
    assert (tmp_path / "summary.json").read_text() == \
        json.dumps(r.summary.as_dict(), indent=2) + "\n"  # the file as before the record
    assert AuditSummary.from_dict(s) == r.summary


def _no_nan(constant):
    raise ValueError(f"{constant} is not JSON")


def test_summary_json_is_strict_when_no_fit_succeeds(tmp_path):
    """Every matrix failed: mean and median α are NaN in the record, null in summary.json."""
    f = tmp_path / "zeros.safetensors"
    save_file({"a.weight": torch.zeros(64, 32), "b.weight": torch.zeros(48, 32)}, f)
    r = llm_audit.audit(f, max_spectra=0)
    assert (r.summary.matrices_analysed, r.summary.matrices_failed) == (0, 2)
    assert math.isnan(r.summary.mean_alpha) and math.isnan(r.summary.median_alpha)
    r.write(tmp_path / "out", ("json", "md", "html"))
    s = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=_no_nan)
    assert list(s) == SUMMARY_KEYS and s["mean_alpha"] is None and s["median_alpha"] is None
    assert s == r.summary.to_json() == {**r.summary.as_dict(), "mean_alpha": None,
                                        "median_alpha": None}
    back = AuditSummary.from_dict(s)
    assert math.isnan(back.mean_alpha) and back.to_json() == s
    assert "| mean α |  |" in (tmp_path / "out" / "report.md").read_text()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llm_audit", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_missing_path_one_line_exit_2(tmp_path):
    p = run_cli(tmp_path / "nope.safetensors")
    assert p.returncode == 2
    assert p.stderr == (f"llm-audit: error: {tmp_path / 'nope.safetensors'}: no such file or "
                        "folder (give a .safetensors file, a model folder, or a hub id "
                        "org/name)\n")


def test_cli_not_safetensors_and_lying_header(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    p = run_cli(f)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"llm-audit: error: {f}: not a safetensors file (header is not "
                                "valid JSON: JSONDecodeError)")


def test_cli_writes_reports(demo, tmp_path):
    p = run_cli(demo, "--out", tmp_path / "o", "--quiet", "--no-randomize")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "layers.csv").is_file() and (tmp_path / "o" / "report.md").is_file()


def test_both_entry_points_take_options_or_keywords(tmp_path):
    import torch
    from safetensors.torch import save_file

    from llm_audit import AuditOptions, monitor_weights

    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    W[0, 0] = 60.0
    save_file({"fc.weight": W}, tmp_path / "m.safetensors")
    opts = AuditOptions(trap_rule="tw", seed=3)
    a = llm_audit.audit(tmp_path / "m.safetensors", options=opts, max_spectra=0).details
    b = llm_audit.audit(tmp_path / "m.safetensors", trap_rule="tw", seed=3, max_spectra=0).details
    m1 = monitor_weights({"fc.weight": W}, options=opts).layers[0]
    m2 = monitor_weights({"fc.weight": W}, trap_rule="tw", seed=3).layers[0]
    assert a.at[0, "max_rand_eval"] == b.at[0, "max_rand_eval"] == m1.max_rand_eval \
        == m2.max_rand_eval
    c = llm_audit.audit(tmp_path / "m.safetensors", options=opts, seed=4, max_spectra=0).details
    assert c.at[0, "max_rand_eval"] != a.at[0, "max_rand_eval"]  # keywords win


def test_cli_options_come_from_the_fields():
    from dataclasses import fields

    from llm_audit.options import AuditOptions, cli_flags

    assert [n for n, _, _ in cli_flags()] == [f.name for f in fields(AuditOptions)]
    flags = {n: (flag, kw) for n, flag, kw in cli_flags()}
    assert flags["randomize"][0] == "--no-randomize"
    assert flags["seed"][1]["default"] == AuditOptions().seed and flags["seed"][1]["type"] is int


def test_demo_takes_the_audit_options(tmp_path):
    from llm_audit.cli import main

    assert main(["demo", "--out", str(tmp_path), "--trap-rule", "tw", "--format", "csv,json",
                 "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "layers.csv", "summary.json", "traps.csv"]
