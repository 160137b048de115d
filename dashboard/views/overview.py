"""Overview: what the cache holds (model, dataset, counts, accuracy), per-class accuracy, the distributions of
the attention scores, skipped files, the manifest, and the downloads (HTML report, table as CSV)."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from analysis.cache import Cache
from analysis.cache.classes import class_names
from analysis import report
from analysis.explore import statistics as explore
from analysis.present import charts
from analysis.findings import current_findings
from analysis.pipeline.label_check import label_mismatch
from analysis.review import tag_views
from dashboard import common, tagging

SCORE_HELP = {
    **explore.SCORE_DESCRIPTIONS,
    "deletion_auc": "area under the deletion curve (low: removing the most relevant pixels quickly drops the "
                    "score, a faithful map)",
    "insertion_auc": "area under the insertion curve (high: adding the most relevant pixels quickly restores "
                     "the score)",
}


def show_summary(cache: Cache, names: list[str]) -> None:
    """The model, dataset and method, and the headline counts."""
    table, manifest = cache.table, cache.manifest
    st.title("Overview")
    model = manifest.get("model", {})
    dataset = manifest.get("dataset", {})
    options = manifest.get("options", {})
    st.caption(f"Model `{model.get('spec', '?')}` · dataset `{dataset.get('root', '?')}` · FG-CAM on "
               f"`{options.get('base', '?')}`, target layer `{options.get('target_layer', '?')}`")

    errors = cache.errors
    columns = st.columns(5)
    columns[0].metric("Images explained", f"{len(table):,}")
    columns[1].metric("Skipped", f"{len(errors):,}")
    columns[2].metric("Accuracy", f"{table['correct'].mean():.1%}")
    columns[3].metric("Classes", f"{len(names):,}")
    columns[4].metric("Misclassified", f"{int((~table['correct']).sum()):,}")
    if not cache.complete:
        st.warning("The job has not finished: these numbers cover the shards committed so far.")
    mismatch = label_mismatch(table["label"].to_numpy(), table["pred"].to_numpy(), names,
                              table["confidence"].to_numpy())
    if mismatch is not None:
        st.warning(mismatch.message.replace("->", "→"), icon=":material/swap_horiz:")


def show_tags_and_downloads(cache: Cache) -> None:
    """A link to the tags in use (when any), the HTML report and the table as CSV."""
    review = tagging.get_review(cache)
    counts = tag_views.tag_counts(review) if review is not None else None
    if counts is not None and len(counts):
        listed = ", ".join(f"{row.tag} ({row.images:,})" for row in counts.head(8).itertuples(index=False))
        st.page_link("views/review.py", icon=":material/sell:",
                     label=f"Tags: {listed}{' …' if len(counts) > 8 else ''} · find more like them")

    left, right = st.columns(2)
    with left:
        # Deferred: the report renders a few charts and image tiles. It reads the stored clustering and writes
        # nothing in the cache (so a read-only dashboard offers it too).
        common.deferred_download("Download HTML report",
                                 lambda: report.build_report(cache, findings=current_findings(cache)[0]).encode(),
                                 "fgcam_report.html", "text/html", "report", icon=":material/description:",
                                 help="One self-contained file (images and charts inlined, works offline): summary, "
                                      "the findings, per-class maps, the most suspicious clusters, one section per "
                                      "tag, confusion matrix. As PDF: `python -m analysis report --out FILE.pdf`.")
    with right:
        # Deferred: 100,000 rows take seconds to write, and the page must open in under 3 s.
        common.csv_download("Download the table (CSV)", lambda: cache.table, "fgcam_table.csv", key="table_csv")


def show_distributions(table: pd.DataFrame, names: list[str]) -> None:
    """Accuracy per class and each score's histogram."""
    st.subheader("Accuracy per class")
    # Streamlit counts a chart's title and axes in its height: a fixed step per class keeps every label readable.
    per_class = explore.per_class_accuracy(table, names)
    accuracy_figure = charts.accuracy_chart(per_class).properties(height=alt.Step(18))
    st.altair_chart(accuracy_figure, key="accuracy_chart")
    common.chart_png_download("Accuracy chart (PNG)", accuracy_figure, "accuracy_per_class.png", "accuracy_png")

    st.subheader("Score distributions")
    scores = [s for s in report.SCORE_COLUMNS if s in table.columns and table[s].notna().any()]
    if not scores:
        st.info("No score is available in this cache.")
    for start in range(0, len(scores), 3):
        for column, score in zip(st.columns(3), scores[start:start + 3]):
            values = table[score].to_numpy(np.float64)
            with column:
                st.altair_chart(charts.histogram_chart(charts.histogram_frame(values), score), height=220,
                                key=f"hist_{score}")
                st.caption(f"{SCORE_HELP.get(score, score)}. Median {np.nanmedian(values):.3f}, "
                           f"{int(np.isfinite(values).sum()):,} images.")
    missing = [s for s in ("background_share", "deletion_auc") if s in table.columns and s not in scores]
    if "background_share" in missing:
        st.caption("Background scores need a foreground (run the job with --masks or --boxes).")
    if "deletion_auc" in missing:
        st.caption("Deletion / insertion AUCs need the job to run with --faithfulness.")


def main() -> None:
    cache = common.get_cache()
    names = class_names(cache)
    show_summary(cache, names)
    show_tags_and_downloads(cache)
    show_distributions(cache.table, names)
    errors = cache.errors
    st.subheader(f"Skipped files ({len(errors):,})")
    if errors.empty:
        st.caption("No file was skipped.")
    else:
        st.dataframe(errors[["path", "reason"]], hide_index=True, width="stretch")

    with st.expander("Manifest"):
        st.json(cache.manifest, expanded=1)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
