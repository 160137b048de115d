"""The offline HTML report (analysis/explore/report.py) on a real cache made by the real job."""
from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from analysis.explore import cluster_data, clustering, report
from analysis.cache import load


class _Collector(HTMLParser):
    """Every start tag with its attributes, and the section ids, from a real HTML parse."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open_sections = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.open_sections += tag == "section"

    def handle_endtag(self, tag):
        self.open_sections -= tag == "section"


def _parse(document: str) -> _Collector:
    parser = _Collector()
    parser.feed(document)
    parser.close()
    return parser


@pytest.fixture()
def cache(small_cache: Path, tmp_path: Path):
    copy = tmp_path / "cache"          # the report saves its clustering in CACHE/dashboard/: keep that private
    shutil.copytree(small_cache, copy)
    return load(copy)


def _expected_images(cache, result: clustering.ClusteringResult, options: report.ReportOptions) -> int:
    table = cache.table
    class_tiles = table.groupby("label")["correct"].agg(lambda c: int(c.any()) + int((~c).any())).sum()
    sizes = np.bincount(result.labels[result.labels >= 0])
    shown = sorted(sizes, reverse=True)  # any order: every cluster is shown when there are <= options.clusters
    assert len(shown) <= options.clusters
    return int(class_tiles) + sum(1 + min(options.examples_per_cluster, int(s)) for s in shown)


def test_report_is_self_contained_and_complete(cache):
    settings = clustering.ClusteringSettings(algorithm="agglomerative", n_clusters=3, embedding="spectral")
    result = cluster_data.cluster_cache(cache, settings)
    options = report.ReportOptions()
    document = report.build_report(cache, result, options)

    parsed = _parse(document)
    assert parsed.open_sections == 0
    ids = [attrs.get("id") for tag, attrs in parsed.tags if tag == "section"]
    assert ids == ["summary", "class-maps", "clusters", "confusion", "skipped"]

    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == _expected_images(cache, result, options)
    assert all(attrs["src"].startswith("data:image/png;base64,") for attrs in images)
    # nothing refers to a resource outside the file (the SVG namespace declaration is not a reference)
    for tag, attrs in parsed.tags:
        for name in ("src", "href", "xlink:href"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http://", "https://", "//")), (tag, name, value)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", document, re.IGNORECASE)
    assert "<script" not in document.lower()
    assert "@import" not in document and "url(http" not in document

    # charts are inline SVG: accuracy, 4 histograms, eigenvalues, confusion matrix
    assert sum(1 for tag, _ in parsed.tags if tag == "svg") == 1 + 4 + 1 + 1
    # the three clusters are all listed, ranked by suspicion
    assert len(re.findall(r'<div class="cluster"><h3>#\d', document)) == 3
    assert "Most frequent confusions" in document
    names = cache.manifest["class_names"]
    assert all(name in document for name in names)


def test_report_default_clustering_is_saved_and_reused(cache):
    document = report.build_report(cache)
    saved = list((Path(cache.root) / cluster_data.RESULTS_DIR_NAME).glob("clustering-*.parquet"))
    assert len(saved) == 1
    assert _parse(document).open_sections == 0
    result = report.default_clustering(cache)
    assert result.settings.embedding == "spectral" and len(result.ids) == len(cache)
    assert "<section id=\"clusters\">" in document


def test_summarize_ranks_clusters_and_gives_prototypes(cache):
    result = cluster_data.cluster_cache(cache, clustering.ClusteringSettings(n_clusters=3, embedding="spectral"),
                                  save=False)
    summary, prototypes = cluster_data.summarize(cache, result)
    assert summary["size"].sum() == len(cache)
    assert list(summary["rank"]) == [1, 2, 3]
    assert summary["suspicion"].is_monotonic_decreasing
    assert prototypes.shape == (3, cache.descriptors([0]).shape[1])
    np.testing.assert_allclose(prototypes.sum(axis=1), 1.0, atol=1e-4)   # means of unit-mass maps
    first = int(summary["cluster"].iloc[0])
    members = cluster_data.members_by_suspicion(cache, result, first)
    assert sorted(members.tolist()) == sorted(result.ids[result.labels == first].tolist())


def test_report_has_one_section_per_tag(cache):
    """Tags made on the cache (analysis.review): one block per tag, most images first, with its images as
    overlays and its list; a tag with markup in it is escaped. No database, no section (and none is created)."""
    from analysis.review import DB_NAME, Review

    settings = clustering.ClusteringSettings(algorithm="agglomerative", n_clusters=3, embedding="spectral")
    result = cluster_data.cluster_cache(cache, settings)
    options = report.ReportOptions(examples_per_tag=2)
    untagged = report.build_report(cache, result, options)
    assert 'id="tags"' not in untagged and not (Path(cache.root) / DB_NAME).exists()

    ids = cache.table["id"].tolist()
    review = Review(cache.root, cache=cache)
    review.tag(ids[:3], "shortcut", note="corner <b>mark</b>", who="Ada")
    review.tag(ids[5:6], "<script>x</script>")
    document = report.build_report(cache, result, options)
    parsed = _parse(document)
    assert parsed.open_sections == 0
    assert [attrs.get("id") for tag, attrs in parsed.tags if tag == "section"] == \
        ["summary", "class-maps", "clusters", "tags", "confusion", "skipped"]
    section = document[document.index('<section id="tags">'):document.index('<section id="confusion">')]
    blocks = re.findall(r'<div class="cluster" id="tag-\d+"><h3>(.*?)</h3><p>(.*?)</p>', section)
    assert [b[0] for b in blocks] == ["shortcut", "&lt;script&gt;x&lt;/script&gt;"]
    assert blocks[0][1].startswith("3 images, by Ada") and blocks[1][1].startswith("1 image;")
    assert section.count("<img ") == 2 + 1   # examples_per_tag for "shortcut", its one image for the other
    assert "corner &lt;b&gt;mark&lt;/b&gt;" in section and "<script" not in document.lower()
    assert len(images := [a for t, a in parsed.tags if t == "img"]) == _expected_images(cache, result, options) + 3
    assert all(a["src"].startswith("data:image/png;base64,") for a in images)
