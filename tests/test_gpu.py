"""The same answers on CUDA as on the CPU (skipped without a CUDA device; run by
benchmarks/gpu_check.sh as `pytest -m gpu`). Random numbers (shuffles, sketches) come from CPU
generators, so both devices see the same shuffled matrices and the same Ω.

The synthetic matrices were chosen so that no answer sits on a knife's edge: every matrix's
alpha_spread is 0 at float32 round-off (no other xmin candidate within round-off of the best),
which the tests check first, on the CPU."""

import math

import pytest
import torch

import llm_audit
from llm_audit import detect, spectral
from llm_audit.analysis import MatrixMeta, analyse_stack
from llm_audit.detect import shuffle
from llm_audit.options import AuditOptions
from llm_audit.rsvd import top_singular_values

from .checkpoints import write_gpt_oss
from .synth_matrices import heavy_tailed_stack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
KEY = "model.layers.0.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def stack():
    W = heavy_tailed_stack(4, 512, 384, seed=7)  # matrix b has b + 1 planted entries
    evals = spectral.esd(W)
    for b in range(4):  # no answer on a knife's edge (see the module docstring)
        fit = spectral.fit_power_law(evals[b], round_off=spectral.FLOAT32_ROUND_OFF)
        assert fit.alpha_spread == 0.0
    metas = [MatrixMeta(f"{KEY}[{b}]", 0, "down_proj", b, "F32") for b in range(4)]
    return W, metas


def _rows(W, metas, opts, device):
    return analyse_stack(W.to(device), metas, opts, key=KEY)


@pytest.mark.parametrize("rule, sketch", [("ww", False), ("tw", False), ("tw", True)])
def test_stack_float64_cuda_matches_cpu(stack, rule, sketch, monkeypatch):
    if sketch:  # the randomized top-k on these sizes (Ω from the matrices' CPU generators)
        monkeypatch.setattr(detect, "RSVD_MIN_M", 256)
    W, metas = stack
    opts = AuditOptions(trap_rule=rule, precision="float64")
    cpu, gpu = _rows(W, metas, opts, "cpu"), _rows(W, metas, opts, CUDA)
    assert [r.rand_num_spikes for r in cpu] == [1, 2, 3, 4]  # the planted entries
    for c, g in zip(cpu, gpu, strict=True):
        assert (g.name, g.status, g.precision) == (c.name, "ok", "float64")
        for col in ("alpha", "xmin", "D"):
            assert getattr(g, col) == pytest.approx(getattr(c, col), rel=1e-9), (c.name, col)
        for col in ("num_pl_spikes", "num_spikes", "rand_num_spikes", "matrix_rank"):
            assert getattr(g, col) == getattr(c, col), (c.name, col)
        assert g.lambda_max == pytest.approx(c.lambda_max, rel=1e-9)
        assert g.max_rand_eval == pytest.approx(c.max_rand_eval, rel=1e-6)


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_stack_auto_cuda_matches_cpu(stack, rule):
    W, metas = stack
    opts = AuditOptions(trap_rule=rule, precision="auto")
    cpu, gpu = _rows(W, metas, opts, "cpu"), _rows(W, metas, opts, CUDA)
    assert [r.rand_num_spikes for r in gpu] == [1, 2, 3, 4]
    for c, g in zip(cpu, gpu, strict=True):
        assert (g.name, g.status) == (c.name, "ok")
        assert g.precision in ("float32", "float64")
        assert abs(g.alpha - c.alpha) <= 1e-4, c.name
        assert (g.num_spikes, g.rand_num_spikes) == (c.num_spikes, c.rand_num_spikes), c.name


def test_gpt_oss_audit_cuda_matches_cpu(tmp_path):
    folder = write_gpt_oss(tmp_path / "gpt-oss", layers=1, width=256, experts=4)
    cpu = llm_audit.audit(folder, device="cpu", max_spectra=0).details
    gpu = llm_audit.audit(folder, device="cuda", max_spectra=0).details
    assert gpu.name.tolist() == cpu.name.tolist() and len(cpu) == 19
    assert gpu.status.tolist() == cpu.status.tolist()
    assert (cpu.status == "ok").sum() == 18  # the 4 x 256 router is too small
    for col in ("rand_num_spikes", "num_spikes"):
        assert gpu[col].tolist() == cpu[col].tolist(), col
    ok = cpu.status == "ok"
    assert (gpu.alpha[ok] - cpu.alpha[ok]).abs().max() <= 1e-4


def test_rsvd_float32_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 400, 300, generator=g, dtype=torch.float64) / 20
    for b in range(3):  # rank-3 spikes of singular value 5, 4, 3
        U, _ = torch.linalg.qr(torch.randn(400, 3, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(300, 3, generator=g, dtype=torch.float64))
        W[b] += U @ torch.diag(torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64)) @ V.T
    W = W.float()
    exact = torch.linalg.svdvals(W.double())[:, :3]

    def run(device, batched):
        gens = [torch.Generator().manual_seed(10 + b) for b in range(3)]  # CPU: the same Ω
        if batched:
            return top_singular_values(W.to(device), 3, generator=gens,
                                       dtype=torch.float32).cpu()
        return torch.stack([top_singular_values(W[b].to(device), 3, generator=gens[b],
                                                dtype=torch.float32).cpu() for b in range(3)])

    cpu = run("cpu", False)
    for batched in (False, True):
        gpu = run(CUDA, batched)
        assert gpu.dtype == torch.float32
        assert torch.allclose(gpu.double(), cpu.double(), rtol=1e-4, atol=0)
        assert torch.allclose(gpu.double(), exact, rtol=1e-4, atol=0)


def test_shuffle_on_cuda():
    W = torch.arange(60.0).reshape(1, 6, 10) + 1000.0 * torch.arange(3.0).reshape(3, 1, 1)
    cpu = shuffle(W, torch.Generator().manual_seed(5))
    gpu = shuffle(W.to(CUDA), torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)  # the CPU permutation
    # a matrix of DEVICE_PERM_NUMEL entries or more gets a permutation drawn on the GPU
    n = detect.DEVICE_PERM_NUMEL
    big = torch.arange(n, dtype=torch.float32, device=CUDA).reshape(n // 4096, 4096)
    gen = torch.Generator().manual_seed(7)
    S = shuffle(big, gen)
    assert S.shape == big.shape and S.device.type == "cuda"
    assert torch.equal(torch.sort(S.reshape(-1)).values, big.reshape(-1))  # a permutation
    assert not torch.equal(S, big)
    assert torch.equal(S, shuffle(big, torch.Generator().manual_seed(7)))  # seeded by gen
    ref = torch.Generator().manual_seed(7)
    torch.randint(2**62, (1,), generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())  # one seed drawn from the CPU generator
    assert math.isclose(float(S.double().sum()), n * (n - 1) / 2)
