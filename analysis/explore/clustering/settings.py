"""What a clustering is asked for (one settings class for the offline run over every scope and for a selection
re-clustered on the Clusters page; its key names an offline run's folder) and the engine's size thresholds."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

from analysis.explore.clustering.options import ALGORITHMS, DESCRIPTOR_KINDS, EMBEDDINGS, METRICS

EXACT_KNN_MAX = 20_000       # up to this many points the kNN graph is exact (faster than pynndescent there)
BH_MAX = 4_000               # t-SNE below this many points: Barnes-Hut gradient (measured faster than FFT here)
THREADED_MIN = 20_000        # t-SNE below this many points runs on one thread
OPENTSNE_MIN = 1_000         # t-SNE below this many points, not started from a layout: scikit-learn's
REFINE_ITERATIONS = 150      # t-SNE of a scope started from the all-images layout
REFINE_MIN = 50              # ... from this many points (fewer hardly move from the start: see tsne_layout)
MAX_K = 100                  # spectral clustering keeps n x k eigenvector entries in memory
Progress = Callable[[str], None]


class ClusteringInputError(ValueError):
    """A request that cannot be served (unknown scope or class, bad setting); the message is one line."""


@dataclass(frozen=True)
class ClusteringSettings:
    """Everything that changes the numbers of a clustering (its key names an offline run's folder)."""

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
        """ClusteringInputError (one line) for a setting the engine cannot run."""
        def fail(message: str) -> None:
            raise ClusteringInputError(message)

        if self.descriptor not in DESCRIPTOR_KINDS:
            fail(f"descriptor must be one of {', '.join(DESCRIPTOR_KINDS)}, not {self.descriptor!r}")
        if self.metric not in METRICS:
            fail(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if not self.algorithms or any(a not in ALGORITHMS for a in self.algorithms):
            fail(f"algorithms must be among {', '.join(ALGORITHMS)} (both read the one kNN graph; agglomerative "
                 f"and HDBSCAN would need all pairwise distances), got {self.algorithms}")
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
    def from_dict(cls, data: dict[str, Any]) -> "ClusteringSettings":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["algorithms"] = tuple(values.get("algorithms", ALGORITHMS))
        values["ks"] = tuple(int(k) for k in values.get("ks", (0,)))
        return cls(**values)

    def key(self) -> str:
        """Folder name of an offline run: readable settings plus a hash of all of them."""
        digest = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.descriptor}-{self.metric}-nn{self.n_neighbors}-{self.embedding}-seed{self.seed}-{digest}"
