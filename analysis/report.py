"""A self-contained offline HTML report of a cache. The clustering it shows is the stored one the Clusters page
opens with (analysis.explore.cluster_offline.default_clustering): the report clusters nothing itself.

`build_report(cache)` returns one HTML string: a summary, the findings, per-class mean maps, the most suspicious
clusters with example overlays, the confusion matrix and the score distributions. Images are base64 data URIs and charts
are inline SVG rendered by vl-convert, so the file opens anywhere without a network. No streamlit here.

The report draws through analysis.present (tiles, overlay, charts) what the analyses computed and stored; it
sits above them (it reads explore's stored clustering and review's tags; the findings are given by the caller)
and below analysis.commands (`python -m analysis report`) and the dashboard (the Overview's download).
"""
from __future__ import annotations

import html
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.explore import clustering, statistics as explore
from analysis.cache import Cache
from analysis.cache.classes import class_names, num_classes
from analysis.explore.cluster_data import cluster_label, members_by_suspicion
from analysis.explore.cluster_display import scope_label
from analysis.explore.cluster_offline import StoredClustering, default_clustering
from analysis.present import charts, overlay
from analysis.present.tiles import TILE, UNKNOWN_PLACEMENT_NOTE, image_tiles, prototype_tile, unknown_placements

SCORE_COLUMNS = ("background_share", "background_hotspot", "border_share", "concentration",
                 "deletion_auc", "insertion_auc")
REPORT_MATRIX_CLASSES = 30            # the confusion matrix's classes at most (a 1,000-output model)


# ----------------------------------------------------------------------------------------------------------
# Rendering helpers
# ----------------------------------------------------------------------------------------------------------

def _img(tile: np.ndarray, alt: str, caption: str | None = None) -> str:
    figure = f'<img src="{overlay.png_data_uri(tile)}" alt="{html.escape(alt)}" width="{tile.shape[1]}">'
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="tile">{figure}{caption_html}</figure>'


def _table_html(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    formats = formats or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for column in frame.columns:
            value = row[column]
            if isinstance(value, float) and not np.isfinite(value):
                text = "–"
            elif column in formats:
                text = format(value, formats[column])
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _svg(chart) -> str:
    """Inline SVG of a chart; the XML prolog, if any, is dropped (it is not valid inside HTML)."""
    svg = charts.chart_svg(chart)
    start = svg.find("<svg")
    return f'<div class="chart">{svg[start:] if start >= 0 else svg}</div>'


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; }
.metrics { display: flex; gap: 2em; flex-wrap: wrap; }
.metric .value { font-size: 1.8em; font-weight: 600; } .metric .name { color: #666; }
.tiles { display: flex; flex-wrap: wrap; gap: 6px; }
figure.tile { margin: 0; } figure.tile figcaption { font-size: 0.75em; color: #555; max-width: 120px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
.cluster { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.cluster h3 { margin: 0.2em 0; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
"""


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportOptions:
    clusters: int = 5                 # most suspicious clusters shown
    examples_per_cluster: int = 8     # overlays per cluster
    examples_per_tag: int = 12        # overlays per tag (the section per tag)
    rows_per_tag: int = 200           # rows of a tag's list in the report
    tile: int = TILE


def _summary_section(cache: Cache) -> str:
    table = cache.table
    manifest = cache.manifest
    counts = manifest.get("counts", {})
    metrics = [
        ("images explained", f"{len(table):,}"),
        ("skipped", f"{len(cache.errors):,}"),
        ("accuracy", f"{table['correct'].mean():.1%}" if len(table) else "–"),
        ("classes", f"{num_classes(cache)}"),
    ]
    metric_html = "".join(f'<div class="metric"><div class="value">{html.escape(v)}</div>'
                          f'<div class="name">{html.escape(n)}</div></div>' for n, v in metrics)
    options = manifest.get("options", {})
    details = {
        "model": manifest.get("model", {}).get("spec", "?"),
        "dataset": manifest.get("dataset", {}).get("root", "?"),
        "base CAM": options.get("base", "?"),
        "target layer": options.get("target_layer", "?"),
        "model input": _input_description(manifest),
        "job finished": manifest.get("finished") or "no (partial cache)",
        "images in dataset": counts.get("images", "?"),
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in details.items())
    per_class = explore.per_class_accuracy(table, class_names(cache))
    histograms = []
    for score in SCORE_COLUMNS:
        if score in table.columns and table[score].notna().any():
            frame = charts.histogram_frame(table[score].to_numpy())
            histograms.append(_svg(charts.histogram_chart(frame, score)))
    return (f'<section id="summary"><h2>Summary</h2><div class="metrics">{metric_html}</div>'
            f'<table class="details">{rows}</table>'
            f'<div class="charts">{_svg(charts.accuracy_chart(per_class))}</div>'
            f'<h3>Score distributions</h3><div class="charts">{"".join(histograms)}</div></section>')


def _input_description(manifest: dict) -> str:
    """How images became the model's input, e.g. "Resize(short side 256) + CenterCrop(224) -> 224 x 224"."""
    geometry = manifest.get("geometry")
    if not geometry:
        return "not recorded (an older cache)"
    size = geometry.get("input_size") or ["?", "?"]
    method = {"derived": "", "measured": " (measured)"}.get(geometry.get("method"), " (placement unknown)")
    return f"{geometry.get('transform', '?')} -> {size[0]} x {size[1]}{method}"


def _class_maps_section(cache: Cache, tile: int) -> str:
    table = cache.table
    names = class_names(cache)
    means = explore.class_mean_maps(cache.descriptors(None, "positive"), table["label"].to_numpy(np.int64),
                                    table["correct"].to_numpy(bool), num_classes(cache))
    figures = []
    for c, name in enumerate(names):
        if means.n_correct[c] > 0:
            figures.append(_img(overlay.heat(means.correct[c], tile), f"mean map of {name}",
                                f"{name} (correct, n={int(means.n_correct[c])})"))
        if means.n_wrong[c] > 0:
            figures.append(_img(overlay.heat(means.wrong[c], tile), f"mean map of misclassified {name}",
                                f"{name} (wrong, n={int(means.n_wrong[c])})"))
    return ('<section id="class-maps"><h2>Per-class mean maps</h2><p class="meta">Mean unit-mass positive '
            'relevance of the images of each true class, correct and misclassified separately (white: none, dark '
            f'red: most).</p><div class="tiles">{"".join(figures)}</div></section>')


def _clusters_intro(stored: StoredClustering) -> str:
    settings = stored.settings
    algorithm = clustering.ALGORITHM_LABELS.get(stored.algorithm, stored.algorithm)
    intro = (f'<p class="meta">Every one of the {stored.n:,} images of the scope '
             f'{html.escape(scope_label(stored.scope))}, {html.escape(algorithm)}, k = {stored.k} '
             f'(eigengap suggests {stored.suggested_k}), {html.escape(settings.descriptor)} descriptors, '
             f'{html.escape(settings.metric)} kNN graph: the clustering the Clusters page opens with. Clusters are '
             'ranked by suspicion: the mean of the share of relevance off the object, on the border, the error rate '
             'and how unlike its class\'s consensus the prototype is.</p>')
    return intro + "".join(f'<p class="meta">{html.escape(message)}.</p>' for message in stored.messages)


def _cluster_block(cache: Cache, stored: StoredClustering, position: int, options: ReportOptions) -> str:
    """One of the most suspicious clusters: its prototype, its most telling members and its numbers."""
    record = stored.summary.iloc[position]
    cluster = int(record["cluster"])
    examples = members_by_suspicion(cache, stored.members(cluster), options.examples_per_cluster)
    rows = cache.table.set_index("id").loc[examples]
    tiles = image_tiles(cache, examples, "overlay", size=options.tile)
    figures = [_img(prototype_tile(stored.prototypes[position], options.tile), f"prototype of {cluster_label(cluster)}",
                    "prototype")]
    figures += [_img(t, f"image {i}", f"#{i} {r.label_name}→{r.pred_name}")
                for t, i, r in zip(tiles, examples, rows.itertuples())]
    facts = (f"{int(record['size'])} images, accuracy {record['accuracy']:.0%}, classes: "
             f"{record['class_mix']}, background share "
             f"{'–' if pd.isna(record['background_share']) else format(record['background_share'], '.2f')}, "
             f"border share {'–' if pd.isna(record['border_share']) else format(record['border_share'], '.2f')}")
    return (f'<div class="cluster"><h3>#{int(record["rank"])} {cluster_label(cluster)} '
            f'(suspicion {record["suspicion"]:.2f})</h3><p>{html.escape(facts)}</p>'
            f'<div class="tiles">{"".join(figures)}</div></div>')


def _clusters_section(cache: Cache, stored: StoredClustering | None, options: ReportOptions) -> str:
    if stored is None:
        command = f"python -m analysis cluster --cache {shlex.quote(str(cache.root))}"
        return ('<section id="clusters"><h2>Most suspicious clusters</h2><p>No clustering is stored for this cache '
                f'as it is now: run <code>{html.escape(command)}</code> '
                '(the explain job runs it at its end) and make the report again.</p></section>')
    summary = stored.summary
    table = summary[["rank", "cluster", "size", "accuracy", "majority_name", "class_mix", "background_share",
                     "border_share", "suspicion"]].assign(cluster=summary["cluster"].map(cluster_label))
    blocks = [_cluster_block(cache, stored, position, options) for position in range(min(options.clusters,
                                                                                          len(summary)))]
    eigen = _svg(charts.eigenvalue_chart(stored.eigenvalues, stored.suggested_k)) if len(stored.eigenvalues) > 1 \
        else ""
    formats = {"accuracy": ".0%", "background_share": ".2f", "border_share": ".2f", "suspicion": ".2f"}
    return (f'<section id="clusters"><h2>Most suspicious clusters</h2>{_clusters_intro(stored)}'
            f'<div class="charts">{eigen}</div>{"".join(blocks)}<h3>All clusters</h3>{_table_html(table, formats)}'
            '</section>')


def _confusion_section(cache: Cache) -> str:
    table = cache.table
    names = class_names(cache)
    matrix = explore.confusion_matrix(table["label"].to_numpy(np.int64), table["pred"].to_numpy(np.int64),
                                      num_classes(cache))
    shown = explore.matrix_classes(matrix, REPORT_MATRIX_CLASSES)
    chart = charts.confusion_chart(explore.confusion_frame(matrix, names, shown), selectable=False)
    top = explore.top_confusions(matrix, names, k=10)[["true_name", "pred_name", "count", "row_share"]]
    top_html = _table_html(top, {"row_share": ".1%"}) if len(top) else "<p>No misclassification.</p>"
    occurring = len(explore.occurring_classes(matrix))
    note = (f"<p>The {len(shown)} classes with the most mistakes, of the {occurring:,} that occur (true or "
            f"predicted).</p>" if len(shown) < occurring else "")
    return (f'<section id="confusion"><h2>Confusion matrix</h2>{note}<div class="charts">{_svg(chart)}</div>'
            f'<h3>Most frequent confusions</h3>{top_html}</section>')


def _errors_section(cache: Cache) -> str:
    errors = cache.errors
    if errors.empty:
        return '<section id="skipped"><h2>Skipped files</h2><p>None.</p></section>'
    shown = errors[["path", "reason"]].head(200)
    more = f"<p>… and {len(errors) - len(shown):,} more.</p>" if len(errors) > len(shown) else ""
    return f'<section id="skipped"><h2>Skipped files</h2>{_table_html(shown)}{more}</section>'


def _tags_section(cache: Cache, options: ReportOptions) -> str:
    """One block per tag made on this cache (DIR/review.sqlite, analysis.review): its images as overlays and its
    list (as `python -m analysis export` writes it). Nothing when no tag was ever made."""
    from analysis.review import DB_NAME, Review, ReviewError, tagged_table
    from analysis.review.tag_views import tag_counts

    if not (Path(cache.root) / DB_NAME).exists():
        return ""
    try:
        review = Review(cache.root, cache=cache)
        counts = tag_counts(review)
    except ReviewError as error:
        return f'<section id="tags"><h2>Tags</h2><p>{html.escape(str(error).splitlines()[0])}</p></section>'
    if counts.empty:
        return ""
    blocks = []
    for number, row in enumerate(counts.itertuples(index=False)):
        frame = tagged_table(review, row.tag)
        examples = frame["id"].head(options.examples_per_tag).tolist()
        tiles = image_tiles(cache, examples, "overlay", size=options.tile)
        figures = [_img(t, f"image {i}", f"#{i} {label}→{pred}")
                   for t, i, label, pred in zip(tiles, examples, frame["label"], frame["prediction"])]
        shown = frame[["id", "label", "prediction", "tags", "note", "who", "when"]].head(options.rows_per_tag)
        shown = shown.fillna("")
        command = f"python -m analysis export --cache {shlex.quote(str(cache.root))} --tag {shlex.quote(row.tag)}"
        more = (f"<p>… and {len(frame) - len(shown):,} more (the whole list: <code>{html.escape(command)}</code>)."
                "</p>") if len(frame) > len(shown) else ""
        who = f", by {html.escape(row.who)}" if row.who else ""
        rejected = f", {row.rejected:,} rejected" if row.rejected else ""
        blocks.append(f'<div class="cluster" id="tag-{number}"><h3>{html.escape(row.tag)}</h3>'
                      f'<p>{row.images:,} image{"s" if row.images != 1 else ""}{rejected}{who}; last tagged '
                      f'{html.escape(str(row.last))}.</p><div class="tiles">{"".join(figures)}</div>'
                      f'{_table_html(shown)}{more}</div>')
    return ('<section id="tags"><h2>Tags</h2><p class="meta">What reviewers tagged in the dashboard, one block per '
            'tag (most images first).</p>' + "".join(blocks) + "</section>")


def _findings_section(cache: Cache, findings: Sequence[Any], options: ReportOptions) -> str:
    """The findings (analysis.findings: each with title, verdict, text(), rests_on, examples), ranked, each with
    its sentences, what it rests on and example overlays."""
    if not findings:
        return ('<section id="findings"><h2>Findings</h2><p>No finding: no shortcut was verified, no class is '
                'confused with another in more than 5% of its images, none is decided off the object. This is not '
                'proof that the model is fine (see the method below).</p></section>')
    blocks = []
    names = cache.columns(["id", "label", "pred"]).set_index("id")
    labels = class_names(cache)
    for number, finding in enumerate(findings, 1):
        examples = [int(i) for i in finding.examples[:options.examples_per_cluster]]
        tiles = image_tiles(cache, examples, "overlay", size=options.tile) if examples else []
        figures = [_img(tile, f"image {i}", f"#{i} {labels[int(names.at[i, 'label'])]}→"
                                             f"{labels[int(names.at[i, 'pred'])]}") for tile, i in zip(tiles, examples)]
        blocks.append(f'<div class="cluster"><h3>{number}. {html.escape(finding.title)} '
                      f'<span class="meta">[{html.escape(finding.verdict)}]</span></h3>'
                      f'<p>{html.escape(finding.text())}</p><p class="meta">Rests on: {html.escape(finding.rests_on)}'
                      f'</p><div class="tiles">{"".join(figures)}</div></div>')
    return ('<section id="findings"><h2>Findings</h2><p class="meta">What was found, in words computed from the '
            'measured numbers, ranked: verified shortcuts first. "Shortcut" means: the region the model uses lies '
            'off the object, and blurring it changes far more predictions than blurring a random region of the '
            'same size; "undecided" means that the test that would decide was not run or cannot tell.</p>'
            + "".join(blocks) + "</section>")


def build_report(cache: Cache, stored: StoredClustering | None = None, options: ReportOptions = ReportOptions(),
                 title: str = "FG-CAM explanation report", findings: Sequence[Any] = ()) -> str:
    """The whole report as one self-contained HTML document (nothing is fetched when it is opened).

    Its clusters are `stored`, by default the stored clustering the Clusters page opens with
    (cluster_offline.default_clustering); without one the section names the command that makes it. `findings`
    (analysis.findings, given by the caller: the findings sit above this module) come first after the summary.
    """
    if stored is None:
        stored = default_clustering(cache)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [_summary_section(cache), _findings_section(cache, findings, options),
                _class_maps_section(cache, options.tile),
                _clusters_section(cache, stored, options), _tags_section(cache, options),
                _confusion_section(cache), _errors_section(cache)]
    partial = "" if cache.complete else "<p><strong>The job had not finished: this covers a partial cache.</strong></p>"
    unknown = unknown_placements(cache)
    if unknown:
        partial += f"<p><strong>{html.escape(UNKNOWN_PLACEMENT_NOTE.format(count=unknown))}</strong></p>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">Cache {html.escape(str(cache.root))} · made {created}</p>"
            f"{partial}{''.join(sections)}</body></html>\n")
