"""What an offline clustering run is asked for: its settings (whose key names the run's folder), the scopes
(all, mistakes, each true and each predicted class) and the names of the files it writes."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from analysis.cache.classes import class_names as class_names_of  # noqa: F401 (offline.class_names_of)
from analysis.cache.identity import RUNTIME_OPTIONS, cache_fingerprint  # noqa: F401 (re-exported)
from analysis.explore import clustering
from analysis.cache import ANALYSIS_DIR


RESULTS_DIR = ANALYSIS_DIR               # CACHE/analysis/
CLUSTERING_DIR = "clustering"            # CACHE/analysis/clustering/<run>/<scope>/
CLASS_MAPS_FILE = "class_maps.parquet"   # CACHE/analysis/class_maps.parquet
TMP_PREFIX = ".tmp-"
SCOPE_PREFIX = "scope-"
FORMAT_VERSION = 2                       # 2: the suspicion's off-the-object part is background_hotspot
ALGORITHMS = ("kmeans", "spectral")
EMBEDDINGS = ("tsne", "spectral")
METRICS = ("cosine", "euclidean")
DESCRIPTOR_KINDS = clustering.DESCRIPTOR_KINDS
SCOPE_GROUPS = ("all", "mistakes", "true", "pred")   # "true" / "pred": one scope per class
DEFAULT_SCOPES = SCOPE_GROUPS
EXACT_KNN_MAX = 20_000       # scopes up to this size get an exact kNN graph (faster than pynndescent there)
DENSITY_BINS = 256
TOP_TO_VERIFY = 3
BH_MAX = 4_000               # t-SNE below this many points: Barnes-Hut gradient (measured faster than FFT here)
THREADED_MIN = 20_000        # t-SNE below this many points runs on one thread
OPENTSNE_MIN = 1_000         # t-SNE below this many points: the dashboard's live one (scikit-learn)
REFINE_ITERATIONS = 150      # t-SNE of a scope started from the all-images layout
MAX_K = 100                  # spectral clustering keeps n x k eigenvector entries in memory
Progress = Callable[[str], None]


class ClusteringInputError(ValueError):
    """A request that cannot be served (unknown scope or class, bad setting); the message is one line."""


@dataclass(frozen=True)
class OfflineSettings:
    """Everything that changes the numbers of an offline clustering run (its key names the run's folder)."""

    descriptor: str = "positive"
    metric: str = "cosine"              # geometry of the kNN graph, k-means and t-SNE (summaries use the maps)
    algorithms: tuple[str, ...] = ALGORITHMS
    ks: tuple[int, ...] = (0,)          # 0: the eigengap's suggestion
    n_neighbors: int = 15
    embedding: str = "tsne"
    seed: int = 0
    max_k: int = 12                     # the eigengap looks at k in [2, max_k]
    embed_max: int = 250_000            # t-SNE on at most this many points of a scope (the rest are placed)
    null_partitions: int = 100          # random partitions of the suspicion's null

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ClusteringInputError(message)

        if self.descriptor not in DESCRIPTOR_KINDS:
            fail(f"descriptor must be one of {', '.join(DESCRIPTOR_KINDS)}, not {self.descriptor!r}")
        if self.metric not in METRICS:
            fail(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if not self.algorithms or any(a not in ALGORITHMS for a in self.algorithms):
            fail(f"algorithms must be among {', '.join(ALGORITHMS)} (agglomerative and HDBSCAN need all pairwise "
                 f"distances and stay in the dashboard's live clustering of a selection), got {self.algorithms}")
        if not self.ks or any(k < 0 or k == 1 for k in self.ks):
            fail(f"k must be 0 (the eigengap's suggestion) or at least 2, got {self.ks}")
        if self.embedding not in EMBEDDINGS:
            fail(f"embedding must be one of {', '.join(EMBEDDINGS)}, not {self.embedding!r}")
        if self.n_neighbors < 2:
            fail(f"neighbours must be at least 2, got {self.n_neighbors}")
        if self.max_k < 2:
            fail(f"max k must be at least 2, got {self.max_k}")
        if max(self.ks) > MAX_K:
            fail(f"k must be at most {MAX_K}, got {max(self.ks)}")
        if self.embed_max < 1000:
            fail(f"embed max must be at least 1000, got {self.embed_max}")
        if self.null_partitions < 0:
            fail(f"null partitions must be >= 0, got {self.null_partitions}")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["algorithms"], out["ks"] = list(self.algorithms), list(self.ks)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OfflineSettings":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["algorithms"] = tuple(values.get("algorithms", ALGORITHMS))
        values["ks"] = tuple(int(k) for k in values.get("ks", (0,)))
        return cls(**values)

    def key(self) -> str:
        """Folder name of the run: readable settings plus a hash of all of them."""
        digest = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.descriptor}-{self.metric}-nn{self.n_neighbors}-{self.embedding}-seed{self.seed}-{digest}"


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
