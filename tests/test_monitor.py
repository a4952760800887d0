"""The in-memory training monitor: planted traps alert, Gaussian weights do not."""

import math

import pytest
import torch

import llm_audit
from llm_audit import AuditOptions, MonitorReport, monitor_weights
from llm_audit.records import TIMING_COLUMNS


def _gauss(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)


def _planted(rows=300, cols=200, seed=0):
    """Gaussian bulk + a few huge entries: shuffling cannot hide them -> traps."""
    W = _gauss(rows, cols, seed)
    W[3, 7] = W[50, 100] = W[200, 11] = 40.0
    return W


class Net(torch.nn.Module):
    def __init__(self, W1, W2):
        super().__init__()
        self.fc1 = torch.nn.Linear(W1.shape[1], W1.shape[0], dtype=torch.float64)
        self.fc2 = torch.nn.Linear(W2.shape[1], W2.shape[0], dtype=torch.float64)
        with torch.no_grad():
            self.fc1.weight.copy_(W1)
            self.fc2.weight.copy_(W2)


def test_planted_trap_alerts():
    rep = monitor_weights({"fc1.weight": _planted(), "fc2.weight": _gauss(200, 200, 1)})
    assert isinstance(rep, MonitorReport)
    assert rep.traps_by_layer()["fc1.weight"] >= 1
    assert rep.traps_by_layer()["fc2.weight"] == 0
    assert rep.total_traps == rep.traps_by_layer()["fc1.weight"]
    assert rep.triggered and "fc1.weight" in rep.alert


def test_gaussian_is_healthy():
    rep = monitor_weights({"fc1.weight": _gauss(400, 200, 2), "fc2.weight": _gauss(200, 200, 3)})
    assert rep.total_traps == 0
    assert rep.mean_alpha > 2.0  # random matrices: α far above 2
    assert not rep.triggered and rep.alert == ""


def test_alpha_floor_alert_and_disable():
    rep = monitor_weights({"fc2.weight": _gauss(200, 200, 3)}, alpha_floor=1e6)
    assert rep.triggered and "mean alpha" in rep.alert
    rep = monitor_weights({"fc2.weight": _gauss(200, 200, 3)}, alpha_floor=None)
    assert not rep.triggered


def test_module_and_state_dict_agree():
    net = Net(_planted(), _gauss(200, 300, 4))
    a = monitor_weights(net, options=AuditOptions(seed=3, device="cpu"))
    b = monitor_weights(net.state_dict(), options=AuditOptions(seed=3, device="cpu"))
    assert [r.name for r in a.layers] == ["fc1.weight", "fc2.weight"]  # biases are skipped
    t = list(TIMING_COLUMNS)
    assert a.details.drop(columns=t).equals(b.details.drop(columns=t))
    assert a.total_traps == b.total_traps >= 1
    assert a.mean_alpha == b.mean_alpha


def test_min_evals_and_options_filter():
    sd = {"big.weight": _gauss(100, 60, 5), "head.weight": _gauss(10, 60, 6),
          "gain": torch.ones(60)}
    assert [r.name for r in monitor_weights(sd, min_evals=50).layers] == ["big.weight"]
    rep = monitor_weights(sd, options=AuditOptions(exclude="big", randomize=False))
    assert [r.name for r in rep.layers] == ["head.weight"]
    assert rep.layers[0].rand_num_spikes == 0 and math.isnan(rep.layers[0].max_rand_eval)


def test_exported():
    assert llm_audit.monitor_weights is monitor_weights
    assert "monitor_weights" in llm_audit.__all__


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_trap_rules(rule):
    rep = monitor_weights({"fc1.weight": _planted()}, options=AuditOptions(trap_rule=rule))
    assert rep.total_traps >= 1
