"""The concepts descriptor (issue 15): clustering images by which CAM-layer channels hold their evidence
(`cache.channels.concept_descriptors`, `cache.descriptors(ids, "concepts")`), next to the spatial descriptors,
with the clusters still summarised by their maps; offline (`python -m analysis cluster --descriptor concepts`),
live (a selection re-clustered on the Clusters page) and on the page."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from analysis.cache import CacheError, load
from analysis.explore import cluster_offline as offline, clustering
from analysis.explore.cluster_data import recluster_selection
from analysis.explore.cluster_offline.scope import cluster_scope
from analysis.cache.channels import concept_descriptors
from tests.helpers import open_page, page_texts, run_main, write_synthetic_cache


def test_concept_descriptors_by_hand():
    relevance = np.array([[1.0, -1.0, 3.0, 0.0],     # positive evidence 4: shares 1/4, 0, 3/4, 0
                          [0.0, 0.0, 0.0, 0.0],      # none: uniform
                          [-1.0, -2.0, -3.0, -4.0],  # only negative: uniform
                          [0.0, 2.0, 0.0, 0.0]], np.float32)
    expected = np.array([[0.25, 0, 0.75, 0], [0.25] * 4, [0.25] * 4, [0, 1, 0, 0]], np.float32)
    np.testing.assert_allclose(concept_descriptors(relevance), expected, atol=1e-7)


def test_the_cache_reads_the_concepts_descriptor_from_its_channel_relevance(small_cache: Path):
    cache = load(small_cache)
    ids = cache.table["id"].to_numpy()[[5, 0, 17]]
    relevance = cache.channel_relevance(ids).astype(np.float64)
    positive = np.clip(relevance, 0, None)
    expected = positive / positive.sum(axis=1, keepdims=True)
    assert (positive.sum(axis=1) > 0).all()
    np.testing.assert_allclose(cache.descriptors(ids, "concepts"), expected, atol=1e-6)
    every = cache.descriptors(None, "concepts")
    assert every.shape == (len(cache), relevance.shape[1])
    np.testing.assert_allclose(every[[5, 0, 17]], expected, atol=1e-6)    # None: table order
    with pytest.raises(ValueError, match="concepts"):
        cache.descriptors(ids, "channels")


def _two_ways(per: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images in two groups by channels (channels 0-3 or 4-7 hold the evidence) and, independently, in two
    groups by place (the map's mass on cells 0-7 or 8-15): (concept shares [n, 8], maps [n, 16], by channels,
    by place)."""
    rng = np.random.default_rng(seed)
    by_channels = np.repeat([0, 1], 2 * per)
    by_place = np.tile(np.repeat([0, 1], per), 2)
    shares = np.full((4 * per, 8), 0.01) + rng.random((4 * per, 8)) * 0.02
    maps = np.full((4 * per, 16), 0.01) + rng.random((4 * per, 16)) * 0.02
    for i, (c, p) in enumerate(zip(by_channels, by_place)):
        shares[i, 4 * c:4 * c + 4] += 1.0
        maps[i, 8 * p:8 * p + 8] += 1.0
    return ((shares / shares.sum(1, keepdims=True)).astype(np.float32),
            (maps / maps.sum(1, keepdims=True)).astype(np.float32), by_channels, by_place)


def test_a_scope_clustered_on_concepts_follows_the_channels_and_is_summarised_by_its_maps():
    shares, maps, by_channels, by_place = _two_ways()
    n = len(shares)
    rows = pd.DataFrame({"id": np.arange(n), "label": by_place, "pred": by_place, "correct": np.ones(n, bool),
                         "background_share": np.zeros(n), "background_hotspot": np.full(n, np.nan),
                         "border_share": np.zeros(n)})
    consensus = np.stack([maps[by_place == p].mean(axis=0) for p in (0, 1)])
    settings = clustering.ClusteringSettings(descriptor="concepts", ks=(2,), null_partitions=5)
    result = cluster_scope("all", np.arange(n), shares.copy(), rows, consensus, ["a", "b"], settings,
                           summary_descriptors=maps)
    on_maps = cluster_scope("all", np.arange(n), maps.copy(), rows, consensus, ["a", "b"],
                            clustering.ClusteringSettings(ks=(2,), null_partitions=5))
    for name, labels in result.labels.items():
        assert adjusted_rand_score(by_channels, labels) == pytest.approx(1.0), name      # the channels' groups
        assert abs(adjusted_rand_score(by_place, labels)) < 0.05, name                    # not the places'
        assert adjusted_rand_score(by_place, on_maps.labels[name]) == pytest.approx(1.0), name
        summary = result.summary[result.summary["clustering"] == name]
        prototypes = result.prototypes[(result.summary["clustering"] == name).to_numpy()]
        for row, prototype in zip(summary.itertuples(), prototypes):
            members = labels == row.cluster
            np.testing.assert_allclose(prototype, maps[members].mean(axis=0), atol=1e-6)   # the maps' mean
            group = int(by_channels[members][0])
            named = [int(part.split()[0][1:]) for part in row.concept_mix.split(", ")]
            assert set(named) <= set(range(4 * group, 4 * group + 4)) and len(named) == 3
            top = shares[members].mean(axis=0)
            assert row.concept_mix.startswith(f"#{int(np.argmax(top))} {top.max():.0%}")
    assert "concept_mix" not in on_maps.summary


@pytest.fixture(scope="module")
def concept_clustered(small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("concept_clustered") / "cache"
    shutil.copytree(small_cache, copy)
    return copy


def test_the_command_clusters_on_concepts_next_to_the_maps(concept_clustered: Path, capsys):
    code, out, err = run_main(capsys, "cluster", "--cache", str(concept_clustered), "--descriptor", "concepts",
                              "--scopes", "all", "mistakes", "--quiet")
    assert code == 0, err
    cache = load(concept_clustered)
    stored = offline.read_clustering(cache, "all", descriptor="concepts")
    assert stored.settings.descriptor == "concepts"
    assert sorted(stored.assignments["id"]) == sorted(cache.table["id"])
    assert stored.prototypes.shape == (len(stored.summary), 16)                 # maps, not channel shares
    np.testing.assert_allclose(stored.prototypes.sum(axis=1), 1.0, atol=1e-5)
    top = stored.summary.iloc[0]
    members = stored.members(int(top["cluster"]))
    mean = cache.descriptors(members, "concepts").mean(axis=0)
    assert top["concept_mix"].startswith(f"#{int(np.argmax(mean))} {mean.max():.0%}")
    np.testing.assert_allclose(stored.prototypes[0], cache.descriptors(members, "positive").mean(axis=0), atol=1e-5)
    # explain's run stays
    assert set(offline.read_clustering(cache, "all").choices["descriptor"]) == {"positive", "concepts"}
    assert "concept_mix" not in offline.read_clustering(cache, "all", descriptor="positive").summary


def test_a_cache_without_channel_relevance_fails_before_any_work(tmp_path: Path, capsys):
    out = tmp_path / "cache"
    write_synthetic_cache(out, n_images=30, shard_size=30)
    with pytest.raises(CacheError, match="no channel relevance"):
        load(out).descriptors(None, "concepts")
    code, _, err = run_main(capsys, "cluster", "--cache", str(out), "--descriptor", "concepts")
    assert code == 2 and "no channel relevance" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out / offline.RESULTS_DIR).exists()


def test_a_selection_is_reclustered_live_on_the_offline_clusterings_descriptor(small_cache: Path):
    cache = load(small_cache)
    ids = cache.table["id"].to_numpy()
    result, summary, prototypes = recluster_selection(cache, ids, 2, descriptor="concepts")
    assert result.settings.descriptor == "concepts" and sorted(result.ids) == sorted(ids)
    assert "concept_mix" in summary and prototypes.shape == (len(summary), 16)
    _, spatial, _ = recluster_selection(cache, ids, 2)
    assert "concept_mix" not in spatial


def test_the_clusters_page_names_each_clusters_concepts(monkeypatch, concept_clustered: Path, capsys):
    if not any(offline.read_clustering(load(concept_clustered), "all").choices["descriptor"] == "concepts"):
        assert run_main(capsys, "cluster", "--cache", str(concept_clustered), "--descriptor", "concepts",
                        "--scopes", "all", "--quiet")[0] == 0
    stored = offline.read_clustering(load(concept_clustered), "all", descriptor="concepts")
    at = open_page(monkeypatch, concept_clustered, "clusters",
                   {"c_scope": "all", "c_clust": f"{stored.settings.key()}/{stored.name}"})
    assert not at.exception
    texts = page_texts(at)
    assert f"concepts {stored.summary.iloc[0]['concept_mix']}" in texts and "**which channels**" in texts
    assert any("concept_mix" in frame.value.columns for frame in at.dataframe)


def test_on_the_demo_concepts_split_the_tagged_images_by_the_channels_they_use(small_demo, capsys):
    """In pred:bag the clustering on concepts separates the tagged non-bags the model calls "bag" (their evidence
    in other channels than the bags') from the rest: the clusters and the tag are far from independent, and the
    clusters above the base rate of tagged non-bags hold most of them.

    Restated as a property with a margin (issue 23): a trained model's exact clusters differ across CPUs and
    seeds (float sums in another order). The test once asked for one cluster of >= 80% tagged images (failed on
    another machine: 64%), then for a top-3 cluster at 2x the base rate and the top 3 at 1.5x together, which
    failed in CI at seed 0 (top 3: 23, 25 and 40 images at 43%, 56%, 12% tagged, base 24%) and at seed 2 (two
    clusters, 74 and 50 images at 35% and 10%, base 25%). Measured with one thread (chi-square p of cluster x
    tagged over the scope; share of the tagged non-bags held by the clusters above the base rate): seed 0:
    p = 3e-7, 83%; seed 1: p = 0.010, 77%; seed 2: p = 0.003, 84%; seed 3: p = 2e-6, 70%. Asserted: p < 0.05
    (5x the worst seed's p) and at least 60% held."""
    from scipy.stats import chi2_contingency

    from data import shortcut

    cache_dir = small_demo.cache
    assert run_main(capsys, "cluster", "--cache", str(cache_dir), "--descriptor", "concepts",
                    "--scopes", f"pred:{shortcut.SHORTCUT_CLASS}", "--quiet")[0] == 0
    cache = load(cache_dir)
    bag = cache.manifest["class_names"].index(shortcut.SHORTCUT_CLASS)
    marked = pd.read_csv(small_demo.shortcut_csv).set_index("path")["marked"].astype(bool)
    table = cache.table.set_index("id")
    tagged_other = table["path"].map(marked).fillna(False).to_numpy(bool) & (table["label"] != bag).to_numpy()
    stored = offline.read_clustering(cache, f"pred:{shortcut.SHORTCUT_CLASS}", descriptor="concepts")
    in_scope = tagged_other[table.index.get_indexer(stored.assignments["id"].to_numpy())]
    clusters = stored.assignments["cluster"].to_numpy()
    assert in_scope.sum() >= 15, "too few tagged non-bags are called bag to test anything"
    base_rate = in_scope.mean()
    counts = pd.crosstab(clusters, in_scope)
    p_value = float(chi2_contingency(counts.to_numpy())[1])
    share = counts[True] / counts.sum(axis=1)
    held = float(counts.loc[share > base_rate, True].sum() / in_scope.sum())
    assert p_value < 0.05 and held >= 0.6, (p_value, held, base_rate, counts.to_dict())