"""The offline HTML report (analysis/report.py) on a real cache made by the real job (which stores the
offline clustering the report and the Clusters page read)."""
from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from analysis import report
from analysis.explore import cluster_data, cluster_offline, clustering
from analysis.cache import load
from tests.helpers import open_page


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
    copy = tmp_path / "cache"          # the tests store other clusterings and tags: keep them private
    shutil.copytree(small_cache, copy)
    return load(copy)


def _three_clusters(cache) -> cluster_offline.StoredClustering:
    """A stored clustering of every image into 3 clusters (besides the job's), as `python -m analysis cluster
    --k 3` stores it."""
    settings = clustering.ClusteringSettings(algorithms=("kmeans",), ks=(3,), embedding="spectral",
                                             null_partitions=5)
    cluster_offline.cluster_cache(cache, settings, ["all"], threads=1)
    return cluster_offline.read_clustering(cache, "all", run=settings.key())


def _expected_images(cache, stored: cluster_offline.StoredClustering, options: report.ReportOptions) -> int:
    table = cache.table
    class_tiles = table.groupby("label")["correct"].agg(lambda c: int(c.any()) + int((~c).any())).sum()
    shown = stored.summary["size"].tolist()   # every cluster is shown when there are <= options.clusters
    assert len(shown) <= options.clusters
    return int(class_tiles) + sum(1 + min(options.examples_per_cluster, int(s)) for s in shown)


def _table_rows(section: str) -> list[list[str]]:
    """The cells of every body row of the last table of an HTML fragment."""
    body = section[section.rindex("<tbody>"):section.rindex("</tbody>")]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_report_is_self_contained_and_complete(cache):
    stored = _three_clusters(cache)
    assert len(stored.summary) == 3
    options = report.ReportOptions()
    document = report.build_report(cache, stored, options)

    parsed = _parse(document)
    assert parsed.open_sections == 0
    ids = [attrs.get("id") for tag, attrs in parsed.tags if tag == "section"]
    assert ids == ["summary", "findings", "class-maps", "clusters", "confusion", "skipped"]

    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == _expected_images(cache, stored, options)
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


def test_the_reports_clusters_are_the_stored_ones_the_clusters_page_shows(cache, monkeypatch):
    """Without a clustering given, the report shows the stored one the Clusters page opens with (the job's,
    all images): the same clusters, ranks and sizes as the page's table, and nothing is clustered or written."""
    before = sorted(str(p.relative_to(cache.root)) for p in Path(cache.root).rglob("*"))
    document = report.build_report(cache)
    assert sorted(str(p.relative_to(cache.root)) for p in Path(cache.root).rglob("*")) == before
    stored = cluster_offline.default_clustering(cache)
    assert stored.scope == "all" and stored.k_from == "eigengap"
    section = document[document.index('<section id="clusters">'):document.index('<section id="confusion">')]
    assert f"Every one of the {len(cache):,} images of the scope all images, k-means, k = {stored.k} " in section
    shown = [(int(rank), label, int(size)) for rank, label, size, *_ in _table_rows(section)]
    assert shown == [(int(r.rank), f"C{r.cluster}", int(r.size)) for r in stored.summary.itertuples()]

    at = open_page(monkeypatch, Path(cache.root), "clusters")
    assert not at.exception
    page = next(d.value for d in at.dataframe if list(d.value.columns[:3]) == ["rank", "cluster", "size"])
    assert [(int(r), c, int(s)) for r, c, s in zip(page["rank"], page["cluster"], page["size"])] == shown


def test_a_report_without_a_stored_clustering_names_the_command(cache):
    shutil.rmtree(Path(cache.root) / cluster_offline.RESULTS_DIR)
    document = report.build_report(cache)
    parsed = _parse(document)
    assert parsed.open_sections == 0
    assert [attrs.get("id") for tag, attrs in parsed.tags if tag == "section"] == \
        ["summary", "findings", "class-maps", "clusters", "confusion", "skipped"]
    section = document[document.index('<section id="clusters">'):document.index('<section id="confusion">')]
    assert f"run <code>python -m analysis cluster --cache {cache.root}</code>" in section
    assert not (Path(cache.root) / cluster_offline.RESULTS_DIR).exists()    # the report stored nothing


def test_a_reclustered_selection_ranks_clusters_and_gives_prototypes(cache):
    result, summary, prototypes = cluster_data.recluster_selection(cache, cache.table["id"].to_numpy(), 3)
    assert summary["size"].sum() == len(cache)
    assert list(summary["rank"]) == [1, 2, 3]
    assert summary["suspicion"].is_monotonic_decreasing
    assert prototypes.shape == (3, cache.descriptors([0]).shape[1])
    np.testing.assert_allclose(prototypes.sum(axis=1), 1.0, atol=1e-4)   # means of unit-mass maps
    first = int(summary["cluster"].iloc[0])
    members = cluster_data.members_by_suspicion(cache, result.ids[result.labels == first])
    assert sorted(members.tolist()) == sorted(result.ids[result.labels == first].tolist())
    wrong = ~cache.table.set_index("id").loc[members, "correct"].to_numpy(bool)
    assert (np.diff(wrong.astype(int)) <= 0).all()                       # mistakes first


def test_report_has_one_section_per_tag(cache):
    """Tags made on the cache (analysis.review): one block per tag, most images first, with its images as
    overlays and its list; a tag with markup in it is escaped. No database, no section (and none is created)."""
    from analysis.review import DB_NAME, Review

    stored = _three_clusters(cache)
    options = report.ReportOptions(examples_per_tag=2)
    untagged = report.build_report(cache, stored, options)
    assert 'id="tags"' not in untagged and not (Path(cache.root) / DB_NAME).exists()

    ids = cache.table["id"].tolist()
    review = Review(cache.root, cache=cache)
    review.tag(ids[:3], "shortcut", note="corner <b>mark</b>", who="Ada")
    review.tag(ids[5:6], "<script>x</script>")
    document = report.build_report(cache, stored, options)
    parsed = _parse(document)
    assert parsed.open_sections == 0
    assert [attrs.get("id") for tag, attrs in parsed.tags if tag == "section"] == \
        ["summary", "findings", "class-maps", "clusters", "tags", "confusion", "skipped"]
    section = document[document.index('<section id="tags">'):document.index('<section id="confusion">')]
    blocks = re.findall(r'<div class="cluster" id="tag-\d+"><h3>(.*?)</h3><p>(.*?)</p>', section)
    assert [b[0] for b in blocks] == ["shortcut", "&lt;script&gt;x&lt;/script&gt;"]
    assert blocks[0][1].startswith("3 images, by Ada") and blocks[1][1].startswith("1 image;")
    assert section.count("<img ") == 2 + 1   # examples_per_tag for "shortcut", its one image for the other
    assert "corner &lt;b&gt;mark&lt;/b&gt;" in section and "<script" not in document.lower()
    assert len(images := [a for t, a in parsed.tags if t == "img"]) == _expected_images(cache, stored, options) + 3
    assert all(a["src"].startswith("data:image/png;base64,") for a in images)
