"""The clustering engine (the SpRAy idea): one kNN graph, its spectrum and eigengap, k-means and spectral
clustering, one t-SNE / spectral layout, per-cluster summaries and a suspicion ranking that puts shortcut-like
clusters first; one settings class and one label table.

Two drivers use it: the offline run over every image of every scope (analysis.explore.cluster_offline, stored
under CACHE/analysis/) and the Clusters page's live re-clustering of a selection
(analysis.explore.cluster_data.recluster_selection). Pure numpy / scipy / scikit-learn / openTSNE; never imports
streamlit. Inputs are descriptors (unit-mass downsampled maps, or unit-mass channel relevance -- the "concepts"
descriptor --, one row per image) and the matching rows of the cache table; the summaries always read a spatial
descriptor (`summary_descriptor_kind`).
"""
from analysis.explore.clustering.options import (ALGORITHMS, ALGORITHM_LABELS, DESCRIPTOR_KINDS, DESCRIPTOR_LABELS,
                                                 EMBEDDINGS, METRICS, SPATIAL_DESCRIPTOR_KINDS,
                                                 summary_descriptor_kind)
from analysis.explore.clustering.settings import (BH_MAX, EXACT_KNN_MAX, MAX_K, OPENTSNE_MIN, REFINE_ITERATIONS,
                                                  REFINE_MIN, THREADED_MIN, ClusteringInputError, ClusteringSettings,
                                                  Progress)
from analysis.explore.clustering.graph import (KnnGraph, all_identical, check_descriptors, checked_descriptors,
                                               distinct_rows, effective_neighbours, geometry, knn_graph, without_self)
from analysis.explore.clustering.spectrum import graph_spectrum, laplacian_eigenpairs, suggest_k
from analysis.explore.clustering.labels import (cluster_qr, clustering_name, kmeans_labels, relabel_by_size,
                                                spectral_labels)
from analysis.explore.clustering.layout import (EmbeddingInfo, line_layout, place_from_neighbours, spectral_layout,
                                                tsne_layout)
from analysis.explore.clustering.engine import PointsClustering, chosen_ks, cluster_points
from analysis.explore.clustering.suspicion import (SUMMARY_SCORES, SUSPICION_COMPONENTS, SuspicionCalibration,
                                                   SuspicionInputs, calibrate_suspicion, concept_mix,
                                                   summarize_clusters, suspicion_score)


__all__ = ["ALGORITHMS", "ALGORITHM_LABELS", "BH_MAX", "ClusteringInputError", "ClusteringSettings",
           "DESCRIPTOR_KINDS", "DESCRIPTOR_LABELS", "EMBEDDINGS", "EXACT_KNN_MAX", "EmbeddingInfo", "KnnGraph",
           "MAX_K", "METRICS", "OPENTSNE_MIN", "PointsClustering", "Progress", "REFINE_ITERATIONS", "REFINE_MIN",
           "SPATIAL_DESCRIPTOR_KINDS", "SUMMARY_SCORES", "SUSPICION_COMPONENTS", "SuspicionCalibration",
           "SuspicionInputs", "THREADED_MIN", "all_identical", "calibrate_suspicion", "check_descriptors",
           "checked_descriptors", "chosen_ks", "cluster_points", "cluster_qr", "clustering_name", "concept_mix",
           "distinct_rows", "effective_neighbours", "geometry", "graph_spectrum", "kmeans_labels", "knn_graph",
           "laplacian_eigenpairs", "line_layout", "place_from_neighbours", "relabel_by_size", "spectral_labels",
           "spectral_layout", "suggest_k", "summarize_clusters", "summary_descriptor_kind", "suspicion_score",
           "tsne_layout", "without_self"]
