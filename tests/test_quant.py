"""Dequantization against hand-built blocks: exact values, partial edge blocks, NaN scales."""

import math

import pytest
import torch

from llm_audit import quant
from llm_audit.decode import DECODERS, DecodedMatrix, TensorReader, decode
from llm_audit.errors import DecodeError
from llm_audit.routing import MatrixJob
from llm_audit.source import TensorInfo

from .checkpoints import FP4, encode_fp8_block, encode_mxfp4, random_mxfp4_matrix

CPU = torch.device("cpu")


def test_mxfp4_hand_built_block_low_nibble_first():
    # byte 0x21: low nibble 1 (+0.5) first, high nibble 2 (+1.0) second; 0xF8: -0.0 then -6
    blocks = torch.tensor([[[0x21, 0xF8, 0x7A] + [0x00] * 13]], dtype=torch.uint8)  # [1, 1, 16]
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^(128-127) = 2
    W = quant.mxfp4_dequantize(blocks, scales)
    assert W.shape == (1, 32) and W.dtype == torch.float32
    assert W[0, :6].tolist() == [1.0, 2.0, -0.0, -12.0, -2.0, 12.0]  # 0x7A: lo A=-1, hi 7=6
    assert W[0, 6:].tolist() == [0.0] * 26


def test_mxfp4_every_byte_and_the_e2m1_table():
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # 16 rows x 1 group
    ones = torch.full((16, 1), 127, dtype=torch.uint8)
    W = quant.mxfp4_dequantize(blocks.reshape(16, 1, 16), ones)
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    for b in range(256):
        r, c = divmod(b, 16)
        assert W[r, 2 * c].item() == table[b & 0xF] and W[r, 2 * c + 1].item() == table[b >> 4]


def test_e8m0_scales_are_exact_powers_of_two_and_255_is_nan():
    s = torch.tensor([0, 1, 100, 127, 128, 254, 255], dtype=torch.uint8)
    got = quant.e8m0_to_float(s).tolist()
    assert got[:6] == [2.0**-127, 2.0**-126, 2.0**-27, 1.0, 2.0, 2.0**127]
    assert math.isnan(got[6])


def test_mxfp4_stack_shapes_and_encoder_round_trip(gen):
    W = random_mxfp4_matrix(gen, 3, 8, 96)  # [E, R, C]
    blocks, scales = encode_mxfp4(W)
    assert blocks.shape == (3, 8, 3, 16) and scales.shape == (3, 8, 3)
    assert torch.equal(quant.mxfp4_dequantize(blocks, scales), W)


def test_mxfp4_nan_scale_counted_and_confined_to_its_block(gen):
    blocks, scales = encode_mxfp4(random_mxfp4_matrix(gen, 4, 64))
    scales[2, 1] = 255
    scales[3, 0] = 255
    W = quant.mxfp4_dequantize(blocks, scales)
    assert torch.isnan(W[2, 32:]).all() and not torch.isnan(W[2, :32]).any()
    assert int(torch.isnan(W).sum()) == 64
    assert quant.mxfp4_nan_rows(scales).tolist() == [0, 0, 1, 1]


def test_mxfp4_mismatched_shapes():
    with pytest.raises(DecodeError) as e:
        quant.mxfp4_dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8),
                               torch.zeros(2, 4, dtype=torch.uint8))
    assert str(e.value) == ("MXFP4 blocks [2, 3, 16] and scales [2, 4] do not match (need "
                            "blocks [..., G, 16] and scales [..., G])")


def _fp8_values(gen, *shape):
    """Random FP8 E4M3 codes (finite) as a float8 tensor."""
    bits = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C  # drop the NaN codes
    return bits.view(torch.float8_e4m3fn)


def test_fp8_block_scales_with_partial_edge_blocks(gen):
    q = _fp8_values(gen, 200, 300)  # edge blocks: 72 rows, 44 columns
    s = torch.exp2(torch.randint(-4, 4, (2, 3), generator=gen).float())
    W = quant.fp8_block_dequantize(q, s)
    expected = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.equal(W, expected)
    assert W[199, 299].item() == q[199, 299].float().item() * s[1, 2].item()
    assert W[127, 128].item() == q[127, 128].float().item() * s[0, 1].item()


def test_fp8_block_encoder_round_trip_is_close(gen):
    W = torch.randn(130, 257, generator=gen)
    q, s = encode_fp8_block(W)
    assert s.shape == (2, 3)
    assert torch.allclose(quant.fp8_block_dequantize(q, s), W, rtol=0.07, atol=1e-4)


def test_fp8_block_scale_shape_must_match():
    with pytest.raises(DecodeError) as e:
        quant.fp8_block_dequantize(torch.zeros(200, 300).to(torch.float8_e4m3fn), torch.ones(2, 2))
    assert str(e.value) == ("FP8 weight [200, 300] with 128x128 blocks needs scales [2, 3], "
                            "got [2, 2]")


def test_scaled_per_tensor_per_channel_per_group(gen):
    q = _fp8_values(gen, 4, 6)
    assert torch.equal(quant.scaled_dequantize(q, torch.tensor([0.5])), q.float() * 0.5)
    assert torch.equal(quant.scaled_dequantize(q, torch.tensor(0.25)), q.float() * 0.25)
    ch = torch.tensor([[1.0], [2.0], [4.0], [0.5]])
    assert torch.equal(quant.scaled_dequantize(q, ch), q.float() * ch)
    assert torch.equal(quant.scaled_dequantize(q, ch.reshape(4).to(torch.bfloat16)), q.float() * ch)
    grp = torch.tensor([[1.0, 2.0], [4.0, 8.0], [0.5, 1.0], [2.0, 2.0]])  # groups of 3 columns
    assert torch.equal(quant.scaled_dequantize(q, grp), q.float() * grp.repeat_interleave(3, 1))
    i8 = torch.tensor([[-128, 127], [3, -4]], dtype=torch.int8)
    assert quant.scaled_dequantize(i8, torch.tensor([[0.5], [2.0]])).tolist() == \
        [[-64.0, 63.5], [6.0, -8.0]]


def test_scaled_bad_scale_shape():
    with pytest.raises(DecodeError) as e:
        quant.scaled_dequantize(torch.zeros(4, 6, dtype=torch.int8), torch.ones(3, 1))
    assert str(e.value) == ("scale [3, 1] does not fit weight [4, 6] (need per-tensor [1], "
                            "per-channel [rows, 1] or per-group [rows, groups])")


def test_deinterleave_rows_and_columns():
    W = torch.arange(24.0).reshape(6, 4)
    gate, up = quant.deinterleave(W, 2, dim=0)
    assert gate.tolist() == [W[0].tolist(), W[2].tolist(), W[4].tolist()]
    assert up.tolist() == [W[1].tolist(), W[3].tolist(), W[5].tolist()]
    a, b = quant.deinterleave(W, 2, dim=1)
    assert torch.equal(a, W[:, 0::2]) and torch.equal(b, W[:, 1::2]) and a.is_contiguous()


def test_schemes_registered():
    assert {"dense", "mxfp4", "fp8_block128", "fp8_scaled", "int8_scaled"} <= set(DECODERS)


def _write(path, *tensors):
    """Raw bytes of tensors back to back; TensorInfos for them."""
    infos, off, data = [], 0, b""
    names = {torch.uint8: "U8", torch.float32: "F32"}
    for name, t in tensors:
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        infos.append(TensorInfo(name, names[t.dtype], tuple(t.shape), path, off, off + len(raw)))
        data += raw
        off += len(raw)
    path.write_bytes(data)
    return infos


def test_decode_fused_mxfp4_job_splits_gate_up_and_counts_nan_per_part(tmp_path, gen):
    gate, up = random_mxfp4_matrix(gen, 3, 64), random_mxfp4_matrix(gen, 3, 64)
    fused = torch.stack((gate, up), dim=1).reshape(6, 64)  # row 2i gate_i, row 2i+1 up_i
    blocks, scales = encode_mxfp4(fused)
    scales[2, 1] = 255  # row 2 = gate row 1
    infos = _write(tmp_path / "x.bin", ("e.gate_up_proj_blocks", blocks),
                   ("e.gate_up_proj_scales", scales))
    job = MatrixJob("e.gate_up_proj[0]", 0, "gate_up_proj", "mxfp4", tuple(infos), expert=0,
                    fused=("gate_proj", "up_proj"))
    with TensorReader() as r:
        out = list(decode(job, r, CPU))
    assert [(m.name, m.module, m.expert, m.nan_scales) for m in out] == [
        ("e.gate_up_proj[0].gate", "gate_proj", 0, 1), ("e.gate_up_proj[0].up", "up_proj", 0, 0)]
    assert torch.equal(out[1].W, up)
    assert torch.equal(torch.nan_to_num(out[0].W, nan=7.0)[1, 32:], torch.full((32,), 7.0))
    assert torch.equal(out[0].W[[0, 2]], gate[[0, 2]])
    assert isinstance(out[0], DecodedMatrix)


def test_fp4_table_matches_the_spec():
    assert quant.FP4_VALUES == tuple(FP4.tolist())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoders_stay_on_cuda(gen):
    dev = torch.device("cuda")
    blocks, scales = encode_mxfp4(random_mxfp4_matrix(gen, 2, 8, 64))
    W = quant.mxfp4_dequantize(blocks.to(dev), scales.to(dev))
    assert W.device.type == "cuda"
    assert torch.equal(W.cpu(), quant.mxfp4_dequantize(blocks, scales))
    q = _fp8_values(gen, 200, 300)
    s = torch.exp2(torch.randint(-4, 4, (2, 3), generator=gen).float())
    assert torch.equal(quant.fp8_block_dequantize(q.to(dev), s.to(dev)).cpu(),
                       quant.fp8_block_dequantize(q, s))


def test_mxfp4_encoder_rounds_to_nearest_code():
    W = torch.zeros(1, 32)
    W[0, :4] = torch.tensor([6.0, 0.7, -0.3, 2.6])
    blocks, scales = encode_mxfp4(W)
    assert scales.tolist() == [[127]]
    assert quant.mxfp4_dequantize(blocks, scales)[0, :4].tolist() == [6.0, 0.5, -0.5, 3.0]
