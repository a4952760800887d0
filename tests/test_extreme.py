"""Extreme magnitudes: every matrix gets its metrics (α is scale-invariant) or a failed row
with the reason, never a crash (issue 17)."""

import math

import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import AuditOptions, monitor_weights
from llm_audit.cli import main

EXPONENTS = list(range(-140, 121, 20))


@pytest.fixture(scope="module")
def unit():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(192, 256, generator=g)
    W[5, 7] = 40.0  # a trap, so the shuffled spectrum is exercised too
    return W


@pytest.fixture(scope="module")
def reference(unit):
    return {rule: monitor_weights({"w.weight": unit}, options=AuditOptions(
        trap_rule=rule, device="cpu")).layers[0] for rule in ("ww", "tw")}


@pytest.mark.parametrize("rule", ["ww", "tw"])
@pytest.mark.parametrize("precision", ["auto", "float32", "float64"])
@pytest.mark.parametrize("k", EXPONENTS)
def test_scaled_matrix_has_the_unit_matrix_answers(unit, reference, rule, precision, k):
    W = unit * 2.0 ** k  # exact in float32 while normal
    r = monitor_weights({"w.weight": W}, options=AuditOptions(
        trap_rule=rule, precision=precision, device="cpu")).layers[0]
    if float(W.abs().max()) < torch.finfo(torch.float32).tiny:
        assert r.status == "failed" and r.warning.startswith("failed: every entry is subnormal")
        return
    ref = reference[rule]
    assert r.status == "ok", r.warning
    tol = 1e-3 if k >= -100 else 2e-2  # below 2^-100 the smallest entries are subnormal
    assert r.alpha == pytest.approx(ref.alpha, abs=tol)
    assert r.num_pl_spikes == ref.num_pl_spikes or k < -100
    assert r.rand_num_spikes == ref.rand_num_spikes
    assert r.lambda_max == pytest.approx(ref.lambda_max * 4.0 ** k, rel=1e-4)
    assert r.log_norm == pytest.approx(ref.log_norm + 2 * k * math.log10(2), abs=1e-4)


def test_cli_low_and_high_magnitudes(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(192, 256, generator=g)
    save_file({"low.weight": W * 2.0 ** -120, "high.weight": W * 2.0 ** 100,
               "sub.weight": W * 2.0 ** -145, "ok.weight": W}, tmp_path / "m.safetensors")
    for args in ([], ["--no-randomize"]):
        out = tmp_path / f"out{len(args)}"
        assert main([str(tmp_path / "m.safetensors"), "--out", str(out), "-q", *args]) == 0
        d = llm_audit.audit(tmp_path / "m.safetensors", max_spectra=0).details.set_index("name")
        assert (d.loc[["low.weight", "high.weight", "ok.weight"], "status"] == "ok").all()
        assert d.at["low.weight", "alpha"] == pytest.approx(d.at["ok.weight", "alpha"], abs=1e-3)
        assert d.at["high.weight", "alpha"] == pytest.approx(d.at["ok.weight", "alpha"], abs=1e-3)
        assert d.at["sub.weight", "status"] == "failed"
        assert (out / "report.html").exists()
