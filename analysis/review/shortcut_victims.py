"""Shortcut victims: wrong predictions that a verified shortcut finding explains, set apart from the likely
label errors (issue 24).

A finding is *verified* when the offline clustering's causal test (`python -m analysis cluster --verify-top N`,
`analysis.explore.cluster_offline.verify`, its rule in `analysis.explore.cluster_offline.verdicts`) called its
cluster "shortcut": the top q% region of the cluster's prototype lies off the object and blurring it changes far
more predictions than a random region of the same size. An image is that finding's *victim* when

1. it is a member of the cluster,
2. its prediction is wrong (label != prediction: what the label-error ranking would otherwise list), and
3. its own evidence lies in the verified region: at least `MIN_REGION_SHARE` of its positive relevance (the
   unit-mass positive descriptor) falls on the region's cells (the prototype's top q% cells, q as tested).

Why 3 as well as 1: a cluster is a group of maps that look alike on average, and a large cluster takes in
images whose evidence is elsewhere (a mislabelled trouser whose map merely resembles the cluster's). The
causal test speaks for the region, so only an image whose prediction rests on that region is explained by it;
an image with little relevance there keeps its place in the label-error ranking. The region's area is q% of
the map (5% by default), so a share of `MIN_REGION_SHARE` is several times what an image with evidence spread
evenly would put there.

A cluster whose evidence is spread is verified by the background swap instead (the dataset's typical
background changes its predictions far more than other members' backgrounds): the test speaks for what lies
around each member's object, not for a region, so every wrong member is its victim (3 does not apply).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.cache import Cache
from analysis.cache.identity import cache_fingerprint
from analysis.explore.cluster_offline import (CLUSTERING_DIR, SCOPE_GROUPS, StoredClustering, VerifyOptions,
                                              choices_of, results_root, stored_scopes, stored_verification_options)

MIN_REGION_SHARE = 0.25
VICTIM_COLUMNS = ("id", "finding", "scope", "clustering", "cluster_rank", "cluster", "region_share",
                  "changed_region", "changed_control")


def _scope_order(scope: str) -> tuple[int, str]:
    """all, mistakes, then per-class scopes: the broadest verified finding names a victim first."""
    group = scope.split(":", 1)[0]
    return (SCOPE_GROUPS.index(group) if group in SCOPE_GROUPS else len(SCOPE_GROUPS), scope)


def verifications_state(cache: Cache) -> str:
    """Changes whenever a causal test result is written or removed (a page's cache key for the victims)."""
    found = sorted((results_root(cache.root) / CLUSTERING_DIR).glob("*/*/verification.parquet"))
    return "|".join(f"{path.parent.name}:{path.stat().st_mtime_ns}" for path in found if path.is_file())


def verified_shortcuts(cache: Cache) -> list[tuple[StoredClustering, pd.Series, float]]:
    """(clustering, its verification row, q) of every cluster whose causal test said "shortcut", among the
    clusterings computed on the cache as it is now; broadest scope first, then by suspicion rank."""
    fresh = [s for s in stored_scopes(cache.root, cache_fingerprint(cache))
             if s.fresh and (s.path / "verification.parquet").is_file()]
    found = []
    for stored in sorted(fresh, key=lambda s: _scope_order(s.scope)):
        try:
            checked = pq.read_table(stored.path / "verification.parquet").to_pandas()
        except (OSError, pa.ArrowException):
            continue   # a damaged result is as good as none: the page's clustering says so
        q = float((stored_verification_options(stored) or {}).get("q", VerifyOptions.q))
        records = {r["name"]: r for r in stored.meta.get("clusterings", [])}
        for row in checked[checked["verdict"] == "shortcut"].sort_values("rank", kind="stable").itertuples(index=False):
            if row.clustering in records:
                clustering = StoredClustering(stored, records[row.clustering], choices_of([stored]))
                found.append((clustering, pd.Series(row._asdict()), q))
    return found


def region_shares(descriptors: np.ndarray, prototype: np.ndarray, q: float) -> np.ndarray:
    """Share of each unit-mass descriptor [n, D*D] on the top q% cells of `prototype` [D*D] (the region the
    causal test blurred, on the descriptor grid)."""
    from analysis.trust.region_removal import top_region

    side = int(round(np.sqrt(prototype.size)))
    region = top_region(np.asarray(prototype, np.float32).reshape(side, side), q, side, side).numpy().reshape(-1)
    return np.asarray(descriptors, np.float64)[:, region].sum(axis=1)


def shortcut_victims(cache: Cache, min_region_share: float = MIN_REGION_SHARE) -> pd.DataFrame:
    """The wrong predictions that a verified shortcut finding explains (see the module docstring): one row per
    image, columns VICTIM_COLUMNS (finding: one line naming the cluster and its test; region_share: the
    image's share of positive relevance in the region), sorted by id. Empty when no cluster was verified
    "shortcut" (run `python -m analysis cluster --verify-top N`)."""
    table = cache.columns(["id", "label", "pred"]).set_index("id")
    rows: dict[int, dict] = {}
    for clustering, check, q in verified_shortcuts(cache):
        members = clustering.members(int(check["cluster"]))
        wrong = members[(table.loc[members, "label"].to_numpy() != table.loc[members, "pred"].to_numpy())]
        wrong = wrong[~np.isin(wrong, list(rows))]
        if len(wrong) == 0:
            continue
        position = np.nonzero(clustering.summary["cluster"].to_numpy() == int(check["cluster"]))[0][0]
        shares = region_shares(cache.descriptors(wrong, "positive"), clustering.prototypes[position], q)
        swapped = float(check.get("changed_background", np.nan))
        finding = (f"{clustering.scope} · {clustering.name} cluster #{int(check['rank'])}: verified shortcut "
                   + (f"(the typical background changed {swapped:.0%} of the predictions, other members' "
                      f"backgrounds {check['changed_background_control']:.0%})" if np.isfinite(swapped) else
                      f"(blurring its top {q:g}% region changed {check['changed_region']:.0%} of the predictions, "
                      f"a random region {check['changed_control']:.0%})"))
        for image, share in zip(wrong.tolist(), shares.tolist()):
            if share >= min_region_share or np.isfinite(swapped):
                rows[image] = {"id": image, "finding": finding, "scope": clustering.scope,
                               "clustering": clustering.name, "cluster_rank": int(check["rank"]),
                               "cluster": int(check["cluster"]), "region_share": share,
                               "changed_region": float(check["changed_region"]),
                               "changed_control": float(check["changed_control"])}
    frame = pd.DataFrame([rows[i] for i in sorted(rows)], columns=list(VICTIM_COLUMNS))
    return frame.astype({"id": np.int64, "cluster_rank": np.int64, "cluster": np.int64, "region_share": np.float64})
