"""Offline clustering of every image of a cache, per scope (the SpRAy analysis at dataset scale).

SpRAy (Lapuschkin et al., "Unmasking Clever Hans predictors", Nature Communications 2019) clusters the
explanations of every image of a class offline and ranks the clusters; CoRelAy/ViRelAy keep several clusterings
side by side for a viewer that only reads. This module does that for every scope of a cache -- all images, the
mistakes, each true class (`true:<class>`) and each predicted class (`pred:<class>`: what did the model look at
when it said "bag"?) -- over every image, no sampling:

Steps 1-4 are the clustering engine's (analysis.explore.clustering.cluster_points), which also re-clusters a
selection on the Clusters page:

1. kNN graph of the descriptors (Euclidean): exact blocked search for small scopes, pynndescent's approximate
   search (Dong et al. 2011) above `EXACT_KNN_MAX` points. Its symmetrised 0/1 adjacency is shared by the steps
   below.
2. Spectrum of the graph's normalised Laplacian, solved per connected component (`graph_spectrum`): the
   eigengap suggests k; the eigenvectors are the spectral embedding.
3. Clusters for every requested algorithm and k together: `spectral` = cluster_qr (Damle et al. 2019, as
   scikit-learn's spectral clustering with assign_labels="cluster_qr") on the shared eigenvectors, `kmeans` on
   the descriptors.
4. A 2-D layout of every point: openTSNE's FFT-accelerated t-SNE (Linderman et al. 2019; Policar et al. 2024)
   with uniform affinities on the same kNN graph (Boehm, Berens, Kobak, JMLR 2022: a uniform kernel on the
   k = 15 nearest neighbours gives nearly the embedding of perplexity 30), PCA initialisation (Kobak &
   Linderman 2021). Above `embed_max` points (ours): t-SNE of a seeded uniform subsample, every other point
   placed at the mean position of its embedded nearest neighbours, then a few iterations of t-SNE on all
   points from there.
5. Per-cluster summaries and prototypes (`summarize_clusters`) and the suspicion calibrated
   against random partitions of the scope into groups of the same sizes (analysis.explore.clustering's
   `calibrate_suspicion`, ours). A clustering on the concepts descriptor (channel relevance at unit mass, ours)
   is summarised with the positive maps, and each cluster names its strongest channels (`concept_mix`).
6. Optionally (`verify_clusters`), the causal shortcut test (analysis.trust.region_removal) on the top clusters,
   with the verdict rule documented at `verdict` (`verdicts.py`).

Each scope is written atomically under CACHE/analysis/clustering/<run>/<scope>/ (Parquet tables, NumPy arrays,
JSON metadata holding the cache's content fingerprint), so a killed run keeps its finished scopes and a result
computed on an older state of the cache is detected and ignored. `compute_class_aggregates` streams the cache once
for the per-class mean maps. The reading side takes a Cache: `fresh_scopes`, `read_clustering` (a
`StoredClustering`), `default_clustering` (what the Clusters page opens with and the report shows) and
`read_class_aggregates` (the per-class maps).
"""
from analysis.explore.cluster_offline.settings import (CLASS_MAPS_FILE, CLUSTERING_DIR, DEFAULT_SCOPES, DENSITY_BINS,
                                                       FORMAT_VERSION, RESULTS_DIR, RUNTIME_OPTIONS, SCOPE_GROUPS,
                                                       SCOPE_PREFIX, TMP_PREFIX, TOP_TO_VERIFY, cache_fingerprint,
                                                       class_names_of, expand_scopes, scope_folder, scope_mask)
from analysis.explore.cluster_offline.scope import SUMMARY_ROW_COLUMNS, ScopeResult, cluster_scope, summarize_points
from analysis.explore.cluster_offline.store import (ClusteringNotFound, StoredClustering, StoredScope, choices_of,
                                                    default_clustering, fresh_scopes, read_clustering, results_root,
                                                    run_dir, stored_all_layout, stored_scopes, write_scope_result)
from analysis.explore.cluster_offline.aggregates import (ClassAggregates, compute_class_aggregates,
                                                         read_class_aggregates, write_class_aggregates)
from analysis.explore.cluster_offline.verdicts import (VERDICTS, Evidence, VerifyOptions, benjamini_hochberg,
                                                       mcnemar_greater, verdict)
from analysis.explore.cluster_offline.verify import (region_for, region_off_object, stored_verification_options,
                                                     verify_clusters)
from analysis.explore.cluster_offline.run import RunProgress, ScopeOutcome, cluster_cache, load_cache, read_descriptors


__all__ = ["CLASS_MAPS_FILE", "CLUSTERING_DIR", "ClassAggregates", "ClusteringNotFound", "DEFAULT_SCOPES",
           "DENSITY_BINS", "FORMAT_VERSION", "RESULTS_DIR", "RUNTIME_OPTIONS", "RunProgress", "SCOPE_GROUPS",
           "SCOPE_PREFIX", "SUMMARY_ROW_COLUMNS", "ScopeOutcome", "ScopeResult", "StoredClustering", "StoredScope",
           "TMP_PREFIX", "TOP_TO_VERIFY", "VERDICTS", "VerifyOptions", "cache_fingerprint", "choices_of",
           "class_names_of", "cluster_cache", "cluster_scope", "compute_class_aggregates", "default_clustering",
           "expand_scopes", "fresh_scopes", "load_cache", "mcnemar_greater", "read_class_aggregates",
           "read_clustering", "read_descriptors", "region_off_object", "results_root", "run_dir", "scope_folder",
           "scope_mask", "stored_all_layout", "stored_scopes", "stored_verification_options", "summarize_points",
           "verdict", "verify_clusters", "write_class_aggregates", "write_scope_result"]
