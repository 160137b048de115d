"""Clustering of explanations (the SpRAy idea): kNN graph, eigengap, four algorithms, 2-D embeddings,
per-cluster summaries and a suspicion ranking that puts shortcut-like clusters first.

Pure numpy / scikit-learn; never imports streamlit. Inputs are descriptors (unit-mass downsampled maps, or
unit-mass channel relevance -- the "concepts" descriptor --, one row per image) and the matching rows of the
cache table; the summaries always read a spatial descriptor (`summary_descriptor_kind`).
"""
from analysis.explore.clustering.options import (ALGORITHMS, ALGORITHM_LABELS, DESCRIPTOR_KINDS, DESCRIPTOR_LABELS,
                                                 EMBEDDINGS, EMBEDDING_LABELS, SCOPES, SCOPE_LABELS,
                                                 SPATIAL_DESCRIPTOR_KINDS, summary_descriptor_kind)
from analysis.explore.clustering.graph import (Eigengap, _smallest_laplacian_eigenvalues, all_identical,
                                               checked_descriptors, cluster_labels, connect_components, distinct_rows,
                                               effective_neighbours, eigengap, embed_2d, graph_spectrum, knn_affinity,
                                               laplacian_eigenpairs, relabel_by_size, scope_ids, suggest_k)
from analysis.explore.clustering.suspicion import (SUMMARY_SCORES, SUSPICION_COMPONENTS, SuspicionCalibration,
                                                   SuspicionInputs, calibrate_suspicion, concept_mix,
                                                   summarize_clusters, suspicion_score)
from analysis.explore.clustering.runs import (ClusteringResult, ClusteringSettings, load_result, run_clustering,
                                              save_result)


__all__ = ["ALGORITHMS", "ALGORITHM_LABELS", "ClusteringResult", "ClusteringSettings", "DESCRIPTOR_KINDS",
           "DESCRIPTOR_LABELS", "EMBEDDINGS", "EMBEDDING_LABELS", "Eigengap", "SCOPES", "SCOPE_LABELS",
           "SPATIAL_DESCRIPTOR_KINDS", "SUMMARY_SCORES", "SUSPICION_COMPONENTS", "SuspicionCalibration",
           "SuspicionInputs", "_smallest_laplacian_eigenvalues", "all_identical", "calibrate_suspicion",
           "checked_descriptors", "cluster_labels", "concept_mix", "connect_components", "distinct_rows",
           "effective_neighbours", "eigengap", "embed_2d", "graph_spectrum", "knn_affinity", "laplacian_eigenpairs",
           "load_result", "relabel_by_size", "run_clustering", "save_result", "scope_ids", "suggest_k",
           "summarize_clusters", "summary_descriptor_kind", "suspicion_score"]
