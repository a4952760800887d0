"""Hub ids resolved from a fake Hugging Face cache, offline. Nothing here touches the network."""

import hashlib
import json
import os

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

import llm_audit
from llm_audit import hub
from llm_audit.errors import SourceError
from llm_audit.options import AuditOptions

from .checkpoints import write_gpt_oss

REPO = "acme/gpt-oss-tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import by the library
    return root


def cache_repo(cache, src, repo=REPO, sha=SHA, skip=()):
    """Put the files of folder `src` in the standard cache layout: blobs + snapshot symlinks."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    snap = folder / "snapshots" / sha
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for f in sorted(src.iterdir()):
        if f.name in skip:
            continue
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gpt_oss(tmp_path_factory.mktemp("src") / "tiny", layers=2, width=64, experts=2)


def test_audit_by_repo_id_offline_records_the_sha(cache, tiny):
    cache_repo(cache, tiny)
    res = llm_audit.audit(REPO, randomize=False, include=r"layers\.1\.self_attn\.q")
    assert res.summary.revision == SHA and res.summary.model == REPO
    assert list(res.details["name"]) == ["model.layers.1.self_attn.q_proj.weight"]
    res = llm_audit.audit(f"{REPO}@{SHA}", randomize=False, include=r"layers\.0\.mlp\.router")
    assert res.summary.revision == SHA and len(res.details) == 1


def test_only_needed_shards_are_required(cache, tiny):
    wm = json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]
    last = wm["lm_head.weight"]
    first = wm["model.embed_tokens.weight"]
    assert first != last
    cache_repo(cache, tiny, skip=(first,))  # the first shard was never downloaded
    res = llm_audit.audit(REPO, randomize=False, include=r"lm_head")
    assert list(res.details["name"]) == ["lm_head.weight"]
    with pytest.raises(SourceError) as e:
        llm_audit.audit(REPO, randomize=False, include=r"embed")
    assert str(e.value) == (f"{REPO}: {first} is not in the local Hugging Face cache ({cache}) "
                            "and the hub cannot be reached (HF_HUB_OFFLINE=1); connect to the "
                            "network once to fetch it")


def test_nothing_cached_offline_is_one_clear_line(cache):
    with pytest.raises(SourceError) as e:
        llm_audit.audit("acme/never-downloaded")
    assert str(e.value) == (f"acme/never-downloaded: not in the local Hugging Face cache ({cache}) "
                            "and the hub cannot be reached (HF_HUB_OFFLINE=1); connect to the "
                            "network once, or run `hf download acme/never-downloaded` "
                            "where there is one")


def test_cli_exit_code_2_for_uncached_repo(cache, capsys):
    from llm_audit.cli import main

    assert main(["acme/never-downloaded", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-audit: error: acme/never-downloaded: not in the local Hugging Face")
    assert "\n" not in err


def test_local_path_wins_over_hub_id(tmp_path, cache, tiny, monkeypatch):
    local = tmp_path / "acme" / "gpt-oss-tiny"
    local.parent.mkdir()
    local.symlink_to(tiny, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    ck = hub.resolve_source(REPO)  # nothing cached: only the local folder can answer
    assert ck.revision is None and len(ck.tensors) > 0


def test_pick_shards_sees_include_exclude_and_scales():
    wm = {"model.embed_tokens.weight": "s1",
          "model.layers.0.mlp.experts.down_proj_blocks": "s1",
          "model.layers.0.mlp.experts.down_proj_scales": "s2",
          "model.layers.1.self_attn.q_proj.weight": "s3",
          "model.layers.1.self_attn.q_proj.weight_scale_inv": "s4",
          "lm_head.weight": "s5"}
    assert hub.pick_shards(wm, AuditOptions()) == ["s1", "s2", "s3", "s4", "s5"]
    assert hub.pick_shards(wm, AuditOptions(include="down_proj")) == ["s1", "s2"]
    assert hub.pick_shards(wm, AuditOptions(include=r"layers\.1")) == ["s3", "s4"]
    assert hub.pick_shards(wm, AuditOptions(exclude="embed|lm_head|layers")) == []
    assert hub.pick_shards(wm, AuditOptions(exclude=r"embed|layers\.0")) == ["s3", "s4", "s5"]
    assert hub.pick_shards(wm, AuditOptions(exclude="scale")) == ["s1", "s2", "s3", "s4", "s5"]


def test_parse_hub_id():
    assert hub.parse_hub_id("openai/gpt-oss-20b") == hub.HubRef("openai/gpt-oss-20b")
    assert hub.parse_hub_id("openai/gpt-oss-20b@refs/pr/3") == \
        hub.HubRef("openai/gpt-oss-20b", "refs/pr/3")
    assert hub.parse_hub_id("./model.safetensors") is None
    assert hub.parse_hub_id("/abs/path") is None
    assert hub.parse_hub_id("a/b/c") is None


def _http(status):
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub 2.x's HTTP client
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))


def test_gated_and_unknown_repo_errors(cache, monkeypatch):
    def raise_(exc):
        def fake(*args, **kwargs):
            raise exc
        return fake

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        raise_(GatedRepoError("gated", response=_http(403))))
    with pytest.raises(SourceError) as e:
        llm_audit.audit("meta-llama/Secret")
    assert str(e.value) == ("meta-llama/Secret is a gated repo and no token with access was "
                            "found: accept its terms on https://huggingface.co/meta-llama/Secret, "
                            "then run `hf auth login` (formerly `huggingface-cli login`) or set "
                            "HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        raise_(RepositoryNotFoundError("nope", response=_http(404))))
    with pytest.raises(SourceError) as e:
        llm_audit.audit("acme/typo")
    assert str(e.value) == ("acme/typo: unknown repo (neither a local path nor a model on the "
                            "Hugging Face hub; check the spelling, and for a private repo run "
                            "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN)")


def test_single_file_repo_offline(cache, tmp_path):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "single"
    src.mkdir()
    save_file({"encoder.layer.0.dense.weight": torch.randn(24, 16)}, src / "model.safetensors")
    cache_repo(cache, src, repo="acme/single")
    ck = hub.resolve_source("acme/single")
    assert (ck.name, ck.revision) == ("acme/single", SHA)
    assert [t.name for t in ck.tensors] == ["encoder.layer.0.dense.weight"]
