"""toy_experiments MNIST: the notebook's recipe, the fast trainer, schedules, a smoke run."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llm_audit import AuditOptions, monitor_weights
from toy_experiments import schedules
from toy_experiments.__main__ import main
from toy_experiments.data import notebook_subsets
from toy_experiments.mlp import MLP3, FastMLP, notebook_init
from toy_experiments.mnist import HISTORY_COLUMNS, LAYER_COLUMNS, MIN_EVALS, PRESETS, preset_with

from .conftest import SHARED

MNIST = SHARED / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-labels-idx1-ubyte.gz").exists(),
                                 reason="no MNIST IDX files in ../shared/data/mnist")

OLD_HISTORY = ["step", "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha",
               "num_traps", "l2_norm", "activation_sparsity", "abs_weight_entropy",
               "circuit_complexity"]


def test_notebook_preset_is_the_authors_recipe():
    p = PRESETS["notebook"]
    assert (p.steps, p.lr, p.weight_decay, p.dtype, p.init_scale) == (100_000, 5e-4, 0.0,
                                                                      "float64", 4.0)
    assert p.lr_steps == pytest.approx(50.0)
    grid = p.measured_steps()
    assert grid == schedules.notebook_grid(100_000)
    assert 99_383 in grid and list(range(30)) == grid[:30] and 140 in grid and 145 not in grid
    assert MIN_EVALS == 10  # fc3 (200×10) is audited, as WeightWatcher's default does


def test_notebook_init_replays_torch_global_rng():
    """Our generator-based draws equal what the notebook's cell does after manual_seed(0)."""
    d = notebook_init(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        loader = DataLoader(TensorDataset(torch.arange(1000)), batch_size=200, shuffle=True)
        (fixed,) = next(iter(loader))
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 200, dtype=torch.float64), nn.ReLU(),
                            nn.Linear(200, 200, dtype=torch.float64), nn.ReLU(),
                            nn.Linear(200, 10, dtype=torch.float64))
        cycled = [b for (b,) in itertools.islice(itertools.cycle(loader), 10)]
    assert torch.equal(fixed, d.fixed_batch)
    for ours, theirs in (("fc1", "1"), ("fc2", "3"), ("fc3", "5")):
        for kind in ("weight", "bias"):
            expect = 4.0 * mlp.state_dict()[f"{theirs}.{kind}"]
            assert torch.equal(d.state[f"{ours}.{kind}"], expect)
    # itertools.cycle replays the first epoch: the same 5 batches, in the same order
    assert torch.equal(torch.cat(cycled[:5]), d.train_order)
    assert torch.equal(torch.cat(cycled[5:]), d.train_order)


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("drop_blank", [False, True])
def test_fast_step_equals_autograd_and_torch_adamw(gen, wd, drop_blank):
    state = notebook_init(0).state
    x = torch.rand(3, 200, 784, generator=gen, dtype=torch.float64)
    x[..., :100] = 0  # blank pixels: zero gradients, as in MNIST
    t = nn.functional.one_hot(torch.randint(0, 10, (3, 200), generator=gen), 10).double()
    inputs = torch.arange(100, 784) if drop_blank else None
    fast = FastMLP(state, lr=2e-3, weight_decay=wd, inputs=inputs)
    xs = fast.select(x)
    assert xs.shape == (3, 200, 684 if drop_blank else 784)
    ref = MLP3()
    ref.load_state_dict(state)
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, weight_decay=wd)
    for s in range(150):
        fast.step(xs[s % 3], t[s % 3])
        opt.zero_grad()
        nn.functional.mse_loss(ref(x[s % 3]), t[s % 3]).backward()
        opt.step()
    got = fast.module().state_dict()
    for k, v in ref.state_dict().items():
        assert float((got[k] - v).abs().max()) < 1e-12, k
        assert not torch.equal(v, state[k])  # it moved
    blank = got["fc1.weight"][:, :100]
    assert torch.allclose(blank, state["fc1.weight"][:, :100] * (1 - 2e-3 * wd) ** 150,
                          rtol=1e-12, atol=0)


def test_fast_checkpoint_round_trip_and_old_layout():
    state = notebook_init(0).state
    x, t = torch.rand(200, 784, dtype=torch.float64), torch.zeros(200, 10, dtype=torch.float64)
    a = FastMLP(state, lr=1e-3, inputs=torch.arange(50, 784))
    for _ in range(3):
        a.step(a.select(x), t)
    b = FastMLP(state, lr=1e-3, inputs=a.state_dict()["inputs"])
    b.load_state_dict(a.state_dict())
    for k, v in a.module().state_dict().items():
        assert torch.equal(v, b.module().state_dict()[k])
    old = FastMLP(state, lr=1e-3)  # checkpoints from before blank pixels were dropped
    old_state = {k: v for k, v in old.state_dict().items() if k not in ("inputs", "t")}
    FastMLP(state, lr=1e-3, inputs=None).load_state_dict(old_state)


def test_schedules():
    assert schedules.notebook_grid(300) == sorted(set(range(30)) | set(range(0, 150, 10))
                                                 | set(range(0, 301, 2)))
    g = schedules.lr_clock_grid(50.0, 5e-3)  # 1e4 steps: the notebook grid moved by 10x
    assert g[-1] == 10_000 and 9_938 in g  # 99,383 × 5e-4 / 5e-3, rounded
    c = schedules.collapse_grid(1_000_000)
    assert c[0] == 0 and c[-1] == 1_000_000 and 1 in c and 10 in c
    log_part = [s for s in c if s < 100_000]
    assert 48 <= len(log_part) <= 50  # 5 of the 6 decades of the 60 log-spaced points
    assert set(range(16 * 6_667, 1_000_001, 6_667)) <= set(c)  # the linear tail from 1e5
    assert schedules.thin(c, 24)[-1] == c[-1] and len(schedules.thin(c, 24)) <= 24


def test_preset_overrides_keep_lr_steps():
    p = preset_with("notebook", lr=2.5e-3)
    assert (p.steps, p.lr) == (20_000, 2.5e-3) and p.lr_steps == pytest.approx(50.0)
    assert preset_with("collapse", steps=10).steps == 10
    assert preset_with("collapse", weight_decay=0.01) == PRESETS["control"]


@needs_mnist
def test_notebook_subset_is_the_authors():
    train, test = notebook_subsets(MNIST)
    assert train.x.shape == (1000, 784) and train.x.dtype == torch.float64
    assert test.x.shape == (10_000, 784)
    assert train.y.tolist() == np.arange(10).repeat(100).tolist()  # digits 0..9 in order
    assert float(train.x.max()) == 1.0 and float(train.x.min()) == 0.0
    assert float(train.x[0].mul(255).round().sub(train.x[0] * 255).abs().max()) < 1e-9


@needs_mnist
def test_smoke_run_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["mnist", "--preset", "smoke", "--out", str(out), "--data-dir", str(MNIST),
            "--seed", "0", "--device", "cpu"]
    assert main(args) == 0
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == [*OLD_HISTORY, "lr", "lr_steps", "num_traps_tw"]
    assert list(hist.columns) == list(HISTORY_COLUMNS)
    steps = PRESETS["smoke"].measured_steps()
    assert list(hist["step"]) == steps
    assert (hist["lr"] == 5e-3).all()
    assert np.allclose(hist["lr_steps"], 5e-3 * hist["step"])
    assert hist["train_acc"].iloc[-1] > 0.9 > hist["train_acc"].iloc[0]  # it learns
    assert hist[["mean_alpha", "l2_norm", "circuit_complexity"]].notna().all().all()
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns) == list(LAYER_COLUMNS)
    assert set(layers["name"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert len(layers) == 3 * len(steps)
    for name in ("accuracy", "traps_per_layer", "alpha_per_layer", "comparison_signals",
                 "prototypes_fc1"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    # the saved weights audit to the numbers the run recorded (float32 snapshot: α to 1e-3)
    snap = load_file(str(out / "snapshots" / f"step_{steps[-1]:09d}.safetensors"))
    assert snap["fc1.weight"].dtype == torch.float32
    rep = monitor_weights({k: v.double() for k, v in snap.items()}, min_evals=MIN_EVALS,
                          options=AuditOptions(fix_fingers="clip_xmax", device="cpu"))
    assert rep.mean_alpha == pytest.approx(hist["mean_alpha"].iloc[-1], abs=1e-3)
    assert (out / "snapshots" / "best.safetensors").exists()
    # resume: a longer run continues from checkpoint.pt and keeps the earlier rows
    assert main([*args, "--steps", str(steps[-1] + 20)]) == 0
    hist2 = pd.read_csv(out / "history.csv")
    assert list(hist2["step"]) == [*steps, steps[-1] + 20]
    pd.testing.assert_frame_equal(hist2.iloc[:len(steps)], hist)
    assert math.isclose(hist2["lr_steps"].iloc[-1], 5e-3 * (steps[-1] + 20))
