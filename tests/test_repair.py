"""llm_audit.repair: traps removed by each method, the checkpoint layout kept, the source safe."""

import hashlib

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from llm_audit import AuditOptions, monitor_weights, repair, repair_weights
from llm_audit.anatomy import clip_level
from llm_audit.cli import main
from llm_audit.errors import UsageError
from llm_audit.trap_repair import REPAIR_COLUMNS, repair_matrix

from .checkpoints import write_sharded

OPTS = AuditOptions(device="cpu")
PLANTED = [(3, 5), (10, 700), (150, 20)]


@pytest.fixture
def planted(gen):
    W = torch.randn(200, 784, generator=gen, dtype=torch.float64)
    for k, (i, j) in enumerate(PLANTED):
        W[i, j] = 50.0 + 5 * k
    return W


def _traps(W, rule="ww", seed=0):
    opts = AuditOptions(device="cpu", trap_rule=rule, seed=seed)
    return monitor_weights({"w.weight": W}, options=opts).layers[0].rand_num_spikes


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_clip_winsorizes_exactly_the_outliers(planted, gen, rule):
    opts = AuditOptions(device="cpu", trap_rule=rule)
    new, rec = repair_matrix(planted, opts, name="w.weight", method="clip")
    assert (rec.traps_before, rec.traps_targeted, rec.entries_touched) == (3, 3, 3)
    changed = {tuple(ij) for ij in torch.nonzero(new != planted).tolist()}
    assert changed == set(PLANTED)
    level = clip_level(planted, gen)
    mean = float(planted.mean())
    for i, j in PLANTED:
        assert float(new[i, j]) == pytest.approx(mean + level)
    assert _traps(new, rule) == 0
    assert _traps(new, rule, seed=7) == 0  # gone for another shuffle too, not only this one


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_subtract_removes_the_traps_of_that_shuffle(planted, rule):
    opts = AuditOptions(device="cpu", trap_rule=rule)
    new, rec = repair_matrix(planted, opts, name="w.weight", method="subtract")
    assert rec.traps_targeted == 3 and _traps(new, rule) == 0
    # ΔW is the removed components, concentrated on the planted entries (in ‖·‖²): a spike
    # θ = 50 in this noise has singular vectors overlapping its entry by |⟨u,e⟩⟨v,e⟩|² ≈ 0.67
    delta = new - planted
    assert all(float(delta[i, j].abs()) > 40 for i, j in PLANTED)
    on = sum(float(delta[i, j]) ** 2 for i, j in PLANTED)
    assert on > 0.6 * float((delta ** 2).sum())


def test_mean_trap_is_repaired_only_when_asked(gen):
    W = torch.randn(200, 784, generator=gen, dtype=torch.float64) + 0.1
    same, rec = repair_matrix(W, OPTS, name="w.weight")  # default classes: entries, tail
    assert rec.traps_before == 1 and rec.traps_targeted == 0 and same is W
    for method in ("clip", "subtract"):
        new, rec = repair_matrix(W, OPTS, name="w.weight", method=method, classes=("mean",))
        assert rec.traps_targeted == 1 and _traps(new) == 0
        assert abs(float(new.mean())) < 0.01


def test_gaussian_is_left_alone(gen):
    W = torch.randn(100, 300, generator=gen)
    new, rec = repair_matrix(W, OPTS, name="w.weight", method="subtract")
    assert new is W and rec.entries_touched == 0 and rec.rel_change == 0.0


def test_repair_weights_on_a_state_dict(planted):
    state = {"a.weight": planted.float(), "a.bias": torch.ones(200), "b.weight": planted[:8, :8]}
    new, table = repair_weights(state, options=OPTS)
    assert list(table["name"]) == ["a.weight", "b.weight"]
    assert new["a.weight"].dtype == torch.float32 and torch.equal(new["a.bias"], state["a.bias"])
    assert int(table.set_index("name").at["a.weight", "entries_touched"]) == 3


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_repair_keeps_layout_and_source(tmp_path, planted, capsys):
    src = write_sharded(tmp_path / "model",
                        [("layers.0.fc.weight", planted.to(torch.bfloat16)),
                         ("layers.0.fc.bias", torch.zeros(200)),
                         ("layers.1.fc.weight", torch.randn(128, 256, dtype=torch.float64))],
                        cuts=[2], config={"model_type": "toy"})
    (src / "tokenizer.json").write_text("{}")
    before = {p.name: _sha(p) for p in src.iterdir()}
    out = tmp_path / "fixed"
    assert main([str(src), "--out", str(tmp_path / "a"), "-q", "--format", "csv"]) == 0
    assert main(["repair", str(src), "--out", str(out), "-q"]) == 0
    assert {p.name: _sha(p) for p in src.iterdir()} == before  # the source is untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*before, "repair.csv", "repair_audit"])
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        assert (out / name).read_text() == (src / name).read_text()
    fixed = {**load_file(str(out / "model-00001-of-00002.safetensors")),
             **load_file(str(out / "model-00002-of-00002.safetensors"))}
    assert fixed["layers.0.fc.weight"].dtype == torch.bfloat16
    assert fixed["layers.1.fc.weight"].dtype == torch.float64
    table = pd.read_csv(out / "repair.csv")
    assert list(table.columns) == list(REPAIR_COLUMNS)
    row = table.set_index("name").loc["layers.0.fc.weight"]
    assert (row.traps_before, row.traps_targeted, row.traps_after) == (3, 3, 0)
    assert (out / "repair_audit" / "layers.csv").exists()
    assert capsys.readouterr().err == ""


def test_repair_refuses_to_write_into_the_source(tmp_path, planted, capsys):
    src = write_sharded(tmp_path / "model", [("fc.weight", planted.float())], cuts=[],
                        config={})
    assert main(["repair", str(src), "--out", str(src / "fixed")]) == 2
    assert capsys.readouterr().err == (
        f"llm-audit: error: --out {src / 'fixed'}: inside the source {src}; repair never "
        "writes into the checkpoint it reads (choose a folder outside it)\n")
    with pytest.raises(UsageError, match="unknown trap class 'outliers'"):
        repair(src, tmp_path / "x", classes="entries,outliers")
    assert main(["repair", str(src), "--out", str(tmp_path / "y"), "--method", "zap"]) == 2
