"""Findings (issue 22): every number a sentence quotes is checked against the cache by independent code, on the
small demo with its causal test run, and on a cache without any test run (which must say "undecided")."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from analysis.findings import Finding, compute_findings, read_findings, render, url, write_findings
from analysis.findings.kinds import region_words
from tests.helpers import open_page, page_texts, run_command


def test_render_formats_every_field_and_links_only_the_linked_ones() -> None:
    numbers = {"n": 213, "share": 0.504, "name": "bag"}
    template = "the model calls {n} of them \"{name}\" ({share:.0%})"
    assert render(template, numbers) == 'the model calls 213 of them "bag" (50%)'
    linked = render(template, numbers, {"n": ("clusters", {"c_scope": "pred:bag", "c_focus": "3"})})
    assert linked == 'the model calls [213](/clusters?c_scope=pred%3Abag&c_focus=3) of them "bag" (50%)'
    assert url("overview", {}) == "/overview"
    with pytest.raises(KeyError):
        render("{missing}", numbers)


def test_a_finding_round_trips_through_its_dict() -> None:
    finding = Finding(kind="tag", title="t", sentences=["{n} images"], numbers={"n": 3}, ids=[1, 2, 3],
                      strength=3.0, verdict="your tag", rests_on="tags", page="review", query={"fm_tag": "x"},
                      links={"n": ("review", {"fm_tag": "x"})}, examples=[1])
    again = Finding.from_dict(finding.as_dict())
    assert again == finding and again.text() == "3 images" and finding.as_dict()["text"] == "3 images"


@pytest.mark.parametrize("cells, words", [((0, 0), "in the top-left corner"), ((0, 13), "in the top-right corner"),
                                          ((13, 6), "at the bottom edge"), ((6, 0), "at the left edge"),
                                          ((6, 7), "in the centre")])
def test_region_words_name_where_a_region_lies(cells, words) -> None:
    region = np.zeros((14, 14), bool)
    region[cells] = True
    assert region_words(region) == words


@pytest.fixture(scope="module")
def verified_demo(small_demo):
    """The small demo with the causal test run on the top 3 clusters of all, mistakes and pred:bag, then the
    findings command."""
    code, _, err = run_command("cluster", "--cache", str(small_demo.cache), "--scopes", "all", "mistakes", "pred:bag",
                               "--verify-top", "3", "--quiet")
    assert code == 0, err[-2000:]
    code, out, err = run_command("findings", "--cache", str(small_demo.cache))
    assert code == 0, err[-2000:]
    return small_demo, out


def test_on_the_demo_the_top_finding_is_the_tag_and_its_numbers_are_the_caches(verified_demo) -> None:
    from analysis.explore import cluster_offline
    from data import demo, demo_measure

    paths, printed = verified_demo
    cache, table = demo_measure.marked_table(paths)
    stored = read_findings(cache)
    assert stored is not None and stored[1]          # written by the command, fresh
    findings = stored[0]
    top = findings[0]
    assert top.verdict == "shortcut" and top.kind == "shortcut cluster"
    assert f"[shortcut] {top.title}" in printed
    rows = table.set_index("id").loc[top.ids]
    assert rows["marked"].mean() >= 0.8              # the cluster is the tagged images
    numbers = top.numbers
    bag = demo.shortcut.SHORTCUT_CLASS
    assert numbers["pred_name"] == bag
    names = cache.manifest["class_names"]
    called = rows["pred"].map(lambda p: names[p]) == bag
    assert numbers["size"] == len(rows) and numbers["n_called"] == int(called.sum())
    victims = called & (rows["label"].map(lambda p: names[p]) != bag)
    assert numbers["n_victims"] == int(victims.sum())
    assert numbers["n_classes"] == rows.loc[victims, "label"].nunique()
    # The causal numbers are the stored test's, for this clustering and cluster.
    from analysis.review.shortcut_victims import verified_shortcuts

    clustering, tested, q = next((c, row, q) for c, row, q in verified_shortcuts(cache)
                                 if c.scope == numbers["scope"] and c.name == numbers["clustering"]
                                 and int(row["rank"]) == numbers["rank"])
    assert numbers["changed_region"] == pytest.approx(tested["changed_region"])
    assert numbers["changed_control"] == pytest.approx(tested["changed_control"])
    assert numbers["tested"] == tested["tested"] and numbers["off_object"] == pytest.approx(tested["off_object_share"])
    assert sorted(top.ids) == sorted(clustering.members(int(tested["cluster"])).tolist())
    # The evidence share, recomputed: each member's positive descriptor mass in the prototype's top q% cells.
    position = int(np.nonzero(clustering.summary["cluster"].to_numpy() == int(tested["cluster"]))[0][0])
    prototype = np.asarray(clustering.prototypes[position])
    cut = np.sort(prototype)[::-1][int(round(prototype.size * q / 100)) - 1]
    descriptors = cache.descriptors(np.asarray(top.ids), "positive")
    assert numbers["evidence_share"] == pytest.approx(descriptors[:, prototype >= cut].sum(1).mean(), abs=1e-6)
    assert numbers["where"] == "in the top-left corner"   # the planted tag's corner
    # The sentence says these numbers, formatted.
    assert f"the model calls {numbers['n_called']} of them \"{bag}\"" in top.text()
    assert f"changes {numbers['changed_region']:.0%} of {numbers['tested']} predictions" in top.text()


def test_the_confusion_findings_quote_the_confusion_matrix(verified_demo) -> None:
    from sklearn.metrics import confusion_matrix

    from analysis.cache import load

    paths, _ = verified_demo
    cache = load(paths.cache)
    findings = [f for f in compute_findings(cache) if f.kind == "confused classes"]
    assert findings
    table = cache.table
    names = cache.manifest["class_names"]
    matrix = confusion_matrix(table["label"], table["pred"], labels=range(len(names)))
    for finding in findings:
        true, pred = names.index(finding.numbers["true_name"]), names.index(finding.numbers["pred_name"])
        assert finding.numbers["count"] == matrix[true, pred] == len(finding.ids)
        assert finding.numbers["total"] == matrix[true].sum()
        assert finding.query == {"true": str(true), "pred": str(pred)}


def test_a_concept_strong_in_few_images_that_are_mostly_mistakes_is_an_undecided_finding() -> None:
    """Hand-built channel relevance: 25 images called class 0, of which the 5 labelled class 1 have channel 5 as
    their strongest (prevalence 5/25 = 20%, all mistakes: the finding) and 3 labelled 0 have channel 4 as their
    strongest (strong in few images too, but no mistake: no finding); 10 images of class 1, all alike. With
    only 4 such mistakes there is no finding (at least 5)."""
    from analysis.explore.concepts import ConceptSettings
    from analysis.findings.kinds import few_image_concepts

    relevance = np.zeros((35, 6), np.float32)
    relevance[:, :3] = [3.0, 2.0, 1.0]                    # channels 0, 1, 2 the strongest of every image ...
    relevance[17:20, 4] = 5.0                             # ... but of 17-19 (channel 4, correct images)
    relevance[20:25, 5] = [6.0, 7.0, 8.0, 9.0, 10.0]      # ... and of 20-24 (channel 5, labelled class 1)
    table = pd.DataFrame({"id": np.arange(100, 135), "label": [0] * 20 + [1] * 15, "pred": [0] * 25 + [1] * 10})
    found = few_image_concepts(relevance, table, ["zero", "one"], ConceptSettings(), "/data/my cache")
    assert len(found) == 1
    finding = found[0]
    assert finding.verdict == "undecided" and finding.kind == "concept in few images"
    assert sorted(finding.ids) == [120, 121, 122, 123, 124] and finding.examples == [124, 123, 122, 121, 120]
    assert finding.numbers == {"channel": 5, "strong_rank": 3, "n_strong": 5, "n_images": 25, "name": "zero",
                               "prevalence": 0.2, "n_wrong": 5, "mistake_share": 1.0}
    assert finding.text().startswith("Concept #5 is among the 3 strongest channels of only 5 of the 25 images the "
                                     "model calls \"zero\" (20%), and 5 of them (100%) are labelled another class")
    assert finding.strength == pytest.approx(5 / 25)
    assert "--cache '/data/my cache' --descriptor concepts --scopes pred:zero --verify-top 3" in finding.rests_on
    assert "[5](/concepts?concept=5)" in finding.markdown() and "[25](/concepts?class=zero)" in finding.markdown()
    table.loc[24, "label"] = 0                            # 4 mistakes: too few
    assert few_image_concepts(relevance, table, ["zero", "one"], ConceptSettings(), "/data/my cache") == []


def test_the_concept_findings_of_the_demo_quote_the_channel_relevance(verified_demo) -> None:
    """Each concept finding's numbers recounted from the stored channel relevance by other code (a per-image
    sort in Python)."""
    from analysis.cache import load

    paths, _ = verified_demo
    cache = load(paths.cache)
    relevance = cache.channel_relevance(which="pred")
    table = cache.columns(["id", "label", "pred"])
    names = cache.manifest["class_names"]
    for finding in [f for f in compute_findings(cache) if f.kind == "concept in few images"]:
        c, k = names.index(finding.numbers["name"]), finding.numbers["channel"]
        of_class = np.nonzero(table["pred"].to_numpy() == c)[0]
        strong = [i for i in of_class
                  if k in sorted(range(relevance.shape[1]), key=lambda j: (-relevance[i, j], j))[:3]
                  and relevance[i, k] > 0]
        assert sorted(finding.ids) == sorted(table["id"].to_numpy()[strong].tolist())
        assert finding.numbers["n_images"] == len(of_class) and finding.numbers["n_strong"] == len(strong)
        wrong = int((table["label"].to_numpy()[strong] != c).sum())
        assert finding.numbers["n_wrong"] == wrong and wrong >= 0.5 * len(strong) and wrong >= 5
        assert len(strong) <= 0.2 * len(of_class)


def test_without_a_causal_test_the_cluster_finding_is_undecided_and_names_the_command(small_cache) -> None:
    from analysis.cache import load

    cache = load(small_cache)
    clusters = [f for f in compute_findings(cache) if f.kind == "shortcut cluster"]
    assert clusters and all(f.verdict == "undecided" for f in clusters)
    assert "--verify-top" in clusters[0].rests_on and str(small_cache) in clusters[0].rests_on


def test_tested_clusters_the_tests_could_not_decide_make_an_undecided_finding_with_the_reason(small_cache,
                                                                                              tmp_path) -> None:
    """The real causal tests on a copy of the small cache; their stored verdicts then set to "undecided" by hand
    (the tiny model's own verdicts vary) to check the finding quotes the best-ranked one's reason."""
    import shutil

    import pyarrow.parquet as pq

    from analysis.__main__ import main
    from analysis.cache import load
    from analysis.explore import cluster_offline

    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    assert main(["cluster", "--cache", str(copy), "--scopes", "all", "--verify-top", "2", "--quiet"]) == 0
    path = next(copy.glob("analysis/clustering/*/*/verification.parquet"))
    checked = pq.read_table(path).to_pandas()
    checked["verdict"] = "undecided"
    checked["reason"] = [f"reason of rank {rank}" for rank in checked["rank"]]
    table = pq.read_table(path)
    pq.write_table(pa.Table.from_pandas(checked, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   path)
    cache = load(copy)
    clusters = [f for f in compute_findings(cache) if f.kind == "shortcut cluster"]
    assert [f.verdict for f in clusters] == ["undecided"]
    stored = cluster_offline.read_clustering(cache, "all")
    shown = stored.verification          # the scope's default clustering, as the Clusters page opens it
    assert clusters[0].numbers["count"] == len(shown) and clusters[0].numbers["rank"] == 1
    assert "reason of rank 1" in clusters[0].markdown()
    assert set(clusters[0].ids) == set(stored.members(int(shown.loc[shown["rank"] == 1, "cluster"].iloc[0])))


def test_a_tag_becomes_a_finding_and_the_stored_file_goes_stale_with_the_cache(small_cache, tmp_path) -> None:
    import shutil

    from analysis.cache import load
    from analysis.review import Review

    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    cache = load(copy)
    path, findings = write_findings(cache)
    assert path.is_file() and not [f for f in findings if f.kind == "tag"]
    Review(copy).tag([0, 1], "watermark")
    tags = [f for f in compute_findings(load(copy)) if f.kind == "tag"]
    assert [(f.numbers["n"], f.numbers["tag"]) for f in tags] == [(2, "watermark")]


def test_the_findings_page_shows_the_ranked_findings_with_their_numbers(verified_demo, monkeypatch) -> None:
    paths, _ = verified_demo
    at = open_page(monkeypatch, paths.cache, "findings")
    assert not at.exception
    texts = page_texts(at)
    from analysis.cache import load

    top = read_findings(load(paths.cache))[0][0]
    assert top.title in texts and f"{top.numbers['n_called']}" in texts


def test_the_command_refuses_a_folder_that_is_not_a_cache_in_one_line(tmp_path) -> None:
    code, _, err = run_command("findings", "--cache", str(tmp_path))
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_every_number_of_the_markdown_is_a_link_and_the_words_are_not() -> None:
    finding = Finding(kind="confused classes", title="t", sentences=["{count} of {total} \"{name}\" ({share:.0%})"],
                      numbers={"count": 5, "total": 50, "name": "shirt", "share": 0.1}, ids=[], strength=0.1,
                      verdict="observation", rests_on="", page="mistakes", query={"true": "1", "pred": "2"},
                      links={"count": ("image", {"id": "3"})})
    assert finding.markdown() == ('[5](/image?id=3) of [50](/mistakes?true=1&pred=2) "shirt" '
                                  '([10%](/mistakes?true=1&pred=2))')


def test_the_report_command_writes_the_findings_as_html_and_as_a_pdf_with_pages(small_cache, tmp_path) -> None:
    import re

    from analysis.cache import load
    from analysis.findings import current_findings

    findings, _ = current_findings(load(small_cache))
    assert findings
    html_out, pdf_out = tmp_path / "report.html", tmp_path / "report.pdf"
    for out in (html_out, pdf_out):
        code, _, err = run_command("report", "--cache", str(small_cache), "--out", str(out))
        assert code == 0, err[-2000:]
    text = html_out.read_text()
    assert '<section id="findings">' in text
    import html as html_module

    for finding in findings:
        assert html_module.escape(finding.text()) in text
    import unicodedata

    from pypdf import PdfReader

    assert pdf_out.read_bytes().startswith(b"%PDF-")
    pages = PdfReader(pdf_out).pages
    assert len(pages) >= 2                    # the report spans pages, all printed
    # NFKC: the printed text carries the font's ligatures ("ﬁ", "ﬀ") as single characters.
    printed = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", " ".join(page.extract_text() for page in pages)))
    assert "Findings" in printed
    for finding in findings:                 # every finding's title is in the printed text, not only in the HTML
        assert re.sub(r"\s+", " ", finding.title) in printed, (finding.title, printed[:2000])
    # Never over an existing file, and a wrong suffix: one line, before any work.
    for out, words in ((html_out, "exists"), (tmp_path / "report.txt", ".html or .pdf")):
        code, _, err = run_command("report", "--cache", str(small_cache), "--out", str(out))
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1
