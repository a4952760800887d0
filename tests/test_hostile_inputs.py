"""Issue 17's hostile and faulty inputs: each one exits with one line naming the file and the
problem (exit 2), never a traceback, nothing written outside --out, no earlier report lost."""

import json
import os
import re
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit.cli import main
from llm_audit.errors import AuditError
from llm_audit.failon import parse_fail_on
from llm_audit.journal import Journal
from llm_audit.options import AuditOptions


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    save_file({"layers.0.fc.weight": _w(64, 32), "layers.1.fc.weight": _w(64, 32, seed=1)},
              d / "model.safetensors")
    return d


# -- consent and data integrity (source, journal) ---------------------------------------------

def test_index_never_routes_to_a_pickle_without_consent(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"fc.weight": _w(16, 16)}, d / "weights.bin")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"fc.weight": "weights.bin"}}))
    assert main([str(d), "--out", str(tmp_path / "o"), "-q"]) == 2
    (line,) = _err(capsys)
    assert line == (f"llm-audit: error: {d / 'model.safetensors.index.json'}: maps tensors to "
                    "the pickle file 'weights.bin'; pickles are not opened by default (unpickling "
                    "runs code): convert it to safetensors or pass --allow-pickle")
    assert not (tmp_path / "o" / "layers.csv").exists()
    # with consent it is read (weights_only) and routed by the index
    d2 = llm_audit.audit(d, allow_pickle=True, max_spectra=0).details
    assert list(d2["name"]) == ["fc.weight"]


def test_index_shard_in_a_subfolder(tmp_path):
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    save_file({"fc.weight": _w(32, 16)}, d / "sub" / "s1.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"fc.weight": "sub/s1.safetensors"}}))
    assert list(llm_audit.audit(d, max_spectra=0).details["name"]) == ["fc.weight"]


def test_duplicate_tensor_across_unindexed_shards_is_refused(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"fc.weight": _w(32, 16)}, d / "a.safetensors")
    save_file({"fc.weight": _w(32, 16, seed=2)}, d / "b.safetensors")
    assert main([str(d), "--out", str(tmp_path / "o"), "-q"]) == 2
    (line,) = _err(capsys)
    assert line.startswith(f"llm-audit: error: {d}: tensor 'fc.weight' is in both ")
    assert "model.safetensors.index.json" in line


def _audit_csv(src, out):
    assert main([str(src), "--out", str(out), "-q", "--format", "csv"]) == 0
    return pd.read_csv(out / "layers.csv").set_index("name")


def _interrupted_journal(src, out):
    """A journal as an interrupted audit of `src` leaves it (one finished job)."""
    from llm_audit.pipeline import iter_audit, plan
    from llm_audit.source import open_checkpoint

    opts = AuditOptions()
    jobs, _ = plan(open_checkpoint(src), opts)
    with Journal(out) as j:
        list(iter_audit(jobs[:1], opts, journal=j))


def test_resume_does_not_reuse_rows_of_another_checkpoint(tmp_path, model):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"layers.0.fc.weight": _w(64, 32, seed=9) * 3,
               "layers.1.fc.weight": _w(64, 32, seed=1)}, other / "model.safetensors")
    out = tmp_path / "out"
    _interrupted_journal(model / "model.safetensors", out)
    assert main([str(other / "model.safetensors"), "--out", str(out), "--resume", "-q",
                 "--format", "csv"]) == 0
    got = pd.read_csv(out / "layers.csv").set_index("name")
    ref = _audit_csv(other / "model.safetensors", tmp_path / "ref")
    assert got.at["layers.0.fc.weight", "lambda_max"] == ref.at["layers.0.fc.weight",
                                                                "lambda_max"]


def test_resume_recomputes_a_checkpoint_rewritten_in_place(tmp_path, model):
    f = model / "model.safetensors"
    out = tmp_path / "out"
    _interrupted_journal(f, out)
    time.sleep(0.01)
    save_file({"layers.0.fc.weight": _w(64, 32, seed=5) * 2,
               "layers.1.fc.weight": _w(64, 32, seed=1)}, f)  # same names, shapes, size
    assert main([str(f), "--out", str(out), "--resume", "-q", "--format", "csv"]) == 0
    got = pd.read_csv(out / "layers.csv").set_index("name")
    ref = _audit_csv(f, tmp_path / "ref")
    assert got.at["layers.0.fc.weight", "lambda_max"] == ref.at["layers.0.fc.weight",
                                                                "lambda_max"]


def test_resume_over_a_damaged_journal_line(tmp_path, model, caplog):
    out = tmp_path / "out"
    _interrupted_journal(model / "model.safetensors", out)
    rows = out / ".partial" / "rows.jsonl"
    rows.write_bytes(rows.read_bytes() + b"\xff\xfe\x00garbage\xc3\n")
    j = Journal(out, resume=True)
    j.__exit__(None, None, None)
    assert len(j.done) == 1  # the good line is kept
    assert "1 damaged or incomplete line(s) ignored" in caplog.text
    assert main([str(model), "--out", str(out), "--resume", "-q", "--format", "csv"]) == 0


def test_log_json_may_not_overwrite_the_checkpoint(tmp_path, model, capsys):
    f = model / "model.safetensors"
    before = f.read_bytes()
    assert main([str(f), "--out", str(tmp_path / "o"), "-q", "--log-json", str(f)]) == 2
    assert _err(capsys) == [f"llm-audit: error: --log-json {f}: is a file of the checkpoint "
                            f"being audited ({f}); writing it would destroy the input; choose "
                            "another path"]
    assert f.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_log_json_on_a_full_disk_names_the_file(tmp_path, model, capsys):
    assert main([str(model), "--out", str(tmp_path / "o"), "-q", "--log-json",
                 "/dev/full"]) == 2
    assert _err(capsys) == ["llm-audit: error: /dev/full: No space left on device"]


# -- injection through tensor names (report, terminal) ----------------------------------------

HOSTILE = {"a\rb.weight": 1, "x\x1b]8;;http://evil\x07y.weight": 2,
           "z\nllm-audit: fail-on: nothing matched, safe to merge\n.weight": 3,
           "![t](https://e/p.png)|<img src=x onerror=alert(1)>.weight": 4}


@pytest.fixture
def hostile(tmp_path):
    f = tmp_path / "h.safetensors"
    tensors = {name: _w(48, 24, seed=s) for name, s in HOSTILE.items()}
    tensors["x" * 1_000_000] = _w(48, 24, seed=9)
    W = _w(48, 24, seed=8)
    W[0, 0] = 80.0  # a trap: listed by --fail-on
    tensors["t\r\x1b[31m.weight"] = W
    save_file(tensors, f)
    return f


def test_hostile_names_stay_in_their_cells_and_lines(tmp_path, hostile, capsys):
    out = tmp_path / "o"
    t0 = time.perf_counter()
    code = main([str(hostile), "--out", str(out), "--fail-on", "rand_num_spikes>0"])
    assert time.perf_counter() - t0 < 90  # the megabyte name does not hang the figures
    assert code == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err
    fail_lines = [ln for ln in err.splitlines() if ln.startswith("llm-audit: fail-on:")]
    # (24 columns < 100: WeightWatcher's rule pools 5 shuffles, the outlier is in each)
    assert fail_lines == ["llm-audit: fail-on: t\\x0d\\x1b[31m.weight: rand_num_spikes=5 "
                          "(rand_num_spikes>0)"]
    assert all(len(ln) <= 700 for ln in err.splitlines())
    back = pd.read_csv(out / "layers.csv")  # every name comes back whole, one row each
    assert len(back) == len(HOSTILE) + 2 and set(HOSTILE) <= set(back["name"])
    md = (out / "report.md").read_text()
    assert "\r" not in md and "\x1b" not in md
    outside_code = re.sub(r"`[^`]*`", "", md)  # code spans show text literally
    assert "![t](" not in outside_code
    assert re.search(r"(?<!\\)<img", outside_code) is None  # only as the escaped \<img
    for line in md.splitlines():
        if line.startswith("| `"):
            assert len(line) < 5000 and line.endswith("|")


def test_echoed_values_are_cut(tmp_path, capsys):
    from .conftest import write_safetensors_raw

    f = write_safetensors_raw(tmp_path / "big.safetensors",
                              {"w" * 2_000_000: {"dtype": "F32", "shape": [2, 2],
                                                 "data_offsets": [0, 3]}}, b"\0" * 3)
    assert main([str(f), "--out", str(tmp_path / "o")]) == 2
    (line,) = _err(capsys)
    assert len(line) <= 700 and line.startswith(f"llm-audit: error: {f}: tensor 'www")


# -- unbounded work from input (options, failon) ----------------------------------------------

def test_include_regex_cannot_backtrack(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a" * 34 + "!": _w(16, 16), "aaa": _w(16, 16)}, f)
    t0 = time.perf_counter()
    d = llm_audit.audit(f, include="(a+)+$", max_spectra=0, randomize=False).details
    assert time.perf_counter() - t0 < 30 and list(d["name"]) == ["aaa"]


def test_unsupported_regex_is_a_usage_error(tmp_path, model, capsys):
    assert main([str(model), "--out", str(tmp_path / "o"), "--include", r"(a)\1"]) == 2
    (line,) = _err(capsys)
    assert line.startswith("llm-audit: error: --include '(a)\\\\1' is not a regular expression "
                           "the linear-time matcher accepts")


def test_fail_on_parser_is_linear():
    t0 = time.perf_counter()
    with pytest.raises(AuditError, match="cannot parse"):
        parse_fail_on("alpha<" + "1" * 40_000 + "x")
    assert time.perf_counter() - t0 < 1.0
    assert parse_fail_on("alpha<" + "1" * 400)[0].value == float("1" * 400)


# -- tracebacks where a one-line error is due ---------------------------------------------------

@pytest.mark.parametrize("config,message", [
    ("{not json", "not valid JSON (JSONDecodeError); fix or remove it"),
    ("[1, 2]", "must be a JSON object, got list; fix or remove it"),
    ("null", "must be a JSON object, got NoneType; fix or remove it"),
])
def test_bad_config_json(model, tmp_path, capsys, config, message):
    (model / "config.json").write_text(config)
    assert main([str(model), "--out", str(tmp_path / "o")]) == 2
    assert _err(capsys) == [f"llm-audit: error: {model / 'config.json'}: {message}"]


def test_deeply_nested_index(model, tmp_path, capsys):
    (model / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main([str(model), "--out", str(tmp_path / "o")]) == 2
    assert _err(capsys) == [f"llm-audit: error: {model / 'model.safetensors.index.json'}: not "
                            "an index (JSON nested too deeply)"]


def test_deeply_nested_pickle(tmp_path, capsys):
    import sys

    obj: dict = {"w": _w(16, 16)}
    for _ in range(3000):
        obj = {"x": obj}
    f = tmp_path / "deep.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # for torch.save itself
    try:
        torch.save(obj, f)
    finally:
        sys.setrecursionlimit(limit)
    assert main([str(f), "--out", str(tmp_path / "o"), "--allow-pickle"]) == 2
    (line,) = _err(capsys)
    assert line.startswith(f"llm-audit: error: {f}: ")


def test_weight_block_size_as_a_number_is_a_skipped_tensor(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"fc.weight": _w(256, 256).to(torch.float8_e4m3fn),
               "fc.weight_scale_inv": torch.ones(2, 2)}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}}))
    r = llm_audit.audit(d, max_spectra=0)
    assert list(r.skipped["reason"]) == [
        "weight_block_size 128 is not supported (only [128, 128])"]


def test_empty_compressed_tensors_scale_is_a_skipped_tensor(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"fc.weight": _w(64, 64).to(torch.float8_e4m3fn),
               "fc.weight_scale": torch.ones(64, 0)}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "compressed-tensors"}}))
    r = llm_audit.audit(d, max_spectra=0)
    assert len(r.skipped) == 1 and r.details.empty


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_unsupported_device_before_any_io(tmp_path, capsys, device):
    assert main([str(tmp_path / "missing"), "--device", device]) == 2
    assert _err(capsys) == [f"llm-audit: error: --device '{device}' is not supported (use "
                            "auto, cpu or cuda[:i])"]


def _layers_csv(folder, names, traps):
    folder.mkdir()
    pd.DataFrame({"name": names, "alpha": [2.0] * len(names), "rand_num_spikes": traps,
                  "log_norm": [1.0] * len(names), "status": ["ok"] * len(names)}
                 ).to_csv(folder / "layers.csv", index=False)
    return folder


def test_diff_numeric_names_and_bad_counts(tmp_path, capsys):
    a = _layers_csv(tmp_path / "a", ["0", "1"], [0, 1])
    b = _layers_csv(tmp_path / "b", ["0", "1e3"], [2, 1])
    assert main(["diff", str(a), str(b), "--out", str(tmp_path / "d"), "-q"]) == 0
    t = pd.read_csv(tmp_path / "d" / "diff.csv", dtype={"name": str})
    assert list(t["name"]) == ["0"] and int(t["d_traps"][0]) == 2
    c = _layers_csv(tmp_path / "c", ["0"], [float("inf")])
    assert main(["diff", str(a), str(c), "--out", str(tmp_path / "e")]) == 2
    assert _err(capsys)[-1] == (f"llm-audit: error: {c / 'layers.csv'}: row 2: rand_num_spikes "
                                "inf is not a count (a whole number >= 0); the file is not an "
                                "llm-audit layers.csv or was edited")
