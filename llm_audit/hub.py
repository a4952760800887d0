"""Stage 1 (hub): resolve SOURCE — a local path, or a Hugging Face hub id ``org/name[@revision]``.

A local path that exists always wins. For a hub id, ``config.json`` and
``model.safetensors.index.json`` are fetched first; then only the shards holding tensors that
--include/--exclude keep are fetched (never a repo's ``original/`` or ``metal/`` copies: only
files the index names). Everything goes through huggingface_hub's cache, so a snapshot already in
``$HF_HUB_CACHE/models--org--name/snapshots/<sha>/`` is used offline (``HF_HUB_OFFLINE=1`` or no
network). The resolved commit sha becomes the checkpoint's `revision`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError
from .options import AuditOptions
from .plan import owner_name
from .source import INDEX_NAME, Checkpoint, load_weight_map, open_checkpoint

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None  # branch, tag or commit sha; None = main

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(source: str) -> HubRef | None:
    """'org/name' or 'org/name@rev' -> HubRef; anything else (a path-like string) -> None."""
    m = _REPO_RE.match(str(source))
    return HubRef(m["repo"], m["rev"]) if m else None


def resolve_source(source: str | os.PathLike, opts: AuditOptions | None = None, *,
                   allow_pickle: bool = False) -> Checkpoint:
    """Open SOURCE: an existing local file or folder, else a hub repo id (downloading or cached)."""
    ref = None if Path(source).exists() else parse_hub_id(str(source))
    if ref is None:
        return open_checkpoint(source, allow_pickle=allow_pickle)
    return open_hub(ref, opts or AuditOptions())


def open_hub(ref: HubRef, opts: AuditOptions) -> Checkpoint:
    """Fetch (or find in the cache) what the audit of `ref` needs and open it."""
    index = _fetch(ref, INDEX_NAME, ref.revision, optional=True)
    if index is not None:
        snapshot = index.parent
        shards = pick_shards(load_weight_map(index), opts)
    else:
        first = _fetch(ref, SINGLE_FILE, ref.revision)
        snapshot, shards = first.parent, [SINGLE_FILE]
    sha = snapshot.name
    _fetch(ref, "config.json", sha, optional=True)
    for shard in shards:
        _fetch(ref, shard, sha)
    log.info("%s: revision %s, %d shard(s)", ref, sha, len(shards))
    if index is None:
        return open_checkpoint(snapshot / SINGLE_FILE, name=ref.repo, revision=sha)
    return open_checkpoint(snapshot, name=ref.repo, revision=sha, shards=shards)


def pick_shards(weight_map: Mapping[str, str], opts: AuditOptions) -> list[str]:
    """Shards holding a tensor the audit needs: a wanted weight, or a scale of a wanted weight.

    --include/--exclude match the weight's tensor name, as they do in the plan; shards whose
    tensors are all excluded are not downloaded.
    """
    return sorted({shard for name, shard in weight_map.items() if opts.wants(owner_name(name))})


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or \
        bool(constants.HF_HUB_OFFLINE)


def _fetch(ref: HubRef, filename: str, revision: str | None, *,
           optional: bool = False) -> Path | None:
    """One file of the repo, from the cache or the hub. Optional files may be absent (None)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
    )

    try:
        return Path(hf_hub_download(ref.repo, filename, revision=revision,
                                    cache_dir=hub_cache_dir(), local_files_only=offline()))
    except RemoteEntryNotFoundError:
        if optional:
            return None
        raise SourceError(f"{ref}: the repo has no {filename} (llm-audit reads safetensors "
                          "checkpoints: model.safetensors or model.safetensors.index.json)") \
            from None
    except LocalEntryNotFoundError as e:
        if optional and _snapshot_cached(ref, revision):
            return None
        raise _not_cached(ref, filename, revision) from e
    except HFValidationError as e:
        raise SourceError(f"{ref}: not a local path, and not a valid hub repo id ({e})") from None
    except Exception as e:  # noqa: BLE001 - huggingface_hub's HTTP errors, mapped to one line
        raise hub_error(ref, e) from e


def _snapshot_cached(ref: HubRef, revision: str | None) -> bool:
    folder = hub_cache_dir() / ("models--" + ref.repo.replace("/", "--"))
    rev = revision or "main"
    ref_file = folder / "refs" / rev
    sha = ref_file.read_text().strip() if ref_file.is_file() else rev
    return (folder / "snapshots" / sha).is_dir()


def _not_cached(ref: HubRef, filename: str, revision: str | None) -> SourceError:
    where = hub_cache_dir()
    why = "HF_HUB_OFFLINE=1" if offline() else "no network"
    if not _snapshot_cached(ref, revision):
        return SourceError(f"{ref}: not in the local Hugging Face cache ({where}) and the hub "
                           f"cannot be reached ({why}); connect to the network once, or run "
                           f"`hf download {ref.repo}` where there is one")
    return SourceError(f"{ref}: {filename} is not in the local Hugging Face cache ({where}) and "
                       f"the hub cannot be reached ({why}); connect to the network once to "
                       "fetch it")


def hub_error(ref: HubRef, e: Exception) -> SourceError:
    """A one-line SourceError for a huggingface_hub failure, naming the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return SourceError(f"{ref.repo} is a gated repo and no token with access was found: "
                           f"accept its terms on https://huggingface.co/{ref.repo}, then run "
                           "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return SourceError(f"{ref.repo}: unknown repo (neither a local path nor a model on the "
                           "Hugging Face hub; check the spelling, and for a private repo run "
                           "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return SourceError(f"{ref.repo}: revision {ref.revision!r} not found (give a branch, tag "
                           "or commit sha of the repo)")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return SourceError(f"{ref}: the Hugging Face hub answered HTTP {status}: {first}")
    return SourceError(f"{ref}: cannot reach the Hugging Face hub ({type(e).__name__}: {e}); "
                       "check the network, or set HF_HUB_OFFLINE=1 to use the local cache")

