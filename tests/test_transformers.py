"""In-memory models (issue 16): ``audit(model)`` and ``monitor_weights(model)`` give the rows a
checkpoint of the same weights gives; our MXFP4 / FP8 decoders against transformers' loaders.

Models are built from tiny configs (no network); the transformers tests skip without it.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import llm_audit
from llm_audit import memory, quant
from llm_audit.records import TIMING_COLUMNS

from .checkpoints import encode_fp8_block, encode_mxfp4, random_mxfp4_matrix, write_gpt_oss

CPU = dict(device="cpu", seed=0)
TINY = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=96)


def _table(result, drop=()) -> pd.DataFrame:
    d = result.details if hasattr(result, "details") else result
    return d.drop(columns=[*TIMING_COLUMNS, *drop]).set_index("name")


def _same_rows(a: pd.DataFrame, b: pd.DataFrame, **kw) -> None:
    """The same rows (files list tensors alphabetically, a model in parameter order)."""
    assert sorted(a.index) == sorted(b.index) and a.index.is_unique
    pd.testing.assert_frame_equal(a, b.loc[a.index], check_exact=False, rtol=1e-6, atol=1e-9, **kw)


def _tiny(name: str, **extra):
    tf = pytest.importorskip("transformers")
    config = getattr(tf, f"{name}Config")(**TINY, **extra)
    torch.manual_seed(0)
    return getattr(tf, f"{name}ForCausalLM")(config).eval()


def _file_rows(model, tmp_path, **opts):
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    return llm_audit.audit(tmp_path / "saved", **{**CPU, **opts}, max_spectra=0)


# --- in memory == from the saved files ---------------------------------------------------


def test_llama_in_memory_equals_saved(tmp_path):
    model = _tiny("Llama")
    mem = llm_audit.audit(model, **CPU, max_spectra=0)
    files = _file_rows(model, tmp_path)
    _same_rows(_table(mem), _table(files))  # every column, traps included
    assert mem.summary.matrices_analysed == files.summary.matrices_analysed > 10
    assert mem.summary.source == "<in-memory LlamaForCausalLM>"
    assert "model.embed_tokens.weight" in set(mem.details["name"])  # embeddings, as files


def test_gpt_oss_experts_split_and_oriented_as_from_files(tmp_path):
    model = _tiny("GptOss", num_local_experts=4)
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj  # (E, in, 2 * out): (in, out)
    assert gate_up.shape == (4, 64, 128)
    mem = llm_audit.audit(model, **CPU, max_spectra=0)
    _same_rows(_table(mem), _table(_file_rows(model, tmp_path)))
    d = mem.details.set_index("name")
    p = "model.layers.0.mlp.experts."
    assert d.loc[p + "gate_up_proj[3].gate", ["module", "expert", "layer"]].tolist() == \
        ["gate_proj", 3, 0]
    assert d.loc[p + "gate_up_proj[3].up", "module"] == "up_proj"
    assert d.loc[p + "down_proj[0]", ["module", "N", "M"]].tolist() == ["down_proj", 64, 64]
    assert sum(n.startswith(p) for n in d.index) == 2 * 4 * 3 / 2  # layer 0: 4 x gate, up, down
    # the gate rows are the even columns of the stored (in, out) matrix: rows of (out, in)
    W = gate_up[3].detach().mT[0::2]
    fro2 = float((W.double() ** 2).sum())
    assert d.loc[p + "gate_up_proj[3].gate", "log_norm"] == pytest.approx(
        torch.log10(torch.tensor(fro2)).item(), rel=1e-6)


def test_mixtral_fused_experts_split_like_the_per_expert_files(tmp_path):
    model = _tiny("Mixtral", num_local_experts=4)
    mem = llm_audit.audit(model, **CPU, randomize=False, max_spectra=0)
    files = _file_rows(model, tmp_path, randomize=False)
    # transformers 5 fuses [w1; w3] into gate_up_proj (E, 2I, H) and saves experts.e.w1/w2/w3
    mapped = {}
    for n in files.details["name"]:
        if ".block_sparse_moe.experts." in n:
            head, rest = n.split(".block_sparse_moe.experts.")
            e, w = rest.split(".")[:2]
            part = {"w1": f"gate_up_proj[{e}].gate", "w3": f"gate_up_proj[{e}].up",
                    "w2": f"down_proj[{e}]"}[w]
            mapped[n] = f"{head}.mlp.experts.{part}"
        else:
            mapped[n] = n.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    f = files.details.assign(name=files.details["name"].map(mapped))
    a, b = _table(mem, drop=("module", "hf_module")), _table(f, drop=("module", "hf_module"))
    _same_rows(a, b)
    d = mem.details.set_index("name")
    experts = d[d["expert"].notna()]
    assert len(experts) == 2 * 4 * 3 and set(experts["module"]) == {
        "gate_proj", "up_proj", "down_proj"}
    assert d.loc["model.layers.1.mlp.experts.gate_up_proj[2].up", ["N", "M", "layer"]].tolist() \
        == [64, 64, 1]


def test_plain_sequential_and_write(tmp_path):
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 8)
        net[0].weight[3, 7] = net[0].weight[50, 10] = 30.0  # planted traps
    mem = llm_audit.audit(net, **CPU)
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    files = llm_audit.audit(tmp_path / "net.safetensors", **CPU)
    _same_rows(_table(mem), _table(files))
    assert list(mem.details["name"]) == ["0.weight", "2.weight"]  # biases left out, as files
    assert mem.details.loc[0, "rand_num_spikes"] >= 1 and len(mem.traps) >= 1
    assert "0.weight" in [s.name for s in mem.spectra]
    written = {p.name for p in mem.write(tmp_path / "out", formats=("csv", "json", "md"))}
    assert {"layers.csv", "summary.json", "report.md"} <= written
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["matrices_analysed"] == 2
    rep = llm_audit.monitor_weights(net, **CPU)  # same rows (audits: Int64 layer/expert)
    _same_rows(_table(rep.details, drop=("expert",)), _table(mem, drop=("expert",)),
               check_dtype=False)


def test_monitor_weights_takes_a_transformers_model():
    model = _tiny("GptOss", num_local_experts=4)
    rep = llm_audit.monitor_weights(model, **CPU, min_evals=50)
    names = [r.name for r in rep.layers]
    assert "model.layers.1.mlp.experts.gate_up_proj[0].up" in names
    assert not any("router" in n or "bias" in n or "norm" in n for n in names)


def test_skipped_and_refused():
    sd = {"a.experts.w": torch.zeros(2, 4, 4, dtype=torch.int8),
          "conv.weight": torch.ones(8, 3, 3, 3), "x.weight": torch.randn(40, 30)}
    r = llm_audit.audit(sd, **CPU)
    assert list(r.details["name"]) == ["x.weight"]
    why = dict(zip(r.skipped["name"], r.skipped["reason"], strict=True))
    assert why["conv.weight"] == "4-D tensor with no known expert layout"
    assert why["a.experts.w"].startswith("dtype I8: in-memory quantized")
    with pytest.raises(llm_audit.AuditError, match="in-memory weights have no files"):
        llm_audit.audit(sd, workdir="somewhere")


# --- memory: the matrices analysed are the parameters themselves -------------------------


def _record_analysed(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = memory.analyse_stack

    def spy(W, metas, opts, *, key):
        seen.append(W)
        return real(W, metas, opts, key=key)

    monkeypatch.setattr(memory, "analyse_stack", spy)
    return seen


def test_no_copy_of_the_model(monkeypatch):
    model = _tiny("Mixtral", num_local_experts=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(type(model), "state_dict", lambda *a, **k: pytest.fail("state_dict()"))
    seen = _record_analysed(monkeypatch)
    llm_audit.audit(model, **CPU, max_spectra=0)
    ptrs = {W.data_ptr() for W in seen}
    params = dict(model.named_parameters())
    dense = [n for n, p in params.items() if p.ndim == 2]
    assert dense and all(params[n].data_ptr() in ptrs for n in dense)  # analysed in place
    down = params["model.layers.0.mlp.experts.down_proj"]
    assert down.data_ptr() in ptrs  # the expert stack (E, H, I): a view, not a copy
    gate_up = params["model.layers.0.mlp.experts.gate_up_proj"]  # [gate; up] halves: views
    assert {gate_up.data_ptr(), gate_up[:, 64:].data_ptr()} <= ptrs
    # nothing larger than one parameter was ever analysed, and the weights were only read
    assert max(W.numel() for W in seen) <= max(p.numel() for p in params.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bf16_is_converted_one_parameter_at_a_time(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    seen = _record_analysed(monkeypatch)
    rows = llm_audit.monitor_weights(net, **CPU).layers
    assert [r.dtype for r in rows] == ["BF16", "BF16"]
    assert [tuple(W.shape) for W in seen] == [(1, 64, 64), (1, 32, 64)]
    assert all(W.dtype == torch.float32 for W in seen)


def test_help_and_audit_of_a_module_do_not_import_transformers():
    code = ("import sys, runpy, torch\n"
            "sys.argv = ['llm-audit', '--help']\n"
            "try:\n    runpy.run_module('llm_audit', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "import llm_audit\n"
            "llm_audit.audit(torch.nn.Linear(16, 16), device='cpu', max_spectra=0)\n"
            "print('IMPORTED' if 'transformers' in sys.modules else 'CLEAN')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip().endswith("CLEAN") and "Usage" in out


# --- our decoders against transformers' own -----------------------------------------------


def test_mxfp4_equals_transformers_convert_moe_packed_tensors(gen):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = encode_mxfp4(random_mxfp4_matrix(gen, 3, 16, 96))  # [E, out, in]
    scales[0, 0, 0], scales[1, 2, 1], scales[2, 5, 2] = 0, 254, 1  # 2^-127 (subnormal), 2^127
    theirs = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert theirs.shape == (3, 96, 16)  # transformers keeps gpt-oss experts (in, out)
    ours = quant.mxfp4_dequantize(blocks, scales)
    assert torch.equal(ours, theirs.mT)  # bit for bit, in the canonical (out, in)
    # a NaN (255) scale: NaN in the OCP MX spec for us, 2^128 (inf or 0) for transformers
    scales[0, 3, 1] = 255
    assert torch.isnan(quant.mxfp4_dequantize(blocks, scales)[0, 3, 32:64]).all()


def test_gpt_oss_mxfp4_files_equal_transformers_dequantized_model(tmp_path):
    tf = pytest.importorskip("transformers")
    folder = write_gpt_oss(tmp_path / "gpt-oss")
    cfg = json.loads((folder / "config.json").read_text())
    # checkpoints.py's layout: 64 = 4 heads x 16, k/v 32 = 2 x 16; one sink (re-initialised)
    cfg.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = tf.GptOssForCausalLM.from_pretrained(
        folder, quantization_config=tf.Mxfp4Config(dequantize=True), dtype=torch.float32,
        ignore_mismatched_sizes=True)  # the CPU path: transformers' own MXFP4 dequantization
    files = llm_audit.audit(folder, **CPU, max_spectra=0)
    mem = llm_audit.audit(model, **CPU, max_spectra=0)
    _same_rows(_table(mem, drop=("dtype",)), _table(files, drop=("dtype",)))
    assert (files.details["dtype"] == "mxfp4").sum() == 2 * 4 * 3


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
def test_fp8_block_equals_transformers_finegrained_fp8(shape, gen):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    W = torch.randn(*shape, generator=gen) * torch.logspace(-3, 2, shape[1])
    q, s = encode_fp8_block(W)  # DeepSeek-V3 style: F8_E4M3 (out, in), F32 scale_inv blocks
    ours = quant.fp8_block_dequantize(q, s)
    # the block-wise dequantization of FP8Linear (handles partial edge blocks)
    assert torch.equal(ours, fp8._dequantize_fp8_weight(q, s, [128, 128], torch.float32))
    if shape[0] % 128 or shape[1] % 128:
        return  # the loader's Fp8Dequantize infers the block from the scale grid: full blocks
    loaded = fp8.Fp8Dequantize(None).convert({"weight": q, "weight_scale_inv": s},
                                             full_layer_name="w.weight")["w.weight"]
    assert loaded.dtype == torch.float32 and torch.equal(ours, loaded)
