"""--plan: jobs, skips, shards and the estimate from headers alone. The hub is faked
(get_safetensors_metadata returns huggingface_hub's own records built from local files; every
download is recorded); nothing here touches the network or reads tensor data."""

import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import NotASafetensorsRepoError, RepositoryNotFoundError
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from safetensors.torch import save_file

from llm_audit import hub, plan_report, source
from llm_audit.errors import FormatError, SourceError
from llm_audit.options import AuditOptions
from llm_audit.pipeline import plan
from llm_audit.plan_report import matrix_seconds, plan_source

from .checkpoints import write_gpt_oss

REPO = "acme/gpt-oss-tiny"
SHA = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return write_gpt_oss(tmp_path_factory.mktemp("src") / "tiny", layers=2, width=64, experts=2)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense BF16 single-file model with two tensors the planner skips."""
    folder = tmp_path_factory.mktemp("dense") / "llama-tiny"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    tensors = {"model.embed_tokens.weight": torch.randn(80, 32, generator=g).to(bf)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": torch.randn(32, 32, generator=g).to(bf),
                    p + "mlp.down_proj.weight": torch.randn(32, 48, generator=g).to(bf),
                    p + "input_layernorm.weight": torch.ones(32, dtype=bf),
                    p + "mlp.odd.weight": torch.randn(2, 4, 8, generator=g).to(bf),
                    p + "mlp.int.weight": torch.ones(16, 16, dtype=torch.int8)}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    head.pop("__metadata__", None)
    return head, 8 + n


def repo_metadata(folder: Path) -> SafetensorsRepoMetadata:
    """What get_safetensors_metadata returns for `folder` put on the hub (real records)."""
    index = folder / source.INDEX_NAME
    wm = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    files = sorted(set(wm.values())) if wm else ["model.safetensors"]
    meta = {}
    for f in files:
        head, _ = header(folder / f)
        meta[f] = SafetensorsFileMetadata(metadata={}, tensors={
            k: TensorInfo(dtype=v["dtype"], shape=v["shape"],
                          data_offsets=tuple(v["data_offsets"])) for k, v in head.items()})
    if wm is None:
        wm = {k: "model.safetensors" for k in meta["model.safetensors"].tensors}
    return SafetensorsRepoMetadata(metadata=None, sharded=index.is_file(), weight_map=wm,
                                   files_metadata=meta)


class FakeHub:
    """get_safetensors_metadata and hf_hub_download of one repo; records every call."""

    def __init__(self, folder: Path, snapshots: Path, config: bool = True, error=None):
        self.folder, self.config, self.error = folder, config, error
        self.snapshot = snapshots / SHA
        self.metadata_calls: list[tuple] = []
        self.downloads: list[str] = []

    def get_safetensors_metadata(self, repo_id, revision=None, **kw):
        self.metadata_calls.append((repo_id, revision))
        if self.error is not None:
            raise self.error
        return repo_metadata(self.folder)

    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        from huggingface_hub.errors import RemoteEntryNotFoundError

        self.downloads.append(filename)
        if filename != "config.json":
            raise AssertionError(f"--plan downloaded {filename}")
        if not self.config or not (self.folder / filename).is_file():
            raise RemoteEntryNotFoundError("no config.json", response=_response(404))
        self.snapshot.mkdir(parents=True, exist_ok=True)
        (self.snapshot / filename).write_bytes((self.folder / filename).read_bytes())
        return str(self.snapshot / filename)


def _response(status):
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub 2.x's HTTP client
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))


@pytest.fixture
def online(tmp_path, monkeypatch):
    """The hub 'reachable' (HF_HUB_OFFLINE off), its cache in tmp_path; install(FakeHub)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def install(folder, **kw):
        fake = FakeHub(folder, tmp_path / "snapshots", **kw)
        monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata",
                            fake.get_safetensors_metadata)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
        return fake
    return install


@pytest.fixture
def no_reads(monkeypatch):
    """Reading tensor bytes raises: a plan must never need them."""
    def refuse(*args, **kwargs):
        raise AssertionError("--plan read tensor data")
    from llm_audit import decode

    monkeypatch.setattr(source, "read_bytes", refuse)
    monkeypatch.setattr(decode, "read_bytes", refuse)
    monkeypatch.setattr(decode.TensorReader, "raw", refuse)


def rows(p):
    """plan.json rows with the file reduced to its shard name (hub: already a name)."""
    return [dict(r, file=Path(r["file"]).name) for r in p.to_json()["matrices"]]


def job_key(j, starts):
    return (j.name, j.layer, j.module, j.scheme, j.expert, j.fused, j.fused_dim, j.transposed,
            tuple((t.name, t.dtype, t.shape, Path(t.file).name, t.begin - starts[t.file],
                   t.nbytes) for t in j.parts))


OPTIONS = [AuditOptions(), AuditOptions(include=r"layers\.1\."), AuditOptions(exclude="experts"),
           AuditOptions(include="lm_head", randomize=False)]


@pytest.mark.parametrize("opts", OPTIONS, ids=["all", "layer1", "no-experts", "lm_head"])
@pytest.mark.parametrize("which", ["gpt_oss", "dense"])
def test_hub_plan_equals_local_planner(which, opts, request, online, no_reads):
    folder = request.getfixturevalue(which)
    fake = online(folder)
    got = plan_source(REPO, opts)
    ckpt = source.open_checkpoint(folder)
    local_jobs, local_skipped = plan(ckpt, opts)
    starts = {f: header(f)[1] for f in ckpt.files}
    starts |= {Path(f.name): 0 for f in ckpt.files}  # hub offsets: from the data region
    assert [job_key(j, starts) for j in got.jobs] == [job_key(j, starts) for j in local_jobs]
    assert list(got.skipped) == local_skipped
    local = plan_source(folder, opts)
    assert rows(got) == rows(local) and got.ignored == local.ignored
    assert got.filtered_out == local.filtered_out
    assert (got.model, got.revision, got.hub, local.hub) == (REPO, SHA, True, False)
    # only config.json was downloaded; the headers came from get_safetensors_metadata
    assert fake.downloads == ["config.json"] and fake.metadata_calls == [(REPO, None)]
    sizes = {f.name: f.stat().st_size - header(f)[1] for f in ckpt.files}
    assert {s.name: s.bytes for s in got.shards} == sizes
    if which == "gpt_oss":
        wm = hub.load_weight_map(folder / source.INDEX_NAME)
        assert [s.name for s in got.shards if s.download] == hub.pick_shards(wm, opts)
    else:
        assert [s.download for s in got.shards] == [True]  # one file: always downloaded
    assert got.download_bytes == sum(sizes[s.name] for s in got.shards if s.download)
    assert got.read_bytes == sum(j.nbytes for j in local_jobs)
    assert sum(s.planned_bytes for s in got.shards) == got.read_bytes


def test_gpt_oss_plan_contents(gpt_oss, online):
    online(gpt_oss)
    p = plan_source(f"{REPO}@main", AuditOptions(include=r"layers\.0\.mlp"))
    d = p.to_json()
    names = [r["name"] for r in d["matrices"]]
    assert names == ["model.layers.0.mlp.router.weight",
                     "model.layers.0.mlp.experts.gate_up_proj[0]",
                     "model.layers.0.mlp.experts.gate_up_proj[1]",
                     "model.layers.0.mlp.experts.down_proj[0]",
                     "model.layers.0.mlp.experts.down_proj[1]"]
    gu = d["matrices"][1]
    assert (gu["dtype"], gu["shape"], gu["matrices"], gu["fused"], gu["expert"], gu["layer"]) \
        == ("mxfp4", [64, 64], 2, ["gate_proj", "up_proj"], 0, 0)
    assert d["totals"]["matrices"] == 1 + 2 * 2 + 2 and d["skipped"] == []
    # 2 layers x (4 attention + router + 2 x 2 experts) + embed + lm_head, less the 5 planned
    assert d["filtered_out"] == 2 * 9 + 2 - 5
    # layer 0's gate_up blocks are in shard 1, its scales in shard 2: both are downloaded
    assert [s["download"] for s in d["shards"]] == [True, True]
    assert d["revision"] == SHA and json.loads(json.dumps(d)) == d


def test_mxfp4_without_config_is_skipped_with_the_reason(gpt_oss, online):
    online(gpt_oss, config=False)
    p = plan_source(REPO, AuditOptions(include=r"layers\.0\.mlp\.experts\.down"))
    assert p.jobs == () and p.revision is None
    assert [(s.name, s.reason) for s in p.skipped] == [
        ("model.layers.0.mlp.experts.down_proj_blocks",
         "U8 '_blocks' tensor looks like MXFP4 but config.json's "
         "quantization_config.quant_method is None, not 'mxfp4'; put the model's config.json "
         "next to the weights")]


def test_dense_skips_and_ignored(dense, online):
    online(dense)
    p = plan_source(REPO)
    assert sorted({(s.name.split(".")[-2], s.reason) for s in p.skipped}) == [
        ("int", "dtype I8 needs a quantization scheme but config.json has no "
                "quantization_config.quant_method; put the model's config.json next to it"),
        ("odd", "3-D tensor with no known expert layout")]
    assert dict(p.ignored) == {"1-D": 2}  # the layernorms (1-D is decided first)
    assert sorted(j.name for j in p.jobs) == [
        "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight"]
    lines = plan_report.plan_lines(p)
    assert lines[0].startswith(f"{REPO}@{SHA} (safetensors, hub): 5 jobs, 5 matrices")
    assert any(line.startswith("skipped 2: 3-D tensor") for line in lines)
    assert "download: 1 of 1 shard(s)" in "\n".join(lines)


def test_hub_errors(gpt_oss, online, monkeypatch):
    fake = online(gpt_oss, error=RepositoryNotFoundError("nope", response=_response(404)))
    with pytest.raises(SourceError) as e:
        plan_source("acme/typo")
    assert str(e.value) == ("acme/typo: unknown repo (neither a local path nor a model on the "
                            "Hugging Face hub; check the spelling, and for a private repo run "
                            "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN)")
    fake.error = NotASafetensorsRepoError("'acme/gguf-only' is not a safetensors repo.")
    with pytest.raises(SourceError) as e:
        plan_source("acme/gguf-only")
    assert str(e.value) == ("acme/gguf-only: the repo has no model.safetensors or "
                            "model.safetensors.index.json; --plan reads safetensors headers "
                            "from the hub (a GGUF repo: download the .gguf file and plan it "
                            "locally)")
    fake.error = ConnectionError("Name or service not known")
    with pytest.raises(SourceError) as e:
        plan_source(REPO)
    assert str(e.value) == (f"{REPO}: cannot reach the Hugging Face hub (ConnectionError: Name "
                            "or service not known); check the network, or set HF_HUB_OFFLINE=1 "
                            "to use the local cache")
    assert fake.downloads == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = len(fake.metadata_calls)
    with pytest.raises(SourceError) as e:
        plan_source(REPO)
    assert str(e.value) == (f"{REPO}: --plan reads the shards' headers from the Hugging Face "
                            "hub, which cannot be reached (HF_HUB_OFFLINE=1); unset "
                            "HF_HUB_OFFLINE, or plan a downloaded copy by its local path")
    assert len(fake.metadata_calls) == calls  # offline: the hub is not even asked


def test_lying_hub_header_is_refused(gpt_oss, online, monkeypatch):
    online(gpt_oss)
    meta = repo_metadata(gpt_oss)
    shard = sorted(meta.files_metadata)[0]
    name = next(iter(meta.files_metadata[shard].tensors))
    meta.files_metadata[shard].tensors[name] = TensorInfo(dtype="BF16", shape=[64, 64],
                                                          data_offsets=(0, 10))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda *a, **k: meta)
    with pytest.raises(FormatError) as e:
        plan_source(REPO)
    assert str(e.value) == (f"{REPO}: {shard}: tensor {name!r}: BF16 [64, 64] needs 8192 bytes "
                            "but data_offsets give 10; the header lies or the file is corrupt")
    del meta.files_metadata[shard]
    with pytest.raises(FormatError) as e:
        plan_source(REPO)
    assert str(e.value) == (f"{REPO}: model.safetensors.index.json maps tensors to {shard!r} "
                            "but the hub gave no header for it")


def test_local_plan_reads_headers_only(tmp_path, dense, no_reads):
    """Garbage in the data region (sizes valid): the plan does not notice, it never reads it."""
    f = tmp_path / "garbage.safetensors"
    raw = bytearray((dense / "model.safetensors").read_bytes())
    start = header(dense / "model.safetensors")[1]
    n = len(raw) - start
    raw[start:] = ((b"\xff\xff\x7f\xff" + bytes(range(256))) * (n // 260 + 1))[:n]
    f.write_bytes(bytes(raw))
    got = plan_source(f)
    assert [r["name"] for r in rows(got)] == [r["name"] for r in rows(plan_source(dense))]
    assert got.shards[0].bytes == f.stat().st_size and not got.shards[0].download
    f.write_bytes(bytes(raw[:-1]))  # truncated: the header validation itself refuses it
    with pytest.raises(FormatError, match="truncated download"):
        plan_source(f)


def test_local_gguf_plan(tmp_path, no_reads):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 64), dtype=np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight", np.ones((2, 16, 32), dtype=np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    d = plan_source(path).to_json()
    assert [(r["name"], r["dtype"], r["hf_module"], r["shape"]) for r in d["matrices"]] == [
        ("blk.0.attn_q.weight", "F32", "q_proj", [32, 64]),
        ("blk.0.ffn_down_exps.weight[0]", "F16", "down_proj", [16, 32]),
        ("blk.0.ffn_down_exps.weight[1]", "F16", "down_proj", [16, 32])]
    assert d["format"] == "gguf" and d["ignored"] == {"1-D": 1}


def test_cost_model():
    assert matrix_seconds(1024, 1024, 1, "cuda", "ww") is None
    one = matrix_seconds(4096, 1024, 1, "cpu", "ww")
    assert one == matrix_seconds(1024, 4096, 1, "cpu", "ww") > 0  # orientation does not matter
    assert math.isclose(matrix_seconds(4096, 1024, 3, "cpu", "ww"), 3 * one)
    for rule in ("none", "ww", "tw", "perm"):
        assert matrix_seconds(512, 512, 1, "cpu", rule) < matrix_seconds(2048, 2048, 1, "cpu",
                                                                         rule)
    assert matrix_seconds(2048, 2048, 1, "cpu", "none") < \
        matrix_seconds(2048, 2048, 1, "cpu", "ww") < matrix_seconds(2048, 2048, 1, "cpu", "perm")


def test_estimate_counts_fused_halves(gpt_oss, no_reads):
    p = plan_source(gpt_oss, AuditOptions(include=r"layers\.0\.mlp\.experts\.gate_up"))
    assert len(p.jobs) == 2 and p.matrices == 4 and p.estimate.matrices == 4
    assert math.isclose(p.estimate.seconds, 4 * matrix_seconds(64, 64, 1, "cpu", "ww"))
    assert p.estimate.trap_rule == "ww"
    assert plan_source(gpt_oss, AuditOptions(randomize=False)).estimate.trap_rule == "none"


def test_cli_plan_hub(gpt_oss, online, tmp_path, capsys):
    from llm_audit.cli import main

    fake = online(gpt_oss)
    out = tmp_path / "out"
    assert main([REPO, "--plan", "--out", str(out), "--include", "lm_head"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == (f"{REPO}@{SHA} (safetensors, hub): 1 jobs, 1 matrices, "
                                    "12.3 kB of weights to read")
    assert "download: 1 of 2 shard(s)" in text and f"plan: {out / 'plan.json'}" in text
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]  # no report, no journal
    d = json.loads((out / "plan.json").read_text())
    assert [r["name"] for r in d["matrices"]] == ["lm_head.weight"]
    assert fake.downloads == ["config.json"]


def test_cli_plan_local_and_errors(gpt_oss, tmp_path, capsys, monkeypatch, no_reads):
    from llm_audit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([str(gpt_oss), "--plan", "--device", "cpu"]) == 0
    assert (tmp_path / "reports" / "tiny" / "plan.json").is_file()
    assert "estimate on cpu (trap rule ww)" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.safetensors"), "--plan"]) == 2
    assert capsys.readouterr().err.startswith("llm-audit: error: ")
