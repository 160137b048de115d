"""Which cache is this: the random id a cache gets when it is made, and the identity string derived from
its manifest (a cache replaced in the same directory has another)."""
from __future__ import annotations

import uuid
from typing import Any


def new_cache_id() -> str:
    """A fresh cache's identity, stored in its manifest as `cache_id` (kept on resume, new on --overwrite)."""
    return uuid.uuid4().hex


def cache_identity(manifest: dict[str, Any]) -> str:
    """Which cache a manifest describes: its `cache_id`, or for a cache made before cache ids, its `created`
    stamp. A derived result stores this and is stale when the cache's differs."""
    return str(manifest.get("cache_id") or f"created {manifest.get('created')}")
