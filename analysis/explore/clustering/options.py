"""The choices a clustering offers (algorithms, embeddings, metrics, descriptor kinds) and their labels: the one
table the Clusters page's menus and the report name them by."""
from __future__ import annotations


ALGORITHMS = ("kmeans", "spectral")        # both read the one kNN graph / its spectrum (see engine.cluster_points)
ALGORITHM_LABELS = {"kmeans": "k-means", "spectral": "spectral"}
EMBEDDINGS = ("tsne", "spectral")
METRICS = ("cosine", "euclidean")
SPATIAL_DESCRIPTOR_KINDS = ("positive", "absolute")     # unit-mass pooled maps: where the evidence lies
DESCRIPTOR_KINDS = (*SPATIAL_DESCRIPTOR_KINDS, "concepts")   # concepts: which channels hold it (unit-mass shares)
DESCRIPTOR_LABELS = {"positive": "where: positive relevance", "absolute": "where: |relevance|",
                     "concepts": "which channels: concept shares"}


def summary_descriptor_kind(descriptor: str) -> str:
    """The spatial descriptor that summarises a clustering (prototypes, suspicion, class consensus): the clustered
    one, or the positive maps for a clustering on concepts (channel shares say which channels, not where)."""
    return descriptor if descriptor in SPATIAL_DESCRIPTOR_KINDS else "positive"
