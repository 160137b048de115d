"""A clustering's settings and result, computed from descriptors and saved next to the cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.explore.clustering.options import ALGORITHMS, DESCRIPTOR_KINDS, EMBEDDINGS, SCOPES
from analysis.explore.clustering.graph import all_identical, cluster_labels, distinct_rows, eigengap, embed_2d


@dataclass(frozen=True)
class ClusteringSettings:
    scope: str = "all"
    class_index: int | None = None
    descriptor: str = "positive"
    algorithm: str = "kmeans"
    n_clusters: int = 0          # 0: use the eigengap suggestion
    n_neighbors: int = 10
    embedding: str = "tsne"
    max_points: int = 3000
    seed: int = 0

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")
        if self.descriptor not in DESCRIPTOR_KINDS:
            raise ValueError(f"descriptor must be one of {DESCRIPTOR_KINDS}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}")
        if self.n_clusters < 0 or self.n_neighbors < 1 or self.max_points < 2:
            raise ValueError("n_clusters >= 0, n_neighbors >= 1 and max_points >= 2 are required")

    def digest(self, cache_state: str) -> str:
        """Short hash naming the saved result: settings plus the state of the cache they were computed on."""
        payload = json.dumps({"settings": asdict(self), "cache": cache_state}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ClusteringResult:
    ids: np.ndarray              # int64 [n] clustered image ids (a sample of the scope when it was larger)
    labels: np.ndarray           # int64 [n]
    embedding: np.ndarray        # float32 [n, 2]
    eigenvalues: np.ndarray      # float64 [m]
    suggested_k: int
    n_clusters: int              # the k used (for HDBSCAN: the number it found)
    scope_size: int              # images in the scope before sampling
    settings: ClusteringSettings = field(default_factory=ClusteringSettings)
    note: str = ""               # what the page should say about the input (identical maps, rows left out)
    identical: bool = False      # every map alike: one cluster, no embedding (all points at the origin)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"id": self.ids, "cluster": self.labels,
                             "x": self.embedding[:, 0], "y": self.embedding[:, 1]})


def run_clustering(ids: np.ndarray, descriptors: np.ndarray, settings: ClusteringSettings,
                   scope_size: int | None = None) -> ClusteringResult:
    """Eigengap, clustering and embedding of already-sampled descriptors (rows aligned with ids)."""
    settings.validate()
    ids = np.asarray(ids, dtype=np.int64)
    x = np.asarray(descriptors, dtype=np.float32)
    scope_size = int(scope_size if scope_size is not None else len(ids))
    notes = []
    finite = np.isfinite(x).all(axis=1) if x.ndim == 2 else np.zeros(len(ids), bool)
    if not finite.all():  # a damaged row: its descriptor says nothing, the others still cluster
        notes.append(f"{int((~finite).sum()):,} image(s) left out: their maps hold NaN or inf.")
        ids, x = ids[finite], x[finite]
    if len(ids) >= 2 and all_identical(x):
        notes.append(f"All {len(ids):,} maps of this scope give the same descriptor (no positive relevance "
                     "anywhere, e.g. a weak model or --denoise on a CAM layer with fewer than 10 channels): one "
                     "cluster, nothing to embed.")
        return ClusteringResult(ids=ids, labels=np.zeros(len(ids), np.int64), embedding=np.zeros((len(ids), 2),
                                np.float32), eigenvalues=np.zeros(0), suggested_k=1, n_clusters=1,
                                scope_size=scope_size, settings=settings, note=" ".join(notes), identical=True)
    gap = eigengap(x, settings.n_neighbors)
    k = settings.n_clusters or gap.suggested_k
    distinct = distinct_rows(x)
    if 0 < distinct < k:
        notes.append(f"Only {distinct} different maps: {distinct} clusters instead of {k}.")
        k = distinct
    labels = cluster_labels(x, settings.algorithm, k, settings.n_neighbors, settings.seed)
    found = int(len(set(labels[labels >= 0].tolist())))
    coords = embed_2d(x, settings.embedding, settings.n_neighbors, settings.seed)
    return ClusteringResult(ids=ids, labels=labels, embedding=coords, eigenvalues=gap.eigenvalues,
                            suggested_k=gap.suggested_k, n_clusters=found if settings.algorithm == "hdbscan" else k,
                            scope_size=scope_size, settings=settings, note=" ".join(notes))


def save_result(path: Path, result: ClusteringResult) -> None:
    """Write a result as parquet (id, cluster, x, y) with the rest in the schema metadata; atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "eigenvalues": [float(v) for v in result.eigenvalues],
        "suggested_k": int(result.suggested_k),
        "n_clusters": int(result.n_clusters),
        "scope_size": int(result.scope_size),
        "settings": asdict(result.settings),
        "note": result.note,
        "identical": bool(result.identical),
    }
    table = pa.Table.from_pandas(result.frame(), preserve_index=False)
    table = table.replace_schema_metadata({b"fgcam_clustering": json.dumps(meta).encode()})
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp)
    tmp.replace(path)


def load_result(path: Path) -> ClusteringResult | None:
    """Read a saved result; None when absent or unreadable (then it is simply recomputed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"fgcam_clustering"])
        frame = table.to_pandas()
        return ClusteringResult(
            ids=frame["id"].to_numpy(np.int64), labels=frame["cluster"].to_numpy(np.int64),
            embedding=frame[["x", "y"]].to_numpy(np.float32),
            eigenvalues=np.asarray(meta["eigenvalues"], np.float64), suggested_k=int(meta["suggested_k"]),
            n_clusters=int(meta["n_clusters"]), scope_size=int(meta["scope_size"]),
            settings=ClusteringSettings(**meta["settings"]), note=str(meta.get("note", "")),
            identical=bool(meta.get("identical", False)))
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
