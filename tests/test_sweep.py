"""`llm-audit sweep`: step parsing and ordering, a 6-checkpoint series with traps planted from
checkpoint 4 on, resume and reuse, errors."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit.pipeline
from llm_audit.cli import main
from llm_audit.errors import SourceError, UsageError
from llm_audit.journal import PARTIAL_DIR, ROWS_FILE
from llm_audit.sweep import (
    KEY_FILE,
    TREND_COLUMNS,
    SweepItem,
    find_checkpoints,
    order_items,
    step_of,
    sweep,
)

STEPS = (100, 200, 300, 400, 500, 600)
TRAP_STEP = 400  # checkpoint 4: two outlier entries planted in fc1
FC1, FC2 = "layers.0.fc1.weight", "layers.1.fc2.weight"


def _write_series(root: Path) -> Path:
    """checkpoint-100 ... checkpoint-600 (HF Trainer style folders), 64×128 Gaussian fc1 and
    fc2; from checkpoint-400 on fc1 holds two ±40σ entries (each an `entries` trap)."""
    for k, step in enumerate(STEPS, 1):
        g = torch.Generator().manual_seed(k)
        fc1, fc2 = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
        if step >= TRAP_STEP:
            fc1[3, 5], fc1[10, 77] = 40.0, -40.0
        (root / f"checkpoint-{step}").mkdir(parents=True)
        save_file({FC1: fc1, FC2: fc2}, root / f"checkpoint-{step}" / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _write_series(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def swept(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return sweep([run_dir], out, device="cpu")


def _no_analysis(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a matrix was analysed")

    monkeypatch.setattr(llm_audit.pipeline, "executor_for", lambda opts: refuse)


# --- step parsing and ordering (pure) ---------------------------------------------------------

@pytest.mark.parametrize("name,step", [
    ("checkpoint-1200", 1200), ("step_0001200", 1200), ("global_step1200", 1200),
    ("step_000400020.safetensors", 400020), ("Checkpoint_7", 7), ("ckpt-30.pt", 30),
    ("iter_0042", 42), ("run3-global_step5", 5)])
def test_step_of_default_pattern(name, step):
    assert step_of(name) == step


def test_step_of_no_step_and_custom_regex():
    assert step_of("best.safetensors") is None
    assert step_of("model-epoch12-loss3", r"epoch(\d+)") == 12
    assert step_of("e12", r"\d+") == 12  # no group: the whole match
    with pytest.raises(UsageError) as e:
        step_of("epochX", r"epoch(\w)")
    assert str(e.value) == ("--step-regex 'epoch(\\w)' matched 'X' in 'epochX', not a number; "
                            "its first group must capture only the step's digits")


def _paths(*names):
    return [Path("/runs") / n for n in names]


def test_order_by_step_is_numeric():
    items = order_items(_paths("checkpoint-1200", "checkpoint-900", "checkpoint-10000"))
    assert [(i.step, i.folder) for i in items] == [
        (900, "checkpoint-900"), (1200, "checkpoint-1200"), (10000, "checkpoint-10000")]


def test_order_by_step_regex():
    items = order_items(_paths("a-e2", "a-e10", "a-e1"), "step", r"e(\d+)")
    assert [i.step for i in items] == [1, 2, 10]


def test_order_by_name_and_mtime():
    paths = _paths("checkpoint-900", "checkpoint-1200")
    assert [i.step for i in order_items(paths, "name")] == [1200, 900]  # names, parsed steps
    no_steps = _paths("b", "a", "c")
    assert [(i.name, i.step) for i in order_items(no_steps, "name")] == [
        ("a", 0), ("b", 1), ("c", 2)]  # no steps in the names: positions
    times = {"b": 3, "a": 2, "c": 1}
    items = order_items(no_steps, "mtime", mtime=lambda p: times[p.name])
    assert [(i.name, i.step) for i in items] == [("c", 0), ("a", 1), ("b", 2)]


def test_order_folders_unique_and_safe():
    items = order_items([Path("/x/step_1.safetensors"), Path("/y/step_1"),
                         Path("/z/a b$c")], "name")
    assert [i.folder for i in items] == ["a_b_c", "step_1", "step_1-2"]


def test_order_errors():
    with pytest.raises(UsageError) as e:
        order_items(_paths("checkpoint-1", "final"))
    assert str(e.value) == (
        "/runs/final: no step in the name 'final' by the default step pattern (checkpoint-N, "
        "step_N, global_stepN, ckpt-N, iter_N); give --step-regex with one group capturing the "
        "step, or --order name or --order mtime")
    with pytest.raises(UsageError) as e:
        order_items(_paths("a-e1", "b"), "step", r"e(\d+)")
    assert str(e.value).startswith("/runs/b: no step in the name 'b' by --step-regex 'e(\\d+)';")
    with pytest.raises(UsageError) as e:
        order_items(_paths("checkpoint-5", "step_005"))
    assert str(e.value) == ("/runs/checkpoint-5 and /runs/step_005 both have step 5; sweep each "
                            "run separately, or give --order name or --order mtime")
    with pytest.raises(UsageError, match="--order must be one of step, name, mtime"):
        order_items(_paths("checkpoint-5"), "size")


# --- finding the checkpoints -----------------------------------------------------------------

def test_find_checkpoints_run_folder_files_and_globs(tmp_path):
    snaps = tmp_path / "snapshots"  # the toy experiments' layout
    snaps.mkdir()
    for n in ("step_000000003.safetensors", "step_000000031.safetensors", "best.safetensors",
              "notes.txt"):
        (snaps / n).write_bytes(b"")
    got = find_checkpoints([snaps])
    assert [p.name for p in got] == ["step_000000003.safetensors", "step_000000031.safetensors"]
    assert [p.name for p in find_checkpoints([str(snaps / "*.safetensors")])] == [
        "best.safetensors", "step_000000003.safetensors", "step_000000031.safetensors"]
    single = tmp_path / "model"  # a folder without step-named children is one checkpoint
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"")
    assert find_checkpoints([single, single / "."]) == [single]
    with pytest.raises(SourceError, match="every input is inside --out"):
        find_checkpoints([snaps], out=snaps)


def test_find_checkpoints_errors(tmp_path, monkeypatch):
    pattern = str(tmp_path / "run" / "checkpoint-*")
    with pytest.raises(SourceError) as e:
        find_checkpoints([pattern])
    assert str(e.value) == (f"{pattern!r}: the pattern matches no file or folder; check it, "
                            "or quote it so the shell does not expand it")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as e:
        find_checkpoints(["ckpt-*"])
    assert str(e.value) == (f"'ckpt-*': the pattern matches no file or folder (relative to "
                            f"{tmp_path}); check it, or quote it so the shell does not expand it")
    with pytest.raises(SourceError) as e:
        find_checkpoints([tmp_path / "missing"])
    assert str(e.value) == (f"{tmp_path / 'missing'}: no such file or folder (sweep takes local "
                            "checkpoints: folders, files or glob patterns)")


# --- a series with a known trend -------------------------------------------------------------

def test_trend_csv_values(swept):
    trend = pd.read_csv(swept.out / "trend.csv")
    assert tuple(trend.columns) == TREND_COLUMNS
    assert len(trend) == 2 * len(STEPS)
    assert trend["step"].tolist() == [s for s in STEPS for _ in (FC1, FC2)]
    assert trend["checkpoint"].tolist() == [f"checkpoint-{s}" for s in STEPS for _ in (1, 2)]
    fc1 = trend[trend["name"] == FC1].set_index("step")
    fc2 = trend[trend["name"] == FC2].set_index("step")
    assert (fc1.loc[:TRAP_STEP - 1, "rand_num_spikes"] == 0).all()
    assert (fc1.loc[TRAP_STEP:, "rand_num_spikes"] > 0).all()
    assert (fc1.loc[TRAP_STEP:, "traps_entries"] == fc1.loc[TRAP_STEP:, "rand_num_spikes"]).all()
    assert (fc2["rand_num_spikes"] == 0).all()
    text = pd.read_csv(swept.out / "trend.csv", dtype=str, keep_default_na=False)
    for step in STEPS:  # the trend's rows are each checkpoint's own layers.csv, as written
        own = pd.read_csv(swept.out / f"checkpoint-{step}" / "layers.csv", dtype=str,
                          keep_default_na=False)
        pd.testing.assert_frame_equal(
            text[text["step"] == str(step)].drop(columns=["step", "checkpoint"])
            .reset_index(drop=True), own)
    assert [e.total_traps > 0 for e in swept.entries] == [s >= TRAP_STEP for s in STEPS]
    assert [e.failing for e in swept.entries] == [() if s < TRAP_STEP else (FC1,) for s in STEPS]


def test_first_hit_step(swept):
    hits = swept.first_hits
    assert hits[["condition", "name", "step"]].values.tolist() == [
        ["rand_num_spikes>0", FC1, TRAP_STEP]]
    data = json.loads((swept.out / "trend.json").read_text())
    assert data["first_hits"][0]["step"] == TRAP_STEP
    assert [c["step"] for c in data["checkpoints"]] == list(STEPS)
    assert data["conditions"] == ["rand_num_spikes>0", "alpha<2"] and not data["fail_on"]
    assert not swept.failed  # the default conditions only report


def test_trend_html_is_self_contained(swept):
    html = (swept.out / "trend.html").read_text()
    assert f"first rand_num_spikes&gt;0 at step {TRAP_STEP}: {FC1}" in html
    assert "alpha&lt;2: never" in html
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 2
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert [r for r in refs if not r.startswith("data:")] == [
        f"checkpoint-{s}/report.html" for s in STEPS]  # links to each checkpoint's report
    assert "<link" not in html and "http://" not in html and "https://" not in html
    assert "<script src" not in html and "@import" not in html
    for s in STEPS:
        assert (swept.out / f"checkpoint-{s}" / "report.html").is_file()


def test_trend_md(swept):
    md = (swept.out / "trend.md").read_text()
    assert "| 300 | `checkpoint-300` |" in md
    assert f"| 400 | `checkpoint-400` | {swept.entries[3].mean_alpha:.4g} | 10 | 1: `{FC1}` |" \
        in md
    assert f"- `rand_num_spikes>0`: first at step {TRAP_STEP}" in md
    assert "- `alpha<2`: never" in md


def test_fail_on_first_step_per_matrix(swept, run_dir, monkeypatch):
    _no_analysis(monkeypatch)  # same options: every checkpoint is reused
    r = sweep([run_dir], swept.out, device="cpu", fail_on="rand_num_spikes>5,alpha<100")
    assert r.failed
    hits = r.first_hits.set_index(["condition", "name"])["step"].to_dict()
    assert hits == {("rand_num_spikes>5", FC1): TRAP_STEP, ("alpha<100", FC1): 100,
                    ("alpha<100", FC2): 100}


# --- resume and reuse -------------------------------------------------------------------------

def test_second_sweep_reuses_everything(swept, run_dir, monkeypatch):
    before = (swept.out / "trend.csv").read_text()
    _no_analysis(monkeypatch)
    monkeypatch.setattr(llm_audit.pipeline, "audit", lambda *a, **k: pytest.fail("audited"))
    again = sweep([run_dir], swept.out, device="cpu")
    assert all(e.reused for e in again.entries) and not any(e.reused for e in swept.entries)
    assert (swept.out / "trend.csv").read_text() == before
    key = json.loads((swept.out / "checkpoint-100" / KEY_FILE).read_text())
    assert set(key) == {"key", "source", "formats"}
    assert not (swept.out / "checkpoint-100" / PARTIAL_DIR).exists()


def test_other_options_or_changed_bytes_are_audited_again(run_dir, tmp_path):
    one = [run_dir / "checkpoint-100"]
    first = sweep(one, tmp_path, device="cpu", formats=("csv",))
    assert not sweep(one, tmp_path, device="cpu", seed=1, formats=("csv",)).entries[0].reused
    assert not sweep(one, tmp_path, device="cpu", formats=("csv",)).entries[0].reused  # seed 0
    assert sweep(one, tmp_path, device="cpu", formats=("csv",)).entries[0].reused
    assert not sweep(one, tmp_path, device="cpu", formats=("csv", "md")).entries[0].reused
    assert first.trend["alpha"].notna().all()


def test_interrupted_checkpoint_resumes_from_its_journal(run_dir, tmp_path, monkeypatch):
    """A sweep killed inside checkpoint-200's audit: its journal holds one of two jobs; the next
    sweep analyses only the other one."""
    folder = tmp_path / "checkpoint-200"
    llm_audit.pipeline.audit(run_dir / "checkpoint-200", workdir=folder, device="cpu",
                             max_spectra=0)
    journal = folder / PARTIAL_DIR / ROWS_FILE
    journal.write_text(journal.read_text().splitlines()[0] + "\n")
    analysed = []
    real = llm_audit.pipeline.executor_for

    def counting(opts):
        def run(jobs, *a, **k):
            analysed.extend(j.name for j in jobs)
            return real(opts)(jobs, *a, **k)
        return run

    monkeypatch.setattr(llm_audit.pipeline, "executor_for", counting)
    r = sweep([run_dir / "checkpoint-200"], tmp_path, device="cpu", formats=("csv",))
    assert analysed == [FC2] and not r.entries[0].reused
    assert pd.read_csv(folder / "layers.csv")["name"].tolist() == [FC1, FC2]
    assert not (folder / PARTIAL_DIR).exists()


# --- errors and the command line -------------------------------------------------------------

def test_out_inside_a_checkpoint_is_refused(run_dir):
    ckpt = run_dir / "checkpoint-100"
    with pytest.raises(UsageError) as e:
        sweep([ckpt], ckpt / "reports", device="cpu")
    assert str(e.value) == (f"--out {ckpt / 'reports'} is inside the checkpoint {ckpt}; writing "
                            "there would change the input; choose another folder")


def test_cli(swept, run_dir, monkeypatch, capsys, tmp_path):
    _no_analysis(monkeypatch)
    monkeypatch.chdir(tmp_path)  # the default --out is relative
    args = ["sweep", str(run_dir), "--out", str(swept.out), "--device", "cpu"]
    assert main([*args, "-q", "--fail-on", "rand_num_spikes>0"]) == 1
    err = capsys.readouterr().err
    assert err == (f"llm-audit: fail-on: first rand_num_spikes>0 at step {TRAP_STEP}: {FC1}; "
                   "1 matrix in all\n")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"[4/6] step {TRAP_STEP} checkpoint-400: reused, mean alpha" in err
    assert "llm-audit: first: alpha<2: never" in err
    assert main(["sweep", str(run_dir / "nothing-*"), "-q"]) == 2
    assert capsys.readouterr().err == (
        f"llm-audit: error: {str(run_dir / 'nothing-*')!r}: the pattern matches no file or "
        "folder; check it, or quote it so the shell does not expand it\n")
    assert main(["sweep", str(run_dir), "--step-regex", r"epoch(\d+)", "-q"]) == 2
    assert capsys.readouterr().err.startswith(
        f"llm-audit: error: {run_dir}: no step in the name {run_dir.name!r} by --step-regex")


def test_item_name():
    assert SweepItem(Path("/r/step_5.safetensors"), 5, "step_5").name == "step_5.safetensors"


def test_sweep_in_processes_equals_serial(run_dir, swept, tmp_path):
    """--executor processes:2 audits whole checkpoints on two workers: same trend."""
    par = sweep([run_dir], tmp_path / "par", device="cpu", executor="processes:2")
    assert tuple(e.item.step for e in par.entries) == STEPS
    timing = [c for c in TREND_COLUMNS if c.endswith("seconds")]
    pd.testing.assert_frame_equal(
        pd.read_csv(par.out / "trend.csv").drop(columns=timing),
        pd.read_csv(swept.out / "trend.csv").drop(columns=timing))
