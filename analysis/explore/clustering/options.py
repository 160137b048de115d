"""The choices a clustering offers (algorithms, embeddings, scopes, descriptor kinds) and their labels."""
from __future__ import annotations


ALGORITHMS = ("kmeans", "spectral", "agglomerative", "hdbscan")
ALGORITHM_LABELS = {
    "kmeans": "k-means",
    "spectral": "spectral (kNN graph)",
    "agglomerative": "agglomerative (Ward)",
    "hdbscan": "HDBSCAN (finds k itself)",
}
EMBEDDINGS = ("tsne", "spectral")
EMBEDDING_LABELS = {"tsne": "t-SNE", "spectral": "spectral axes (kNN graph)"}
SCOPES = ("class", "all", "mistakes")
SCOPE_LABELS = {"class": "one class", "all": "all classes", "mistakes": "only mistakes"}
SPATIAL_DESCRIPTOR_KINDS = ("positive", "absolute")     # unit-mass pooled maps: where the evidence lies
DESCRIPTOR_KINDS = (*SPATIAL_DESCRIPTOR_KINDS, "concepts")   # concepts: which channels hold it (unit-mass shares)
DESCRIPTOR_LABELS = {"positive": "where: positive relevance", "absolute": "where: |relevance|",
                     "concepts": "which channels: concept shares"}


def summary_descriptor_kind(descriptor: str) -> str:
    """The spatial descriptor that summarises a clustering (prototypes, suspicion, class consensus): the clustered
    one, or the positive maps for a clustering on concepts (channel shares say which channels, not where)."""
    return descriptor if descriptor in SPATIAL_DESCRIPTOR_KINDS else "positive"
