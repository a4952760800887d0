"""MoE and quantized checkpoints end to end: gpt-oss MXFP4 (sharded, a layer straddling two
shards), gpt-oss BF16 stacks, Mixtral/Qwen/DeepSeek naming, FP8 and compressed-tensors
dispatch, skipped tensors with their reasons."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit.decode import TensorReader, decode
from llm_audit.options import AuditOptions
from llm_audit.pipeline import plan
from llm_audit.plan import owner_name, plan_checkpoint, quant_method
from llm_audit.source import open_checkpoint, read_header

from .checkpoints import encode_fp8_block, random_mxfp4_matrix, write_gpt_oss

CPU = torch.device("cpu")
WIDTH, EXPERTS = 64, 4


def _gate_up(gen):
    gate = random_mxfp4_matrix(gen, EXPERTS, WIDTH, WIDTH)
    up = random_mxfp4_matrix(gen, EXPERTS, WIDTH, WIDTH)
    fused = torch.stack((gate, up), dim=2).reshape(EXPERTS, 2 * WIDTH, WIDTH)  # interleaved rows
    return gate, up, fused


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    gen = torch.Generator().manual_seed(7)
    gate, up, fused = _gate_up(gen)
    folder = write_gpt_oss(tmp_path_factory.mktemp("ck") / "gpt-oss-tiny", layers=2, width=WIDTH,
                           experts=EXPERTS, gate_up0=fused)
    return folder, gate, up


def test_synthetic_gpt_oss_straddles_shards(gpt_oss):
    folder, _, _ = gpt_oss
    wm = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    p = "model.layers.0.mlp.experts.gate_up_proj_"
    assert wm[p + "blocks"] != wm[p + "scales"]
    assert len({s for n, s in wm.items() if n.startswith("model.layers.0.")}) == 2


def test_plan_gpt_oss_rows_per_expert(gpt_oss):
    folder, _, _ = gpt_oss
    jobs, skipped = plan(open_checkpoint(folder), AuditOptions())
    assert skipped == []
    by_name = {j.name: j for j in jobs}
    j = by_name["model.layers.0.mlp.experts.gate_up_proj[2]"]
    assert (j.layer, j.module, j.expert, j.scheme, j.fused) == \
        (0, "gate_up_proj", 2, "mxfp4", ("gate_proj", "up_proj"))
    assert [p.name for p in j.parts] == [
        "model.layers.0.mlp.experts.gate_up_proj_blocks",
        "model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert j.parts[0].shape == (2 * WIDTH, WIDTH // 32, 16) and j.parts[1].shape == (2 * WIDTH, 2)
    assert j.parts[0].file != j.parts[1].file  # routed through weight_map, each on its own
    assert j.matrix_shape == (2 * WIDTH, WIDTH)  # the decoded (fused) matrix, not the blocks
    d = by_name["model.layers.1.mlp.experts.down_proj[3]"]
    assert (d.layer, d.module, d.expert, d.fused) == (1, "down_proj", 3, ())
    assert len(jobs) == 2 + 2 * (5 + 2 * EXPERTS)  # embed, lm_head + per layer 5 dense + experts
    assert not any("scales" in j.name or "bias" in j.name or "norm" in j.name for j in jobs)


def test_gate_up_is_deinterleaved_exactly(gpt_oss):
    folder, gate, up = gpt_oss
    jobs, _ = plan(open_checkpoint(folder), AuditOptions(include=r"layers\.0\..*gate_up"))
    assert len(jobs) == EXPERTS
    with TensorReader() as r:
        out = [m for j in jobs for m in decode(j, r, CPU)]
    assert [m.name for m in out[:2]] == ["model.layers.0.mlp.experts.gate_up_proj[0].gate",
                                         "model.layers.0.mlp.experts.gate_up_proj[0].up"]
    for m in out:
        known = gate if m.module == "gate_proj" else up
        assert torch.equal(m.W, known[m.expert])


def test_audit_gpt_oss_rows(gpt_oss):
    folder, gate, _ = gpt_oss
    res = llm_audit.audit(folder, randomize=False, include=r"layers\.0\.|embed")
    df = res.details.set_index("name")
    assert len(df) == 1 + 5 + 3 * EXPERTS
    row = df.loc["model.layers.0.mlp.experts.gate_up_proj[1].gate"]
    assert tuple(row[["layer", "module", "expert", "N", "M", "dtype", "status"]]) == \
        (0, "gate_proj", 1, WIDTH, WIDTH, "mxfp4", "ok")
    lam = torch.linalg.svdvals(gate[1].double()).max().item() ** 2
    assert row.lambda_max == pytest.approx(lam, rel=1e-5)
    assert df.loc["model.layers.0.mlp.experts.gate_up_proj[3].up", "module"] == "up_proj"
    down = df[df.module == "down_proj"]
    assert sorted(down.expert.tolist()) == list(range(EXPERTS)) and set(down.layer) == {0}
    assert df.loc["model.layers.0.mlp.router.weight", "module"] == "router"
    assert df.loc["model.embed_tokens.weight", "dtype"] == "BF16"
    assert (df.nan_scales == 0).all()


def test_nan_scale_fails_the_matrix_and_is_counted(tmp_path):
    folder = write_gpt_oss(tmp_path / "m", layers=1, width=WIDTH, experts=2, shards=1)
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    (info,) = [t for f in folder.glob("*.safetensors") for t in read_header(f)[0] if t.name == name]
    raw = bytearray(info.file.read_bytes())
    groups = WIDTH // 32
    raw[info.begin + (1 * 2 * WIDTH + 2) * groups] = 255  # expert 1, row 2 (gate row 1), group 0
    info.file.write_bytes(bytes(raw))
    df = llm_audit.audit(folder, randomize=False, include="gate_up").details.set_index("name")
    bad = df.loc["model.layers.0.mlp.experts.gate_up_proj[1].gate"]
    assert bad.nan_scales == 1 and bad.status == "failed"
    assert bad.warning == "failed: non-finite entries (32 NaN, 0 Inf)"
    assert df.loc["model.layers.0.mlp.experts.gate_up_proj[1].up", "nan_scales"] == 0
    assert (df.drop(index=bad.name).status == "ok").all()


def test_gpt_oss_bf16_stacks_split_columns(tmp_path, gen):
    gate, up = torch.randn(2, 8, 6, generator=gen), torch.randn(2, 8, 6, generator=gen)
    fused = torch.stack((gate, up), dim=3).reshape(2, 8, 12)  # (in, out): columns interleave
    save_file({"model.layers.0.mlp.experts.gate_up_proj": fused,
               "model.layers.0.mlp.experts.down_proj": torch.randn(2, 6, 8, generator=gen)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    jobs, skipped = plan(open_checkpoint(tmp_path), AuditOptions())
    assert skipped == [] and [j.name for j in jobs] == [
        "model.layers.0.mlp.experts.down_proj[0]", "model.layers.0.mlp.experts.down_proj[1]",
        "model.layers.0.mlp.experts.gate_up_proj[0]", "model.layers.0.mlp.experts.gate_up_proj[1]"]
    with TensorReader() as r:
        out = {m.name: m for j in jobs for m in decode(j, r, CPU)}
    # stored (in, out), analysed in the canonical (out, in) orientation
    assert torch.equal(out["model.layers.0.mlp.experts.gate_up_proj[1].gate"].W, gate[1].T)
    assert torch.equal(out["model.layers.0.mlp.experts.gate_up_proj[1].up"].W, up[1].T)
    assert out["model.layers.0.mlp.experts.down_proj[0]"].expert == 0
    assert out["model.layers.0.mlp.experts.down_proj[0]"].W.shape == (8, 6)


def _bf16_copy(src, dst):
    """gpt-oss's BF16 layout of an MXFP4 checkpoint: experts dequantized and stored (in, out),
    gate/up alternating along the columns; everything else as it is (MXFP4 values are exact
    in BF16)."""
    from safetensors.torch import load_file

    from llm_audit.quant import mxfp4_dequantize

    dst.mkdir()
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            W = mxfp4_dequantize(t, tensors[name.removesuffix("_blocks") + "_scales"])
            out[name.removesuffix("_blocks")] = W.mT.contiguous().to(torch.bfloat16)
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("rule", ["ww", "tw"])
def test_mxfp4_and_its_bf16_copy_give_identical_rows(gpt_oss, tmp_path, rule):
    folder = gpt_oss[0]
    copy = _bf16_copy(folder, tmp_path / "bf16")
    a = llm_audit.audit(folder, trap_rule=rule, max_spectra=0).details.set_index("name")
    b = llm_audit.audit(copy, trap_rule=rule, max_spectra=0).details.set_index("name")
    a, b = a.sort_index(), b.sort_index()  # file order differs (one file vs shards)
    assert list(a.index) == list(b.index)
    experts = a.index[a.expert.notna()]
    assert len(experts) == 2 * 2 * EXPERTS + 2 * EXPERTS  # gate, up, down of 4 experts, 2 layers
    assert set(a.loc[experts, "dtype"]) == {"mxfp4"} and set(b.loc[experts, "dtype"]) == {"BF16"}
    cols = [c for c in a.columns if c != "dtype" and not c.endswith("seconds")]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def _infos(tmp_path, tensors, config=None):
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config or {}))
    return open_checkpoint(tmp_path)


def test_mixtral_qwen_deepseek_naming(tmp_path, gen):
    def w(*s):
        return torch.randn(*s, generator=gen).to(torch.bfloat16)

    ck = _infos(tmp_path, {
        "model.layers.0.block_sparse_moe.gate.weight": w(4, 16),
        "model.layers.0.block_sparse_moe.experts.3.w1.weight": w(24, 16),
        "model.layers.0.block_sparse_moe.experts.3.w2.weight": w(16, 24),
        "model.layers.1.mlp.experts.11.up_proj.weight": w(24, 16),
        "model.layers.1.mlp.shared_expert.down_proj.weight": w(16, 24),
        "model.layers.1.mlp.shared_expert_gate.weight": w(1, 16),
        "model.layers.2.mlp.shared_experts.gate_proj.weight": w(24, 16),
        "model.layers.2.mlp.gate.e_score_correction_bias": w(4),
    })
    jobs, skipped = plan_checkpoint(ck.tensors, ck.config_dict)
    got = {j.name: (j.layer, j.module, j.expert) for j in jobs}
    assert got == {
        "model.layers.0.block_sparse_moe.gate.weight": (0, "gate", None),
        "model.layers.0.block_sparse_moe.experts.3.w1.weight": (0, "w1", 3),
        "model.layers.0.block_sparse_moe.experts.3.w2.weight": (0, "w2", 3),
        "model.layers.1.mlp.experts.11.up_proj.weight": (1, "up_proj", 11),
        "model.layers.1.mlp.shared_expert.down_proj.weight": (1, "down_proj", None),
        "model.layers.2.mlp.shared_experts.gate_proj.weight": (2, "gate_proj", None),
    }
    assert [(s.name, s.reason) for s in skipped] == [
        ("model.layers.1.mlp.shared_expert_gate.weight", "fewer than 2 rows or columns")]
    df = llm_audit.audit(tmp_path, randomize=False).details.set_index("name")
    assert df.loc["model.layers.0.block_sparse_moe.experts.3.w1.weight", "expert"] == 3


FP8_CONFIG = {"model_type": "deepseek_v3", "quantization_config": {
    "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}


def test_deepseek_fp8_block_checkpoint(tmp_path, gen):
    W = torch.randn(200, 300, generator=gen)
    q, s = encode_fp8_block(W)
    Wq = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    e_q, e_s = encode_fp8_block(torch.randn(130, 300, generator=gen))
    ck = _infos(tmp_path, {
        "model.layers.0.self_attn.o_proj.weight": q,
        "model.layers.0.self_attn.o_proj.weight_scale_inv": s,
        "model.layers.0.mlp.experts.5.down_proj.weight": e_q,
        "model.layers.0.mlp.experts.5.down_proj.weight_scale_inv": e_s,
        "model.embed_tokens.weight": torch.randn(50, 300, generator=gen).to(torch.bfloat16),
    }, FP8_CONFIG)
    jobs, skipped = plan_checkpoint(ck.tensors, ck.config_dict)
    assert skipped == [] and sorted((j.name, j.scheme, j.expert) for j in jobs) == [
        ("model.embed_tokens.weight", "dense", None),
        ("model.layers.0.mlp.experts.5.down_proj.weight", "fp8_block128", 5),
        ("model.layers.0.self_attn.o_proj.weight", "fp8_block128", None)]
    df = llm_audit.audit(tmp_path, randomize=False).details.set_index("name")
    row = df.loc["model.layers.0.self_attn.o_proj.weight"]
    assert row["dtype"] == "fp8_block128" and row.status == "ok"
    assert row.lambda_max == pytest.approx(torch.linalg.svdvals(Wq.double())[0].item() ** 2,
                                           rel=1e-5)


def test_compressed_tensors_per_channel_and_per_tensor(tmp_path, gen):
    q = torch.randn(48, 64, generator=gen).to(torch.float8_e4m3fn)
    ck = _infos(tmp_path, {
        "model.layers.0.mlp.down_proj.weight": q,
        "model.layers.0.mlp.down_proj.weight_scale": torch.rand(48, 1, generator=gen),
        "model.layers.0.mlp.down_proj.input_scale": torch.ones(1),
        "model.layers.0.mlp.up_proj.weight": q.clone(),
        "model.layers.0.mlp.up_proj.weight_scale": torch.tensor([0.5]),
        "model.layers.0.mlp.gate_proj.weight": q.clone(),
    }, {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}})
    jobs, skipped = plan_checkpoint(ck.tensors, ck.config_dict)
    assert sorted((j.name, j.scheme) for j in jobs) == [
        ("model.layers.0.mlp.down_proj.weight", "fp8_scaled"),
        ("model.layers.0.mlp.up_proj.weight", "fp8_scaled")]
    assert [(s.name, s.reason) for s in skipped] == [
        ("model.layers.0.mlp.gate_proj.weight",
         "F8_E4M3 weight with no scale tensor does not match quant_method 'compressed-tensors'")]
    df = llm_audit.audit(tmp_path, randomize=False).details.set_index("name")
    assert df.loc["model.layers.0.mlp.up_proj.weight", "lambda_max"] == pytest.approx(
        torch.linalg.svdvals(q.double() * 0.5)[0].item() ** 2, rel=1e-5)
    assert list(df.status) == ["ok", "ok"]


def test_dispatch_is_on_quant_method_not_suffixes(tmp_path, gen):
    blocks = torch.zeros(2, 8, 1, 16, dtype=torch.uint8)
    scales = torch.full((2, 8, 1), 127, dtype=torch.uint8)
    ck = _infos(tmp_path, {
        "model.layers.0.mlp.experts.down_proj_blocks": blocks,
        "model.layers.0.mlp.experts.down_proj_scales": scales,
        "model.layers.0.q.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
        "model.layers.0.q.weight_scale_inv": torch.ones(1, 1),
    })
    _, skipped = plan_checkpoint(ck.tensors, ck.config_dict)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons == {
        "model.layers.0.mlp.experts.down_proj_blocks":
            "U8 '_blocks' tensor looks like MXFP4 but config.json's quantization_config."
            "quant_method is None, not 'mxfp4'; put the model's config.json next to the weights",
        "model.layers.0.q.weight":
            "dtype F8_E4M3 needs a quantization scheme but config.json has no "
            "quantization_config.quant_method; put the model's config.json next to it"}
    _, skipped = plan_checkpoint(ck.tensors, {"quantization_config": {"quant_method": "gptq"}})
    assert {s.reason for s in skipped} == {
        "U8 '_blocks' tensor looks like MXFP4 but config.json's quantization_config.quant_method "
        "is 'gptq', not 'mxfp4'; put the model's config.json next to the weights",
        "quant_method 'gptq' is not supported (supported: mxfp4, fp8, compressed-tensors, "
        "fbgemm_fp8)"}
    res = llm_audit.audit(tmp_path, randomize=False)
    assert len(res.details) == 0 and sorted(res.skipped["name"]) == sorted(reasons)


def test_fp8_other_block_size_is_skipped_with_reason(tmp_path):
    ck = _infos(tmp_path, {"a.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
                           "a.weight_scale_inv": torch.ones(1, 1)},
                {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}})
    _, skipped = plan_checkpoint(ck.tensors, ck.config_dict)
    assert [s.reason for s in skipped] == [
        "weight_block_size [64, 64] is not supported (only [128, 128])"]


def test_owner_names_and_quant_method():
    assert owner_name("x.experts.gate_up_proj_scales") == "x.experts.gate_up_proj_blocks"
    assert owner_name("x.o_proj.weight_scale_inv") == "x.o_proj.weight"
    assert owner_name("x.o_proj.weight_scale") == "x.o_proj.weight"
    assert owner_name("x.o_proj.weight") == "x.o_proj.weight"
    assert quant_method({"quantization_config": {"quant_method": "MXFP4"}}) == "mxfp4"
    assert quant_method({}) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_audit_on_cuda_matches_cpu(gpt_oss):
    folder, _, _ = gpt_oss
    kw = dict(randomize=False, include=r"layers\.0\.mlp\.experts\.gate_up")
    cpu = llm_audit.audit(folder, device="cpu", **kw).details.set_index("name")
    gpu = llm_audit.audit(folder, device="cuda", **kw).details.set_index("name")
    assert list(gpu.index) == list(cpu.index)
    assert gpu["lambda_max"].tolist() == pytest.approx(cpu["lambda_max"].tolist(), rel=1e-4)
