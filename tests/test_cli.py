"""The CLI contract of issue 4: --format, --fail-on, exit codes, hostile input via the CLI."""

import json
import struct
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from llm_audit.cli import main
from llm_audit.errors import UsageError
from llm_audit.failon import Condition, find_matches, parse_fail_on

from .conftest import write_safetensors_raw


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Three small matrices: one with a planted huge entry (a trap), two Gaussian."""
    g = torch.Generator().manual_seed(0)
    trapped = torch.randn(96, 48, generator=g)
    trapped[5, 7] = 80.0
    f = tmp_path_factory.mktemp("small") / "model.safetensors"
    save_file({"layers.0.q.weight": torch.randn(96, 48, generator=g),
               "layers.1.q.weight": trapped,
               "layers.2.q.weight": torch.randn(96, 48, generator=g)}, f)
    return f


def run(args, capsys):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.err


def test_parse_fail_on():
    assert parse_fail_on("rand_num_spikes>0") == (Condition("rand_num_spikes", ">", 0.0),)
    assert parse_fail_on(" alpha < 2 , D>=0.5,alpha!=3e0") == (
        Condition("alpha", "<", 2.0), Condition("D", ">=", 0.5), Condition("alpha", "!=", 3.0))


@pytest.mark.parametrize("expr, message", [
    ("alpha<<2", "--fail-on: cannot parse 'alpha<<2': expected 'column op number' with op one "
                 "of < <= > >= == !="),
    ("bogus>1", "--fail-on: 'bogus' is not a column of layers.csv"),
    ("name==3", "--fail-on: column 'name' is not numeric"),
    ("alpha<two", "--fail-on: cannot parse 'alpha<two': expected 'column op number' with op one "
                  "of < <= > >= == !="),
    ("alpha<2,", "--fail-on: cannot parse '': expected 'column op number' with op one of < <= > "
                 ">= == !="),
    ("__import__('os')>1", "--fail-on: cannot parse \"__import__('os')>1\": expected 'column op "
                           "number' with op one of < <= > >= == !="),
])
def test_parse_fail_on_errors(expr, message):
    with pytest.raises(UsageError) as e:
        parse_fail_on(expr)
    assert str(e.value) == message


def test_find_matches_or_and_nan():
    d = pd.DataFrame({"name": ["a", "b", "c"], "alpha": [1.5, float("nan"), 3.0],
                      "rand_num_spikes": [0, 2, 0]})
    got = find_matches(d, parse_fail_on("rand_num_spikes>0,alpha<2"))
    assert [str(m) for m in got] == ["a: alpha=1.5 (alpha<2)", "b: rand_num_spikes=2 "
                                     "(rand_num_spikes>0)"]
    assert [m.name for m in find_matches(d, parse_fail_on("alpha!=3"))] == ["a"]  # NaN: no match


def test_fail_on_exit_1_lists_matches(small, tmp_path, capsys):
    code, err = run([small, "--out", tmp_path, "--format", "csv,json", "-q",
                     "--fail-on", "rand_num_spikes>0"], capsys)
    assert code == 1
    assert err.splitlines() == ["llm-audit: fail-on: layers.1.q.weight: rand_num_spikes=5 "
                                "(rand_num_spikes>0)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.csv", "summary.json", "traps.csv"]


def test_fail_on_no_match_exit_0(small, tmp_path, capsys):
    code, err = run([small, "--out", tmp_path, "--format", "json", "-q",
                     "--fail-on", "alpha<0,rand_num_spikes>5"], capsys)
    assert (code, err) == (0, "")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("args, message", [
    (["--fail-on", "nope>1"], "llm-audit: error: --fail-on: 'nope' is not a column of layers.csv"),
    (["--format", "md,pdf"], "llm-audit: error: --format: unknown format 'pdf'; choose from "
                             "md,html,csv,json"),
    (["--trap-rule", "xx"], "llm-audit: error: Invalid value for '--trap-rule': 'xx' is not one "
                            "of 'ww', 'tw', 'perm'."),
])
def test_usage_errors_exit_2(small, tmp_path, capsys, args, message):
    code, err = run([small, "--out", tmp_path, *args], capsys)
    assert (code, err.splitlines()) == (2, [message])
    assert not (tmp_path / "layers.csv").exists()


def _hostile_files(d):
    """name -> (path, expected one-line error after 'llm-audit: error: ')."""
    out = {}
    f = d / "truncated.safetensors"
    save_file({"w": torch.ones(8, 8)}, f)
    f.write_bytes(f.read_bytes()[:-100])
    out["truncated"] = (f, f"{f}: tensor 'w': data ends at byte {f.stat().st_size + 100} but the "
                           f"file has {f.stat().st_size} bytes (truncated download?)")
    f = d / "huge_header.safetensors"
    f.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    out["absurd header size"] = (f, f"{f}: not a safetensors file or truncated (header claims "
                                    f"{2**62} bytes, file has 10); re-download the file")
    f = write_safetensors_raw(d / "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        "b": {"dtype": "F32", "shape": [2, 4], "data_offsets": [16, 48]}}, b"\0" * 48)
    out["overlap"] = (f, f"{f}: tensor 'b' overlaps tensor 'a'; the header is corrupt")
    f = write_safetensors_raw(d / "outside.safetensors", {
        "a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [2**40, 2**40 + 32]}}, b"\0" * 32)
    out["offsets outside"] = (f, f"{f}: tensor 'a': data ends at byte "
                                 f"{f.stat().st_size - 32 + 2**40 + 32} but the file has "
                                 f"{f.stat().st_size} bytes (truncated download?)")
    f = d / "bad.pt"
    torch.save({"w": torch.ones(4, 4)}, f)
    out["pickle"] = (f, f"{f}: pickle checkpoints are not opened by default (unpickling runs "
                        "code); convert to safetensors or pass --allow-pickle")
    return out


def test_hostile_files_exit_2_one_line(tmp_path, capsys):
    for what, (path, message) in _hostile_files(tmp_path).items():
        code, err = run([path, "--out", tmp_path / "out", "-q"], capsys)
        assert (what, code, err) == (what, 2, f"llm-audit: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_hostile_file_in_a_real_process_has_no_traceback(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 30) + b'{"w": [1, 2, 3]}' + b" " * 14)
    p = subprocess.run([sys.executable, "-m", "llm_audit", str(f), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr == (f"llm-audit: error: {f}: tensor 'w': header entry is not an object\n")
    p = subprocess.run([sys.executable, "-m", "llm_audit", str(f), "--debug"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr  # --debug shows it


def test_log_json_lines(small, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    code, _ = run([small, "--out", tmp_path / "o", "--format", "csv", "-q", "--log-json", log],
                  capsys)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert code == 0
    assert [x["event"] for x in lines] == ["start", "matrix", "matrix", "matrix", "end"]
    assert lines[0]["jobs"] == 3 and lines[0]["bytes"] == 3 * 96 * 48 * 4
    assert [x["name"] for x in lines[1:4]] == [f"layers.{i}.q.weight" for i in range(3)]
    assert lines[2]["rand_num_spikes"] == 5 and lines[3]["bytes_done"] == 3 * 96 * 48 * 4
    assert lines[-1]["exit_code"] == 0 and lines[-1]["matrices_analysed"] == 3
    assert not (tmp_path / "o" / ".partial").exists()  # the journal goes once reports exist
