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
DESCRIPTOR_KINDS = ("positive", "absolute")
