import json

import pytest
import torch
from safetensors.torch import save_file

from llm_audit.errors import FormatError, SourceError
from llm_audit.source import open_checkpoint, read_header

from .conftest import write_safetensors_raw


def test_reads_tensors_in_file_order_with_absolute_offsets(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"b.weight": torch.ones(3, 4), "a.weight": torch.zeros(2, 2, dtype=torch.bfloat16)},
              f)
    tensors, _ = read_header(f)
    by_name = {t.name: t for t in tensors}
    assert by_name["b.weight"].shape == (3, 4) and by_name["b.weight"].dtype == "F32"
    assert by_name["a.weight"].nbytes == 8
    raw = f.read_bytes()
    t = by_name["b.weight"]
    got = torch.frombuffer(bytearray(raw[t.begin:t.end]), dtype=torch.float32)
    assert got.tolist() == [1.0] * 12


def test_missing_path_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"hello, this is not a checkpoint at all")
    with pytest.raises(FormatError) as e:
        read_header(f)
    assert str(e.value).startswith(f"{f}: not a safetensors file or truncated (header claims")


def test_header_size_lies(tmp_path):
    f = write_safetensors_raw(tmp_path / "x.safetensors",
                              {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
                              b"\0" * 32)
    with pytest.raises(FormatError) as e:
        read_header(f)
    assert str(e.value) == (f"{f}: tensor 'w': data ends at byte {f.stat().st_size + 32} but the "
                            f"file has {f.stat().st_size} bytes (truncated download?)")


def test_shape_and_offsets_disagree(tmp_path):
    f = write_safetensors_raw(tmp_path / "x.safetensors",
                              {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}},
                              b"\0" * 64)
    with pytest.raises(FormatError, match=r"F32 \[4, 4\] needs 64 bytes but data_offsets give 60"):
        read_header(f)


def test_overlapping_tensors(tmp_path):
    f = write_safetensors_raw(tmp_path / "x.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    with pytest.raises(FormatError, match="tensor 'b' overlaps tensor 'a'"):
        read_header(f)


def _shard(folder, name, tensors):
    save_file(tensors, folder / name)


def test_sharded_routes_every_tensor_through_weight_map(tmp_path):
    # layer 0 straddles both shards; shard 2 also holds a stale copy of a tensor that the index
    # maps to shard 1: the index decides which copy is read.
    _shard(tmp_path, "s1.safetensors", {"layers.0.q.weight": torch.ones(4, 4)})
    _shard(tmp_path, "s2.safetensors", {"layers.0.k.weight": torch.ones(4, 4),
                                        "layers.0.q.weight": torch.zeros(4, 4)})
    idx = {"weight_map": {"layers.0.q.weight": "s1.safetensors",
                          "layers.0.k.weight": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    ck = open_checkpoint(tmp_path)
    got = {t.name: t.file.name for t in ck.tensors}
    assert got == {"layers.0.q.weight": "s1.safetensors", "layers.0.k.weight": "s2.safetensors"}


def test_index_shard_escaping_folder_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    _shard(tmp_path, "evil.safetensors", {"w": torch.ones(2, 2)})
    idx = {"weight_map": {"w": "../evil.safetensors"}}
    (tmp_path / "model" / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match=r"shard name '../evil.safetensors' leaves the model"):
        open_checkpoint(tmp_path / "model")


def test_pickle_refused_without_flag(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(b"whatever")
    with pytest.raises(SourceError, match="pickle checkpoints are not opened by default"):
        open_checkpoint(f)
