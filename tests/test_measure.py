"""toy_experiments.measure (signals), audit, outputs, schedules.log_schedule and data: known
answers on tiny inputs."""

import gzip
import math
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from toy_experiments import audit, measure, outputs, schedules
from toy_experiments.data import DataNotFound, locate, notebook_indices, read_idx


def _tiny():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
        m[0].bias.copy_(torch.tensor([0.0, -10.0]))
        m[2].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        m[2].bias.zero_()
    return m


def _fwd(model, x):
    h = model[1](model[0](x))
    return model[2](h), [h]


def test_log_schedule():
    assert schedules.log_schedule(100, per_decade=1) == [0, 1, 10, 100]
    assert schedules.log_schedule(1000, per_decade=2) == [0, 1, 3, 10, 32, 100, 316, 1000]
    assert schedules.log_schedule(0) == [0]
    s = schedules.log_schedule(12345, per_decade=7)
    assert s[0] == 0 and s[-1] == 12345 and s == sorted(set(s))
    with pytest.raises(ValueError):
        schedules.log_schedule(10, per_decade=0)


def test_norm_and_entropy_known_answers():
    m = _tiny()
    sq = 1 + 4 + 0.25 + 1 + 1 + 100 + 4 + 1  # weights and biases
    assert measure.l2_norm(m) == pytest.approx(math.sqrt(sq))
    # −Σ|w|ln|w| over the two weight matrices: only |w| ∉ {0, 1} contribute
    expect = -(2 * math.log(2) + 0.5 * math.log(0.5) + 2 * math.log(2))
    assert measure.abs_weight_entropy(m) == pytest.approx(expect)


def test_activation_sparsity_and_circuit_complexity():
    m = _tiny()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    _, hs = _fwd(m, x)  # h = relu([1, -10], [-2, -9]) -> 3 of 4 entries are zero
    assert measure.activation_sparsity(hs) == 0.75
    g = torch.Generator().manual_seed(0)
    assert measure.circuit_complexity(m, x, _fwd, g, fraction=0.0) == 0.0
    assert measure.circuit_complexity(m, x, _fwd, g, fraction=1.0) > 0.0
    sig = measure.comparison_signals(m, x, _fwd, generator=torch.Generator().manual_seed(0))
    assert set(sig) == set(measure.SIGNAL_COLUMNS)
    assert m[0].weight[0, 1] == -2.0  # the model itself is never pruned


def test_zero_fraction_is_about_ten_percent():
    m = torch.nn.Linear(100, 100)
    pruned = measure.zero_fraction(m, 0.1, torch.Generator().manual_seed(1))
    frac = float((pruned.weight == 0).float().mean())
    assert 0.08 < frac < 0.12
    assert bool((pruned.bias == m.bias).all())


def test_csv_append_and_truncate(tmp_path):
    p = tmp_path / "h.csv"
    outputs.append_csv(p, [{"step": 1, "a": 2.0, "zzz": 9}], ("step", "a"))
    outputs.append_csv(p, [{"step": 5, "a": 3.0}, {"step": 9}], ("step", "a"))
    df = pd.read_csv(p)
    assert list(df.columns) == ["step", "a"] and list(df["step"]) == [1, 5, 9]
    outputs.truncate_csv(p, 5)
    assert list(pd.read_csv(p)["step"]) == [1, 5]


def test_audit_rows_and_snapshot(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Linear(60, 80)
    with torch.no_grad():
        m.weight.copy_(torch.randn(80, 60, generator=g) / 8)
    hist, layers = audit.audit_rows(m, 7, min_evals=50)
    assert hist["num_traps"] == 0 and hist["mean_alpha"] > 2 and hist["alert"] == ""
    assert [r["step"] for r in layers] == [7] and list(layers[0]) == list(audit.LAYER_COLUMNS)
    path = outputs.save_snapshot(m, tmp_path, 7)
    assert path == tmp_path / "snapshots" / "step_000000007.safetensors" and path.exists()


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_read_idx(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    assert (read_idx(tmp_path / "x.gz") == arr).all()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")


def test_notebook_indices_are_numpys_draw():
    labels = np.arange(10).repeat(7)[np.random.RandomState(3).permutation(70)]
    idx = notebook_indices(labels, per_class=3, seed=0)
    np.random.seed(0)  # the notebook's own calls, on numpy's global stream
    expected = [np.random.choice(np.where(labels == d)[0], 3, replace=False) for d in range(10)]
    assert idx.tolist() == np.concatenate(expected).tolist()
    assert labels[idx].tolist() == np.arange(10).repeat(3).tolist()


def test_locate_order(tmp_path, monkeypatch):
    with pytest.raises(DataNotFound):
        locate(tmp_path)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / (stem + ".gz")).write_bytes(b"")
    assert locate(tmp_path) == tmp_path
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    assert locate(None) == tmp_path
