"""Resume: a killed audit continues with --resume without recomputing finished matrices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from llm_audit.cli import main
from llm_audit.journal import Journal
from llm_audit.records import TIMING_COLUMNS, MatrixResult

N_MATRICES = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    f = tmp_path_factory.mktemp("resume") / "model.safetensors"
    save_file({f"layers.{i}.fc.weight": torch.randn(200, 100, generator=g)
               for i in range(N_MATRICES)}, f)
    return f


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the kill
    return out


def test_kill_then_resume_computes_only_the_rest(ckpt, tmp_path):
    out = tmp_path / "out"
    rows = out / ".partial" / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "llm_audit", str(ckpt), "--out", str(out),
                             "--format", "csv", "-q"], env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if rows.is_file() and len(_lines(rows)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the audit finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {r["rows"][0]["name"] for r in _lines(rows)}
    assert 3 <= len(done) < N_MATRICES
    assert not (out / "layers.csv").exists()

    log = tmp_path / "log.jsonl"
    assert main([str(ckpt), "--out", str(out), "--format", "csv", "-q", "--resume",
                 "--log-json", str(log)]) == 0
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert events[0]["jobs_resumed"] == len(done)
    matrices = [e for e in events if e["event"] == "matrix"]
    assert {e["name"] for e in matrices if e["resumed"]} == done
    assert len([e for e in matrices if not e["resumed"]]) == N_MATRICES - len(done)

    full = tmp_path / "full"
    assert main([str(ckpt), "--out", str(full), "--format", "csv", "-q"]) == 0
    a = pd.read_csv(out / "layers.csv").drop(columns=list(TIMING_COLUMNS))
    b = pd.read_csv(full / "layers.csv").drop(columns=list(TIMING_COLUMNS))
    pd.testing.assert_frame_equal(a, b)
    assert not (out / ".partial").exists()


def _row(name):
    return MatrixResult(name=name, layer=0, module="fc", expert=None, N=4, M=2, dtype="F32",
                        alpha=2.5)


def test_journal_ignores_cut_lines_and_other_keys(tmp_path):
    with Journal(tmp_path) as j:
        j.record("k1", (_row("a"),))
        j.record("k2", (_row("b"), _row("c")))
    path = tmp_path / ".partial" / "rows.jsonl"
    path.write_text(path.read_text() + '{"key": "k3", "rows": [{"name": "d", "la')  # killed
    with Journal(tmp_path, resume=True) as j:
        assert [r.as_row()["alpha"] for r in j.cached("k1")] == [2.5]
        assert [r.name for r in j.cached("k2")] == ["b", "c"]
        assert j.cached("k3") is None and j.cached("other options") is None
    with Journal(tmp_path) as j:  # without resume: a fresh journal
        assert j.cached("k1") is None
    assert path.read_text() == ""


def test_job_key_depends_on_what_changes_results(ckpt):
    from llm_audit.journal import job_key
    from llm_audit.options import AuditOptions
    from llm_audit.pipeline import plan
    from llm_audit.source import open_checkpoint

    jobs, _ = plan(open_checkpoint(ckpt), AuditOptions())
    key = job_key(jobs[0], AuditOptions())
    assert key == job_key(jobs[0], AuditOptions(include="layers", device="cpu"))
    assert key != job_key(jobs[1], AuditOptions())
    for other in (dict(seed=1), dict(randomize=False), dict(trap_rule="tw"),
                  dict(fix_fingers="clip_xmax")):
        assert key != job_key(jobs[0], AuditOptions(**other))
