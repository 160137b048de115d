"""Which cache is this, and which state of it. One home for these notions:

- identity, which cache: `cache_identity(manifest)` (the random id a cache gets when it is made; a cache
  replaced in the same directory has another), and `identity_record(manifest)`, the fields the tag database
  stores to the same end;
- state, which content: `cache_fingerprint(cache)` (the generation and the committed ids; the offline
  clustering's results record it) and `cache_state(cache)` (the identity and the manifest's progress stamps;
  the dashboard's cached computations are keyed by it), and `files_state(root)`, the same
  question asked of the files before the cache is opened (the dashboard reopens a cache when it changes). A
  derived result made on another state is stale.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def new_cache_id() -> str:
    """A fresh cache's identity, stored in its manifest as `cache_id` (kept on resume, new on --overwrite)."""
    return uuid.uuid4().hex


def cache_identity(manifest: dict[str, Any]) -> str:
    """Which cache a manifest describes: its `cache_id`, or for a cache made before cache ids, its `created`
    stamp. A derived result stores this and is stale when the cache's differs."""
    return str(manifest.get("cache_id") or f"created {manifest.get('created')}")


def identity_record(manifest: dict[str, Any]) -> dict[str, str]:
    """What ties tags to a cache: the manifest's `created` stamp, the dataset fingerprint and `cache_id` (a
    random id per cache made; "None" in caches made before it existed)."""
    return {"cache_created": str(manifest.get("created")),
            "dataset_fingerprint": str((manifest.get("dataset") or {}).get("fingerprint")),
            "cache_id": str(manifest.get("cache_id"))}


# Options of the explain job that may change when it resumes: they change no stored number, so they are not
# part of the cache's content fingerprint (the job's plan reads them here).
RUNTIME_OPTIONS = ("batch_size", "device", "workers")


def cache_fingerprint(cache: Any) -> str:
    """Identifies what a cache holds: its generation (the manifest's creation, model weights, dataset files,
    options) and the ids of its committed images. Results computed on another fingerprint are stale: an
    `--overwrite` or a resume that added shards changes it; a resume that added nothing does not."""
    manifest = cache.manifest
    identity = {
        "created": manifest.get("created"),
        "weights": (manifest.get("model") or {}).get("weights_sha256"),
        "spec": (manifest.get("model") or {}).get("spec"),
        "dataset": (manifest.get("dataset") or {}).get("fingerprint"),
        "options": {k: v for k, v in (manifest.get("options") or {}).items() if k not in RUNTIME_OPTIONS},
        "class_names": manifest.get("class_names"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(cache.ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def cache_state(cache: Any) -> str:
    """Identifies what the cache holds, so a saved clustering of another cache in the same directory (before an
    --overwrite) or of an older state of this one is never reused."""
    return f"{cache.identity}|{cache.manifest.get('updated', '')}|{len(cache)}|{cache.manifest.get('finished', '')}"


def files_state(root: Path | str) -> tuple:
    """The state of a cache directory as its files show it, without opening it: the manifest's, the compacted
    parts' and the shards' names and modification times. It changes when the job commits a shard or finishes,
    so an open dashboard picks up a running job's progress on reload."""
    root = Path(root)
    parts = [root / "manifest.json", *sorted(root.glob("compact-*")), *sorted((root / "shards").glob("shard-*"))]
    return tuple((p.name, p.stat().st_mtime_ns) for p in parts if p.exists())
