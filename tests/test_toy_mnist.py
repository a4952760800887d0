"""End to end: the MNIST smoke preset on the real IDX files (skipped when they are absent)."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from llm_audit import monitor_weights
from toy_experiments.__main__ import main
from toy_experiments.measure import log_schedule
from toy_experiments.mnist import HISTORY_COLUMNS, LAYER_COLUMNS, PRESETS, make_model

from .conftest import SHARED

MNIST = SHARED / "data" / "mnist"
pytestmark = pytest.mark.skipif(not (MNIST / "t10k-labels-idx1-ubyte.gz").exists(),
                                reason="no MNIST IDX files in ../shared/data/mnist")

EXPECTED_HISTORY = ["step", "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha",
                    "num_traps", "l2_norm", "activation_sparsity", "abs_weight_entropy",
                    "circuit_complexity"]


def test_init_is_default_times_eight():
    m = make_model(0, torch.float64, torch.device("cpu"), init_scale=8.0).requires_grad_(False)
    assert m.fc1.weight.shape == (200, 784) and m.fc1.weight.dtype == torch.float64
    bound = 8.0 / 28.0  # 8 / sqrt(784)
    assert float(m.fc1.weight.abs().max()) <= bound
    assert float(m.fc1.weight.std()) == pytest.approx(bound / 3**0.5, rel=0.02)
    assert torch.equal(m.fc2.weight, make_model(0, torch.float64, torch.device("cpu")).fc2.weight)


def test_smoke_run_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["mnist", "--preset", "smoke", "--out", str(out), "--data-dir", str(MNIST),
            "--seed", "0", "--device", "cpu"]
    assert main(args) == 0
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == EXPECTED_HISTORY == list(HISTORY_COLUMNS)
    steps = log_schedule(PRESETS["smoke"].steps, PRESETS["smoke"].per_decade)
    assert list(hist["step"]) == steps
    assert hist["train_acc"].iloc[-1] > hist["train_acc"].iloc[0]  # it learns
    assert hist[["mean_alpha", "l2_norm", "circuit_complexity"]].notna().all().all()
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns) == list(LAYER_COLUMNS)
    assert set(layers["name"]) == {"fc1.weight", "fc2.weight"}
    assert len(layers) == 2 * len(steps)
    for name in ("accuracy", "traps_per_layer", "alpha_per_layer", "comparison_signals",
                 "prototypes_fc1"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    # the saved weights audit to the same numbers as the run recorded
    snap = load_file(str(out / "snapshots" / f"step_{steps[-1]:09d}.safetensors"))
    rep = monitor_weights(snap, min_evals=50)
    assert rep.total_traps == hist["num_traps"].iloc[-1]
    assert rep.mean_alpha == pytest.approx(hist["mean_alpha"].iloc[-1])
    # resume: a longer run continues from checkpoint.pt and keeps the earlier rows
    assert main([*args, "--steps", str(steps[-1] + 20)]) == 0
    hist2 = pd.read_csv(out / "history.csv")
    assert list(hist2["step"]) == [*steps, steps[-1] + 20]
    pd.testing.assert_frame_equal(hist2.iloc[:-1], hist)
