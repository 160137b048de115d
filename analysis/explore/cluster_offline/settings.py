"""What an offline clustering run covers: the scopes (all, mistakes, each true and each predicted class) and the
names of the files it writes (its settings are the engine's, analysis.explore.clustering.ClusteringSettings)."""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.cache.classes import class_names as class_names_of  # noqa: F401 (offline.class_names_of)
from analysis.cache.identity import RUNTIME_OPTIONS, cache_fingerprint  # noqa: F401 (re-exported)
from analysis.explore.clustering import ClusteringInputError
from analysis.cache import ANALYSIS_DIR


RESULTS_DIR = ANALYSIS_DIR               # CACHE/analysis/
CLUSTERING_DIR = "clustering"            # CACHE/analysis/clustering/<run>/<scope>/
CLASS_MAPS_FILE = "class_maps.parquet"   # CACHE/analysis/class_maps.parquet
TMP_PREFIX = ".tmp-"
SCOPE_PREFIX = "scope-"
FORMAT_VERSION = 2                       # 2: the suspicion's off-the-object part is background_hotspot
SCOPE_GROUPS = ("all", "mistakes", "true", "pred")   # "true" / "pred": one scope per class
DEFAULT_SCOPES = SCOPE_GROUPS
DENSITY_BINS = 256
TOP_TO_VERIFY = 3


def expand_scopes(requested: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Scope names for a request: 'all', 'mistakes', 'true' (every 'true:<class>'), 'pred' (every
    'pred:<class>'), or single 'true:<class>' / 'pred:<class>'. ClusteringInputError for an unknown one."""
    out: list[str] = []
    for item in requested:
        if item in ("all", "mistakes"):
            names = [item]
        elif item in ("true", "pred"):
            names = [f"{item}:{name}" for name in class_names]
        else:
            kind, sep, name = item.partition(":")
            if not sep or kind not in ("true", "pred"):
                raise ClusteringInputError(f"unknown scope {item!r}: use all, mistakes, true, pred, true:CLASS or "
                                           "pred:CLASS")
            if name not in class_names:
                shown = ", ".join(list(class_names)[:20]) + (" ..." if len(class_names) > 20 else "")
                raise ClusteringInputError(f"scope {item!r}: {name!r} is not a class of the cache ({shown})")
            names = [item]
        out.extend(n for n in names if n not in out)
    return out


def scope_mask(table: pd.DataFrame, scope: str, class_names: Sequence[str]) -> np.ndarray:
    """bool [len(table)]: the rows of a scope."""
    if scope == "all":
        return np.ones(len(table), bool)
    if scope == "mistakes":
        return ~table["correct"].to_numpy(bool)
    kind, _, name = scope.partition(":")
    if kind not in ("true", "pred") or name not in class_names:
        raise ClusteringInputError(f"unknown scope {scope!r}")
    column = "label" if kind == "true" else "pred"
    return table[column].to_numpy(np.int64) == list(class_names).index(name)


def scope_folder(scope: str) -> str:
    """A file-system-safe, unique folder name for a scope (class names may hold any character)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", scope.replace(":", "-"))[:40]
    return f"{SCOPE_PREFIX}{slug}-{hashlib.sha1(scope.encode()).hexdigest()[:8]}"
