"""Hostile input: header fuzzing, shard names leaving the folder, pickles only on request."""

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import llm_audit
from llm_audit.errors import AuditError, FormatError, SourceError
from llm_audit.source import DTYPE_SIZES, open_checkpoint, read_header

from .conftest import write_safetensors_raw

# -- property-based fuzz of the header parser -------------------------------------------------

_ints = st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70), st.booleans(),
                  st.floats(allow_nan=True), st.text(max_size=3), st.none())
_entry = st.one_of(
    st.fixed_dictionaries({
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.text(max_size=5), _ints),
        "shape": st.one_of(st.lists(st.integers(0, 40), max_size=3), st.lists(_ints, max_size=3),
                           _ints),
        "data_offsets": st.one_of(st.lists(st.integers(0, 400), min_size=2, max_size=2),
                                  st.lists(_ints, max_size=3), _ints),
    }),
    st.dictionaries(st.text(max_size=4), _ints, max_size=3), _ints,
    st.lists(_ints, max_size=3))
_header = st.dictionaries(st.text(max_size=12), _entry, max_size=5)


def _check(path):
    size = path.stat().st_size
    try:
        tensors, meta = read_header(path)
    except AuditError:
        return
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    spans = []
    for t in tensors:  # every tensor lies within the data section of the file
        assert 8 + n <= t.begin <= t.end <= size
        if t.dtype in DTYPE_SIZES:
            assert t.nbytes == DTYPE_SIZES[t.dtype] * int(torch.tensor(t.shape).prod()) \
                if t.shape else t.nbytes == DTYPE_SIZES[t.dtype]
        if t.nbytes:
            spans.append((t.begin, t.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlaps
    assert isinstance(meta, dict)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=_header, data=st.binary(max_size=400), meta=st.one_of(st.none(), _ints,
       st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)))
def test_fuzz_structured_headers(tmp_path_factory, header, data, meta):
    if meta is not None:
        header = {**header, "__metadata__": meta}
    f = write_safetensors_raw(tmp_path_factory.mktemp("fz") / "x.safetensors", header, data)
    _check(f)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(claimed=st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1)),
       body=st.binary(max_size=600))
def test_fuzz_raw_bytes(tmp_path_factory, claimed, body):
    f = tmp_path_factory.mktemp("fz") / "x.safetensors"
    f.write_bytes(struct.pack("<Q", claimed) + body)
    _check(f)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=16))
def test_fuzz_tiny_files(tmp_path_factory, raw):
    f = tmp_path_factory.mktemp("fz") / "x.safetensors"
    f.write_bytes(raw)
    _check(f)


def test_deeply_nested_header_is_a_format_error(tmp_path):
    h = b"[" * 100_000 + b"]" * 100_000
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(FormatError, match="header is not valid JSON: RecursionError"):
        read_header(f)


def test_zero_size_tensors_may_share_offsets(tmp_path):
    f = write_safetensors_raw(tmp_path / "x.safetensors", {
        "a": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert [t.name for t in read_header(f)[0]] == ["a", "b"]


# -- shard names from the index ----------------------------------------------------------------

@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/passwd",
                                   "sub/../../evil.safetensors", ""])
def test_index_shards_outside_the_folder_are_refused(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(2, 2)}, tmp_path / "evil.safetensors")
    idx = model / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(FormatError) as e:
        open_checkpoint(model)
    assert str(e.value) == f"{idx}: shard name {shard!r} leaves the model folder; refusing it"


def test_index_shard_missing_is_a_source_error(tmp_path):
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"w": "nope.safetensors"}}))
    with pytest.raises(SourceError) as e:
        open_checkpoint(tmp_path)
    assert str(e.value) == (f"{idx}: shard 'nope.safetensors' is listed but missing from "
                            f"{tmp_path}")


# -- pickles ----------------------------------------------------------------------------------

class Boom:
    """Unpickling this runs a shell command (set per test)."""

    command = "true"

    def __reduce__(self):
        return (os.system, (self.command,))


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.fc.weight": torch.randn(64, 32, generator=g),
            "layers.0.fc.bias": torch.zeros(64),
            "layers.1.fc.weight": torch.randn(48, 32, generator=g).to(torch.bfloat16)}


def test_pickle_refused_without_flag_even_in_a_folder(tmp_path):
    torch.save(_weights(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"found pickle checkpoint pytorch_model.bin: convert it "
                                          r"to safetensors, or pass --allow-pickle"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_allow_pickle_gives_the_same_results_as_safetensors(tmp_path, suffix):
    w = _weights()
    torch.save({"state_dict": w, "epoch": 3}, tmp_path / f"model{suffix}")
    save_file(w, tmp_path / "ref.safetensors")
    got = llm_audit.audit(tmp_path / f"model{suffix}", allow_pickle=True, max_spectra=0).details
    ref = llm_audit.audit(tmp_path / "ref.safetensors", max_spectra=0).details
    cols = ["name", "N", "M", "dtype", "alpha", "log_norm", "rand_num_spikes"]
    assert got[cols].equals(ref[cols])
    assert list(got["name"]) == ["layers.0.fc.weight", "layers.1.fc.weight"]


def test_allow_pickle_folder(tmp_path):
    torch.save(_weights(), tmp_path / "pytorch_model.bin")
    ck = open_checkpoint(tmp_path, allow_pickle=True)
    assert ck.name == tmp_path.name
    assert sorted(t.name for t in ck.tensors) == sorted(_weights())
    tmp = ck.files[0].parent
    assert tmp.exists()
    del ck
    import gc

    gc.collect()
    assert not tmp.exists()  # the converted copy goes with the checkpoint


def test_malicious_pickle_is_never_executed(tmp_path):
    import pickle

    f = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    boom = Boom()
    boom.command = f"touch {marker}"
    torch.save({"w": torch.ones(2, 2), "x": boom}, f, pickle_module=pickle)
    with pytest.raises(FormatError) as e:
        open_checkpoint(f, allow_pickle=True)
    assert str(e.value).startswith(f"{f}: cannot load with torch.load(weights_only=True): "
                                   "UnpicklingError: ")
    assert "\n" not in str(e.value)
    assert not marker.exists()
    with pytest.raises(SourceError):
        open_checkpoint(f)  # and without the flag it is not even opened
