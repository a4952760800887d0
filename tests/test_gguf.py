"""GGUF (llama.cpp) checkpoints: files written by gguf.GGUFWriter, decoded values checked
against gguf.quants.dequantize, orientation against the torch matrix, experts split, hostile
headers refused with exact messages, unsupported types skipped, and the diff of a BF16
safetensors model against its quantized GGUF copies."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llm_audit.cli import main  # noqa: E402
from llm_audit.decode import TensorReader, decode  # noqa: E402
from llm_audit.diff import diff  # noqa: E402
from llm_audit.errors import FormatError, SourceError  # noqa: E402
from llm_audit.gguf_plan import plan_gguf  # noqa: E402
from llm_audit.gguf_source import MAX_TENSORS, gguf_version  # noqa: E402
from llm_audit.pipeline import audit  # noqa: E402
from llm_audit.source import open_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
CPU = torch.device("cpu")
ROWS, COLS = 64, 256  # (out, in); 256 columns hold one K-quant block per row


def q2_k_bytes(W: np.ndarray) -> np.ndarray:
    """A plain Q2_K quantizer built from the block layout gguf's dequantizer reads (gguf
    writes no K-quants): per 256 values, 16 4-bit scales | 4-bit mins, 64 bytes of 2-bit
    values (value i = h*128 + s*32 + l in byte h*32 + l, bits 2s), then f16 d and dmin."""
    x = W.reshape(-1, 16, 16).astype(np.float64)
    n = x.shape[0]
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    ml, dl = -lo, (hi - lo) / 3
    d16 = (dl.max(-1, keepdims=True) / 15).astype(np.float16)
    m16 = (ml.max(-1, keepdims=True) / 15).astype(np.float16)
    d, dm = d16.astype(np.float64), m16.astype(np.float64)
    sc = np.clip(np.round(dl / np.where(d > 0, d, 1)), 0, 15)
    mn = np.clip(np.round(ml / np.where(dm > 0, dm, 1)), 0, 15)
    scale, off = d * sc, dm * mn
    q = np.clip(np.round((x + off[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, 3)
    q = q.astype(np.uint8).reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(n, 64)
    scales = sc.astype(np.uint8) | (mn.astype(np.uint8) << 4)
    blocks = np.concatenate([scales, qs, d16.view(np.uint8), m16.view(np.uint8)], axis=1)
    return blocks.reshape(*W.shape[:-1], -1)


def encode(W: np.ndarray, qtype: str) -> np.ndarray:
    """W as GGUF stores it: float arrays for F32/F16, bytes for the rest."""
    if qtype == "F32":
        return W.astype(np.float32)
    if qtype == "F16":
        return W.astype(np.float16)
    return q2_k_bytes(W) if qtype == "Q2_K" else quantize(W, Q[qtype])


def write_gguf(path, tensors, split_max_tensors=0):
    """tensors: [(name, float32 array of the logical (..., out, in) shape, GGML type)]."""
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    for name, W, qtype in tensors:
        data = encode(W, qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype in ("F32", "F16") else Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def torch_matrix(seed=0, shape=(ROWS, COLS)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def decoded(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    jobs, _ = plan_gguf(ckpt.tensors)
    with TensorReader() as reader:
        return {m.name: m.W for j in jobs for m in decode(j, reader, CPU)}


def reference(path, name) -> np.ndarray:
    """gguf's own reading of a tensor: its reader's data, its dequantizer."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return dequantize(t.data, t.tensor_type)


@pytest.mark.parametrize("qtype,tol", [("F32", 0), ("F16", 1e-3), ("BF16", 1e-2),
                                       ("Q8_0", 1e-2), ("Q4_0", 0.15), ("Q2_K", 0.45)])
def test_decoded_values_and_orientation(tmp_path, qtype, tol):
    W = torch.nn.Linear(COLS, ROWS).weight.detach()  # (out, in) = (64, 256)
    W = torch_matrix(1) if qtype == "F32" else W * 30
    path = write_gguf(tmp_path / "m.gguf", [("blk.0.attn_q.weight", W.numpy(), qtype)])
    got = decoded(path)["blk.0.attn_q.weight"]
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(W.shape) == (ROWS, COLS)
    np.testing.assert_array_equal(got.numpy(), reference(path, "blk.0.attn_q.weight"))
    err = (got - W).norm() / W.norm()  # the original matrix, not its transpose
    assert err <= tol if tol else torch.equal(got, W)


def test_expert_stack_split_one_expert_at_a_time(tmp_path):
    E = torch_matrix(2, (4, ROWS, COLS)).numpy()
    path = write_gguf(tmp_path / "moe.gguf", [("blk.3.ffn_down_exps.weight", E, "Q8_0")])
    ckpt = open_checkpoint(path)
    (t,) = ckpt.tensors
    assert (t.dtype, t.shape) == ("Q8_0", (4, ROWS, COLS))
    jobs, skipped = plan_gguf(ckpt.tensors)
    assert skipped == []
    assert [j.name for j in jobs] == [f"blk.3.ffn_down_exps.weight[{e}]" for e in range(4)]
    assert [(j.layer, j.module, j.hf_module, j.expert) for j in jobs] == \
        [(3, "ffn_down_exps", "down_proj", e) for e in range(4)]
    assert all(j.nbytes * 4 == t.nbytes for j in jobs)  # each job reads one expert's bytes
    assert jobs[1].parts[0].begin == t.begin + t.nbytes // 4
    full = reference(path, "blk.3.ffn_down_exps.weight")
    got = decoded(path)
    for e in range(4):
        np.testing.assert_array_equal(got[f"blk.3.ffn_down_exps.weight[{e}]"].numpy(), full[e])


def _toy_model(tmp_path, qtype="Q8_0"):
    W = {n: torch_matrix(i).numpy() for i, n in enumerate(
        ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight",
         "blk.1.attn_output.weight", "token_embd.weight", "output.weight"))}
    tensors = [(n, w, qtype) for n, w in W.items()]
    tensors += [("blk.0.attn_norm.weight", np.ones(COLS, np.float32), "F32"),
                ("blk.0.ffn_gate_exps.weight", torch_matrix(9, (2, ROWS, COLS)).numpy(), qtype)]
    return write_gguf(tmp_path / f"toy-{qtype}.gguf", tensors)


def test_audit_columns_names_modules_hf_modules(tmp_path):
    r = audit(_toy_model(tmp_path), max_spectra=0, randomize=False)
    d = r.details.set_index("name")
    assert list(d.index) == ["blk.0.attn_q.weight", "blk.0.attn_k.weight",
                             "blk.0.ffn_gate.weight", "blk.1.attn_output.weight",
                             "token_embd.weight", "output.weight",
                             "blk.0.ffn_gate_exps.weight[0]", "blk.0.ffn_gate_exps.weight[1]"]
    assert list(d["module"]) == ["attn_q", "attn_k", "ffn_gate", "attn_output", "token_embd",
                                 "output", "ffn_gate_exps", "ffn_gate_exps"]
    assert list(d["hf_module"]) == ["q_proj", "k_proj", "gate_proj", "o_proj", "embed_tokens",
                                    "lm_head", "gate_proj", "gate_proj"]
    assert d["layer"].tolist()[:4] == [0, 0, 0, 1] and d["layer"].isna().tolist()[4:6] == [1, 1]
    assert d["expert"].tolist()[6:] == [0, 1] and set(d["dtype"]) == {"Q8_0"}
    assert set(d["status"]) == {"ok"} and (d[["N", "M"]].values == [COLS, ROWS]).all()
    assert r.skipped.empty and r.summary.bytes > 0


def test_safetensors_rows_hf_module_is_the_module(tmp_path):
    save_file({"model.layers.0.self_attn.q_proj.weight": torch_matrix(0)},
              tmp_path / "m.safetensors")
    d = audit(tmp_path / "m.safetensors", max_spectra=0, randomize=False).details
    assert list(d["hf_module"]) == list(d["module"]) == ["q_proj"]


def test_split_set_and_folder(tmp_path):
    tensors = [(f"blk.{i}.attn_v.weight", torch_matrix(i).numpy(), "F16") for i in range(5)]
    write_gguf(tmp_path / "m.gguf", tensors, split_max_tensors=2)
    parts = sorted(p.name for p in tmp_path.iterdir())
    assert parts == [f"m-0000{k}-of-00003.gguf" for k in (1, 2, 3)]
    by_part = open_checkpoint(tmp_path / parts[1])  # any part names the whole set
    by_folder = open_checkpoint(tmp_path)
    for ckpt in (by_part, by_folder):
        assert ckpt.format == "gguf" and ckpt.name == "m" and len(ckpt.files) == 3
        assert [t.name for t in ckpt.tensors] == [t[0] for t in tensors]
    got = decoded(tmp_path / parts[0])
    assert torch.allclose(got["blk.4.attn_v.weight"], torch_matrix(4), atol=2e-3)
    (tmp_path / parts[2]).unlink()
    with pytest.raises(SourceError) as e:
        open_checkpoint(tmp_path / parts[0])
    assert str(e.value) == (f"{tmp_path / parts[0]}: part 3 of 3 of the split GGUF set is "
                            f"missing ({parts[2]}); download every part into {tmp_path}")


def test_folder_with_two_models_is_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, [("blk.0.attn_q.weight", torch_matrix(0).numpy(), "F16")])
    with pytest.raises(SourceError) as e:
        open_checkpoint(tmp_path)
    assert str(e.value) == (f"{tmp_path}: holds 2 GGUF models (a.gguf, b.gguf); give the file "
                            "to audit (a split set by any of its parts)")


def test_unsupported_types_are_skipped_with_the_reason(tmp_path):
    missing = [q for q in (Q.Q8_1, Q.Q8_K) if _no_dequantizer(q)]
    if not missing:
        pytest.skip("this gguf dequantizes every type we would write")
    qt = missing[0]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = np.zeros((ROWS, COLS // block * size), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "u.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qt)
    w.add_tensor("blk.0.ids.weight", np.zeros((ROWS, COLS), np.int32))
    w.add_tensor("blk.0.attn_k.weight", torch_matrix(0).numpy().astype(np.float16))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                 w.close):
        step()
    r = audit(tmp_path / "u.gguf", max_spectra=0, randomize=False)
    assert list(r.details["name"]) == ["blk.0.attn_k.weight"]
    s = r.skipped.set_index("name")
    assert s.loc["blk.0.attn_q.weight", "dtype"] == qt.name
    assert s.loc["blk.0.attn_q.weight", "reason"] == (
        f"GGML type {qt.name} cannot be dequantized by gguf {gguf_version()} "
        f"(NotImplementedError: Dequantization for {qt.name} is not yet implemented); a newer "
        "gguf may (pip install -U gguf)")
    assert s.loc["blk.0.ids.weight", "reason"] == "GGML integer type I32 is not a weight matrix"


def _no_dequantizer(qt) -> bool:
    try:
        dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qt][1]), np.uint8), qt)
    except NotImplementedError:
        return True
    return False


# ---- hostile headers -------------------------------------------------------------------------

def _two_tensor_file(tmp_path):
    return write_gguf(tmp_path / "h.gguf",
                      [("blk.0.attn_q.weight", torch_matrix(0).numpy(), "Q8_0"),
                       ("blk.0.attn_k.weight", torch_matrix(1).numpy(), "Q8_0")])


def _info_pos(path, i):
    """Byte positions of tensor i's info: (dims, type, offset)."""
    f = gguf.GGUFReader(str(path)).tensors[i].field
    dims = f.offset + 8 + len(f.name.encode()) + 4
    typ = dims + 8 * int(f.parts[2][0])
    return dims, typ, typ + 4


def _patch(path, pos, value, nbytes):
    with open(path, "r+b") as fh:
        fh.seek(pos)
        fh.write(int(value).to_bytes(nbytes, "little"))


def _refused(path) -> str:
    with pytest.raises(FormatError) as e:
        open_checkpoint(path)
    return str(e.value)


def test_truncated_file_refused(tmp_path):
    path = _two_tensor_file(tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    assert _refused(path) == (f"{path}: tensor 'blk.0.attn_k.weight': Q8_0 [64, 256] data ends "
                              f"at byte {size:,} but the file has {size - 100:,} bytes "
                              "(truncated download?); re-download it")
    with open(path, "r+b") as fh:
        fh.truncate(60)  # inside the header
    assert _refused(path) == (f"{path}: header truncated: it continues at byte 56 but the file "
                              "has 60 bytes; re-download it")


def test_tensor_offset_beyond_the_file_refused(tmp_path):
    path = _two_tensor_file(tmp_path)
    size = path.stat().st_size
    _patch(path, _info_pos(path, 0)[2], 1 << 40, 8)
    msg = _refused(path)
    assert msg.startswith(f"{path}: tensor 'blk.0.attn_q.weight': Q8_0 [64, 256] data ends at "
                          "byte ")
    assert msg.endswith(f" but the file has {size:,} bytes (truncated download?); re-download it")


def test_overlapping_tensors_refused(tmp_path):
    path = _two_tensor_file(tmp_path)
    data_start = gguf.GGUFReader(str(path)).tensors[0].data_offset  # attn_q at offset 0
    _patch(path, _info_pos(path, 1)[2], 100, 8)  # attn_k now starts inside attn_q
    assert _refused(path) == (f"{path}: tensor 'blk.0.attn_k.weight' overlaps tensor "
                              f"'blk.0.attn_q.weight' (bytes from {data_start + 100:,}); the "
                              "header is corrupt")


def test_absurd_counts_refused(tmp_path):
    path = _two_tensor_file(tmp_path)
    size = path.stat().st_size
    info_start = gguf.GGUFReader(str(path)).tensors[0].field.offset
    _patch(path, 8, 1 << 40, 8)  # tensor count
    fits = min((size - info_start) // 24, MAX_TENSORS)
    assert _refused(path) == (f"{path}: header claims {1 << 40:,} tensors at byte {info_start}, "
                              f"but at most {fits:,} can be there (file of {size:,} bytes, limit "
                              f"{MAX_TENSORS:,}); not a GGUF file or corrupt: re-download it")
    _patch(path, 8, 2, 8)
    _patch(path, 16, 1 << 62, 8)  # metadata key count
    assert _refused(path).startswith(f"{path}: header claims {1 << 62:,} metadata keys at byte 24")


def test_absurd_metadata_array_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_array("tokenizer.ggml.scores", [0.5] * 10)
    w.add_tensor("blk.0.attn_q.weight", torch_matrix(0).numpy().astype(np.float16))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                 w.close):
        step()
    path = tmp_path / "a.gguf"
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.scores"]
    value = field.offset + 8 + len(b"tokenizer.ggml.scores") + 4  # item type, then the count
    _patch(path, value + 4, 1 << 40, 8)
    size = path.stat().st_size
    fits = (size - value - 12) // 4  # float32 items
    assert _refused(path) == (f"{path}: header claims {1 << 40:,} metadata array items at byte "
                              f"{value + 12}, but at most {fits:,} can be there (file of "
                              f"{size:,} bytes, limit {1 << 22:,}); not a GGUF file or corrupt: "
                              "re-download it")


def test_bad_types_shapes_and_files_refused(tmp_path):
    path = _two_tensor_file(tmp_path)
    dims, typ, _ = _info_pos(path, 1)
    _patch(path, typ, 99, 4)
    assert _refused(path) == (f"{path}: tensor 'blk.0.attn_k.weight' [64, 256]: GGML type id 99 "
                              f"is unknown to gguf {gguf_version()}; upgrade it (pip install -U "
                              "gguf) or the header is corrupt")
    _patch(path, typ, int(Q.Q8_0), 4)
    _patch(path, dims, 250, 8)  # ne[0]: rows of 250 values are not whole 32-value blocks
    assert _refused(path) == (f"{path}: tensor 'blk.0.attn_k.weight': Q8_0 [64, 250]: rows of "
                              "250 values are not whole 32-value blocks; the header is corrupt")
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(40))
    assert _refused(tmp_path / "x.gguf") == (f"{tmp_path / 'x.gguf'}: not a GGUF file (starts "
                                             "with b'GGML', not b'GGUF')")
    (tmp_path / "y.gguf").write_bytes(b"GGUF")
    assert _refused(tmp_path / "y.gguf") == (f"{tmp_path / 'y.gguf'}: not a GGUF file or "
                                             "truncated (only 4 bytes; the header alone needs "
                                             "24); re-download it")


def test_reader_errors_become_format_errors(tmp_path):
    path = _two_tensor_file(tmp_path)
    field = gguf.GGUFReader(str(path)).fields["general.architecture"]
    _patch(path, field.offset + 8 + len(b"general.architecture"), 77, 4)  # value type 77
    msg = _refused(path)
    assert msg.startswith(f"{path}: not a valid GGUF file (gguf {gguf_version()}'s reader: "
                          "ValueError: ")
    assert "77) is not a valid GGUFValueType" in msg or "77 is not a valid" in msg
    assert msg.endswith("); re-download or re-convert it")


def test_cli_one_line_exit_2_and_help_does_not_import_gguf(tmp_path, capsys):
    path = _two_tensor_file(tmp_path)
    _patch(path, 8, 1 << 40, 8)
    assert main([str(path), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "header claims 1,099,511,627,776 tensors" in err
    code = ("import sys\nfrom llm_audit.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- diff: what quantization moved ----------------------------------------------------------

def _trained_like(g: torch.Generator) -> torch.Tensor:
    """A power-law spectrum (alpha ~ 2.2) plus a little noise."""
    U, _ = torch.linalg.qr(torch.randn(ROWS, ROWS, generator=g))
    V, _ = torch.linalg.qr(torch.randn(COLS, ROWS, generator=g))
    s = torch.arange(1, ROWS + 1, dtype=torch.float32) ** -0.8
    return (U * s) @ V.T * 3 + 0.02 * torch.randn(ROWS, COLS, generator=g)


def test_diff_bf16_safetensors_against_gguf_copies(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.v_proj": "attn_v",
             "mlp.down_proj": "ffn_down"}
    hf, copy = {}, []
    for i in range(2):
        for hf_name, gguf_name in names.items():
            W = _trained_like(g).to(torch.bfloat16)
            hf[f"model.layers.{i}.{hf_name}.weight"] = W
            copy.append((f"blk.{i}.{gguf_name}.weight", W.float().numpy()))
    save_file(hf, tmp_path / "model.safetensors")
    results = {}
    for qtype in ("Q8_0", "Q2_K"):
        write_gguf(tmp_path / f"model-{qtype}.gguf", [(n, W, qtype) for n, W in copy])
        results[qtype] = r = diff(tmp_path / "model.safetensors", tmp_path / f"model-{qtype}.gguf",
                                  randomize=False)
        assert (r.summary["matched"], r.only_a, r.only_b) == (6, (), ())
        pairs = dict(zip(r.table["name"], r.table["name_b"], strict=True))
        assert pairs["model.layers.1.self_attn.v_proj.weight"] == "blk.1.attn_v.weight"
        assert pairs["model.layers.0.mlp.down_proj.weight"] == "blk.0.ffn_down.weight"
    q8, q2 = (results[q].table for q in ("Q8_0", "Q2_K"))
    assert q8["d_alpha"].abs().max() < 0.01 and q8["d_log_norm"].abs().max() < 1e-3
    assert q2["d_alpha"].abs().min() > 5 * q8["d_alpha"].abs().max()
    assert q2["d_log_norm"].abs().min() > 0.02  # 2-bit rounding adds noise energy
    out = tmp_path / "d"
    assert main(["diff", str(tmp_path / "model.safetensors"), str(tmp_path / "model-Q2_K.gguf"),
                 "--out", str(out), "--no-randomize"]) == 0
    md = (out / "diff.md").read_text()
    assert "`model.layers.0.self_attn.q_proj.weight` → `blk.0.attn_q.weight`" in md
    shutil.rmtree(out)
