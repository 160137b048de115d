"""Class count and class names of a cache (one home: the report, the pages and the offline clustering read them
here)."""
from __future__ import annotations

from typing import Any


def num_classes(cache: Any) -> int:
    """The number of model outputs the cache knows of: its class names, or more when a label or prediction
    lies beyond them."""
    names = cache.manifest.get("class_names") or []
    table = cache.columns(["label", "pred"])
    largest = int(max(table["label"].max(), table["pred"].max())) + 1 if len(table) else 0
    return max(len(names), largest)


def class_names(cache: Any) -> list[str]:
    """Class names by model output index (the manifest's, extended with numbers for any index beyond it)."""
    names = list(cache.manifest.get("class_names") or [])
    return names + [str(i) for i in range(len(names), num_classes(cache))]
