"""Per-cluster summaries and prototypes, and the suspicion score with its calibration against random
partitions of the scope (ours; see `suspicion_score` and `calibrate_suspicion`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse


# Components of the suspicion score: each is a mean over the cluster's images in [0, 1] where high is bad.
SUSPICION_COMPONENTS = {
    "off_object": "mean share of the strongest positive relevance outside the object (background_hotspot)",
    "on_border": "mean share of positive relevance in the border strip (border_share)",
    "error_rate": "1 - accuracy",
    "unlike_class": "1 - cosine similarity of the prototype to the consensus map of its members' classes",
}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (na > 0 and nb > 0) or not np.isfinite(na * nb):
        return float("nan")
    return float(np.dot(a, b) / (na * nb))


def suspicion_score(off_object: float, on_border: float, error_rate: float, unlike_class: float) -> float:
    """Mean of the available components (NaN ones, e.g. off_object without a foreground, are left out)."""
    values = np.array([off_object, on_border, error_rate, unlike_class], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


SUMMARY_SCORES = ("background_share", "background_hotspot", "border_share")
# The suspicion's off-the-object part. background_hotspot, not the mass-based background_share: a shortcut is a
# small region that holds the strongest relevance, and its share of the mass stays small (on the demo the
# cluster of tagged images ranked 3rd of `all` with background_share; bench/bench_suspicion.py measures both).
OFF_OBJECT_SCORE = "background_hotspot"


def _indicator(index: np.ndarray, columns: np.ndarray, n_clusters: int, width: int) -> sparse.csr_matrix:
    """[n_clusters, width] sparse counts: a one at (index[i], columns[i]) for every i."""
    return sparse.csr_matrix((np.ones(len(index), np.float32), (index, columns)), shape=(n_clusters, width))


def _cluster_sums(index: np.ndarray, n_clusters: int, values: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """float64 [n_clusters, P]: the sum of the rows of `values` [n, P] in each cluster (`index` [n]: each row's
    cluster position), `chunk` rows at a time in float32, the chunks' sums added in float64."""
    sums = np.zeros((n_clusters, values.shape[1]), np.float64)
    for start in range(0, len(values), chunk):
        stop = min(start + chunk, len(values))
        sums += _indicator(index[start:stop], np.arange(stop - start), n_clusters, stop - start) @ values[start:stop]
    return sums


class SuspicionInputs:
    """The per-image inputs of the suspicion score, prepared once, so that many partitions of the same images can
    be scored quickly (`statistics`): the summary scores them once, the null calibration a hundred times.

    rows: table rows (columns label, pred, correct and SUMMARY_SCORES), aligned with `descriptors` [n, P].
    consensus: [C, P] consensus map of each class (NaN rows for classes never predicted).
    """

    CHUNK = 65536   # rows summed at a time in float32; the chunks' sums are added in float64

    def __init__(self, rows: pd.DataFrame, descriptors: np.ndarray, consensus: np.ndarray):
        self.n = len(rows)
        self.descriptors = np.asarray(descriptors, dtype=np.float32)
        if self.descriptors.shape[0] != self.n:
            raise ValueError(f"{self.descriptors.shape[0]} descriptors for {self.n} rows")
        self.correct = rows["correct"].to_numpy(bool)
        self.labels = rows["label"].to_numpy(np.int64)
        self.preds = rows["pred"].to_numpy(np.int64)
        self.scores = {name: rows[name].to_numpy(np.float64) for name in SUMMARY_SCORES}
        consensus = np.asarray(consensus, dtype=np.float64)
        known = np.isfinite(consensus).all(axis=1)
        self.consensus = np.where(known[:, None], consensus, 0.0)
        self.consensus_known = known.astype(np.float64)

    def statistics(self, index: np.ndarray, n_clusters: int) -> dict[str, np.ndarray]:
        """Per-cluster numbers for a partition: index [n] = cluster position 0..n_clusters-1 of each image.

        Means skip NaN scores (NaN when a cluster has none); unlike_class = 1 - cosine similarity of the
        prototype (mean descriptor) to the mean consensus map of the members' predicted classes.
        """
        index = np.asarray(index, dtype=np.int64)
        size = np.bincount(index, minlength=n_clusters).astype(np.float64)

        def mean_of(values: np.ndarray) -> np.ndarray:
            finite = np.isfinite(values)
            total = np.bincount(index, weights=np.where(finite, values, 0.0), minlength=n_clusters)
            count = np.bincount(index, weights=finite.astype(np.float64), minlength=n_clusters)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(count > 0, total / np.maximum(count, 1), np.nan)

        sums = _cluster_sums(index, n_clusters, self.descriptors, self.CHUNK)
        with np.errstate(invalid="ignore", divide="ignore"):
            prototypes = sums / size[:, None]
            counts = _indicator(index, self.preds, n_clusters, self.consensus.shape[0]).toarray().astype(np.float64)
            known = counts @ self.consensus_known
            reference = (counts @ self.consensus) / known[:, None]
            norms = np.linalg.norm(prototypes, axis=1) * np.linalg.norm(reference, axis=1)
            similarity = (prototypes * reference).sum(axis=1) / norms
        similarity[~(np.isfinite(norms) & (norms > 0))] = np.nan
        accuracy = mean_of(self.correct.astype(np.float64))
        out = {"size": size, "accuracy": accuracy, "unlike_class": 1.0 - similarity, "prototypes": prototypes}
        out.update({name: mean_of(values) for name, values in self.scores.items()})
        parts = np.stack([out[OFF_OBJECT_SCORE], out["border_share"], 1.0 - accuracy, out["unlike_class"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # a cluster with no component: NaN suspicion
            out["suspicion"] = np.nanmean(parts, axis=0)
        return out


def _cluster_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clusters in summary order -- 0, 1, ... then noise -1 --, each image's position in that list)."""
    clusters = np.array(sorted(set(np.asarray(labels).tolist()), key=lambda c: (c < 0, c)), dtype=np.int64)
    lookup = {int(c): i for i, c in enumerate(clusters)}
    return clusters, np.array([lookup[int(c)] for c in labels], dtype=np.int64) if len(labels) else \
        np.zeros(0, np.int64)


def _class_mixes(index: np.ndarray, labels: np.ndarray, n_clusters: int, names: np.ndarray
                 ) -> tuple[list[int], list[str]]:
    """Per cluster (`index`: each image's cluster position), its majority label and its class mix ("coat 80%,
    shirt 15%, bag 5%"): label counts, ties in order of first appearance (as pandas' value_counts)."""
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    label_counts = np.zeros((n_clusters, n_labels), np.int64)
    np.add.at(label_counts, (index, labels), 1)
    first_seen = np.full((n_clusters, n_labels), len(labels), np.int64)
    np.minimum.at(first_seen, (index, labels), np.arange(len(labels)))
    majorities, mixes = [], []
    for position in range(n_clusters):
        present = np.nonzero(label_counts[position])[0]
        present = present[np.lexsort((first_seen[position, present], -label_counts[position, present]))]
        size = int(label_counts[position].sum())
        mix = ", ".join(f"{names[int(c)]} {label_counts[position, c] / size:.0%}" for c in present[:3])
        majorities.append(int(present[0]))
        mixes.append(mix + (f", +{len(present) - 3} more" if len(present) > 3 else ""))
    return majorities, mixes


def concept_mix(index: np.ndarray, n_clusters: int, concept_shares: np.ndarray, top: int = 3) -> list[str]:
    """Per cluster position (`index` [n]: each image's), its strongest concepts: the channels with the largest
    mean share of the members' positive evidence (`concept_shares` [n, K], unit-mass rows), e.g.
    "#13 45%, #30 12%, #56 8%"."""
    sizes = np.bincount(index, minlength=n_clusters).astype(np.float64)
    means = _cluster_sums(index, n_clusters, np.asarray(concept_shares, np.float32)) / np.maximum(sizes, 1)[:, None]
    out = []
    for mean in means:
        best = [k for k in np.argsort(-mean, kind="stable")[:top] if mean[k] > 0]
        out.append(", ".join(f"#{int(k)} {mean[k]:.0%}" for k in best))
    return out


def summarize_clusters(labels: np.ndarray, rows: pd.DataFrame, descriptors: np.ndarray,
                       consensus: np.ndarray, class_names: list[str],
                       concept_shares: np.ndarray | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per cluster, most suspicious first, and the prototypes (mean descriptors) [n_clusters, P].

    rows: the table rows of the clustered images (same order as `labels` and `descriptors`).
    consensus: [C, P] consensus map of each class (analysis.explore.statistics.class_consensus); a cluster's prototype is
    compared with the mean consensus of its members' predicted classes, so a cluster that looks elsewhere than
    its class usually does scores high.
    concept_shares: [n, K] the concepts descriptor of the same images (a clustering on concepts): adds the
    column concept_mix (`concept_mix`).
    Label -1 (noise: images a clustering left unassigned) is summarised too, as cluster -1, but always ranked
    last.
    """
    labels = np.asarray(labels, dtype=np.int64)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    rows = rows.reset_index(drop=True)
    names = np.asarray(class_names, dtype=object)
    clusters, index = _cluster_positions(labels)
    inputs = SuspicionInputs(rows, descriptors, consensus)
    stats = inputs.statistics(index, len(clusters))
    majorities, mixes = _class_mixes(index, inputs.labels, len(clusters), names)
    records = []
    for position, cluster in enumerate(clusters):
        majority = majorities[position]
        records.append({
            "cluster": int(cluster),
            "size": int(stats["size"][position]),
            "accuracy": float(stats["accuracy"][position]),
            "majority_class": majority,
            "majority_name": str(names[majority]),
            "class_mix": mixes[position],
            "background_share": float(stats["background_share"][position]),
            "background_hotspot": float(stats["background_hotspot"][position]),
            "border_share": float(stats["border_share"][position]),
            "unlike_class": float(stats["unlike_class"][position]),
            "suspicion": float(stats["suspicion"][position]),
        })
    summary = pd.DataFrame.from_records(records, columns=[
        "cluster", "size", "accuracy", "majority_class", "majority_name", "class_mix", "background_share",
        "background_hotspot", "border_share", "unlike_class", "suspicion"])
    if concept_shares is not None:
        summary["concept_mix"] = concept_mix(index, len(clusters), concept_shares)   # rows in cluster position order
    protos = stats["prototypes"] if len(clusters) else np.zeros((0, descriptors.shape[1]), np.float64)
    if len(summary):
        order = np.lexsort((summary["cluster"].to_numpy(), -summary["suspicion"].fillna(-1).to_numpy(),
                            (summary["cluster"] < 0).to_numpy()))
        summary = summary.iloc[order].reset_index(drop=True)
        protos = protos[order]
    summary.insert(0, "rank", np.arange(1, len(summary) + 1))
    return summary, protos.astype(np.float32)


@dataclass
class SuspicionCalibration:
    """How unusual each cluster's suspicion is against random partitions of the same images into clusters of
    the same sizes (see `calibrate_suspicion`). Frames and numbers are aligned with `clusters`."""

    clusters: np.ndarray        # cluster labels
    suspicion: np.ndarray       # observed suspicion
    null_mean: np.ndarray       # mean suspicion of a random group of the same size
    null_sd: np.ndarray
    z: np.ndarray               # (suspicion - null_mean) / null_sd
    p: np.ndarray               # share of random partitions whose most suspicious group scores at least this much
    null_max: np.ndarray        # [partitions] the highest suspicion of each random partition
    partitions: int

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"cluster": self.clusters, "suspicion_null": self.null_mean,
                             "suspicion_null_sd": self.null_sd, "suspicion_z": self.z, "suspicion_p": self.p})

    def top(self) -> dict[str, float]:
        """The most suspicious (non-noise) cluster against the most suspicious group of random partitions:
        its suspicion, the null's mean and sd, the z-score and the empirical p-value."""
        real = np.nonzero((self.clusters >= 0) & np.isfinite(self.suspicion))[0]
        if not len(real):
            return {"suspicion": float("nan"), "null_max_mean": float("nan"), "null_max_sd": float("nan"),
                    "z": float("nan"), "p": float("nan"), "partitions": int(self.partitions)}
        best = real[np.argmax(self.suspicion[real])]
        finite = self.null_max[np.isfinite(self.null_max)]
        mean = float(finite.mean()) if len(finite) else float("nan")
        sd = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
        z = (float(self.suspicion[best]) - mean) / sd if sd > 0 else float("nan")
        return {"suspicion": float(self.suspicion[best]), "null_max_mean": mean, "null_max_sd": sd, "z": z,
                "p": float(self.p[best]), "partitions": int(self.partitions)}


def calibrate_suspicion(labels: np.ndarray, rows: pd.DataFrame, descriptors: np.ndarray, consensus: np.ndarray,
                        partitions: int = 100, seed: int = 0) -> SuspicionCalibration:
    """Calibrate the suspicion of a clustering against chance (ours; motivated by Adebayo et al. 2022,
    arXiv 2212.04629: explanations single out groups for clean models too).

    The null: the same images split at random into groups of the same sizes (a permutation of the labels),
    `partitions` times. A cluster's z-score compares its suspicion with random groups of its own size; its
    p-value is family-wise -- the share (with the +1 of an empirical p-value) of random partitions whose most
    suspicious group scores at least as high (the max-statistic, so that picking the top cluster is accounted
    for). Both depend on the scope only through its images, so they are comparable across scopes and caches
    where the raw suspicion is not (its components' baselines differ between datasets and models).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rows = rows.reset_index(drop=True)
    clusters, index = _cluster_positions(labels)
    inputs = SuspicionInputs(rows, descriptors, consensus)
    observed = inputs.statistics(index, len(clusters))["suspicion"]
    rng = np.random.default_rng(seed)
    null = np.empty((partitions, len(clusters)), np.float64)
    for b in range(partitions):
        null[b] = inputs.statistics(index[rng.permutation(len(index))], len(clusters))["suspicion"]
    real = clusters >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        null_max = np.nanmax(null[:, real], axis=1) if real.any() and partitions else np.full(partitions, np.nan)
        null_mean = np.nanmean(null, axis=0) if partitions else np.full(len(clusters), np.nan)
        null_sd = np.nanstd(null, axis=0, ddof=1) if partitions > 1 else np.full(len(clusters), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(null_sd > 1e-12, (observed - null_mean) / null_sd, np.nan)
    # A tolerance below float noise, so that a cluster equal to the null (one cluster: the whole scope) is "as
    # extreme as chance" and not beyond it.
    exceed = (null_max[None, :] >= observed[:, None] - 1e-9).sum(axis=1)
    p = np.where(real & np.isfinite(observed) & (partitions > 0), (1.0 + exceed) / (1.0 + partitions), np.nan)
    return SuspicionCalibration(clusters=clusters, suspicion=observed, null_mean=null_mean, null_sd=null_sd, z=z,
                                p=p, null_max=null_max, partitions=int(partitions))
