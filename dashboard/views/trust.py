"""Trust: are the maps faithful (deletion / insertion), do they depend on the model and on the class (the sanity
checks), both from `python -m analysis compare-methods --cache DIR`; does pasting a selection's region into other
images flip them to its class (the insertion tests saved by `python -m analysis insertion-test`); and does the
model really use the region a selection's maps point to (the causal shortcut test, run here on demand)? The page
loads, calls `analysis.trust.page` (tables, charts, images, verdicts) and draws.

View state in the URL: sn_variant, sn_metric (the maps the sanity checks compare, and how), st_by, st_class, st_q, st_max (a copied
link fills in the same form). The shortcut test runs only when the form's button is clicked (it loads the model
and runs it on up to 5,000 images): never on opening a page, whatever the URL says; its results stay on the page
for the session and are cached per cache and settings.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import streamlit as st

from analysis.cache import Cache, CacheError
from analysis.cache.classes import class_names
from analysis.cache.derived import COMPARISON, INSERTION_TESTS, SANITY_CHECKS, missing
from analysis.present import charts, trust_charts
from analysis.trust import compare, page as trust_page, sanity
from analysis.trust.methods import BASE_LABELS
from dashboard import common

if TYPE_CHECKING:   # the region test imports torch: the page loads it only when the test runs
    from analysis.trust.region_removal import CacheShortcutReport

SELECT_BY = {"label": "true class", "pred": "predicted class"}
DEFAULT_MAX_IMAGES = 200     # images tested per run: 3 forward passes each (plus 2 with masks), on the CPU
MAX_IMAGES = 5000
REGION_TILE = 256
INSERTION_TILE = 200


# ------------------------------------------------------------------------------------------------ faithfulness
def faithfulness_section(cache: Cache) -> bool:
    """Deletion / insertion from the stored comparison; True when it is shown (it belongs to this cache)."""
    st.header("Are the maps faithful?")
    directory = cache.root / compare.TRUST_DIR_NAME
    problem = None
    try:
        table, curves, meta = trust_page.trust_page_data(directory)
        stale = compare.made_for_another_cache(meta, cache.manifest)
        if stale:
            problem = missing(COMPARISON, cache.root, "stale", f"it does not belong to this cache: {stale}")
    except compare.ComparisonError as error:
        if (directory / compare.META_FILE).exists():
            problem = missing(COMPARISON, cache.root, "unreadable", str(error))
        else:
            problem = missing(COMPARISON, cache.root)
    if problem is not None:
        common.show_missing(problem)
        st.caption("It scores FG-CAM, FG-CAM denoised, the plain CAM, LRP and a random map on a sample of the "
                   "cache's images (--sample, default 100), runs the sanity checks, and writes them to "
                   "CACHE/trust/; reload this page when it has finished.")
    else:
        st.markdown(
            f"Deletion blurs an image's most relevant pixels first: a faithful map makes the class probability "
            f"fall fast (**lower area under the curve is better**). Insertion restores them into a blurred image: "
            f"it should rise fast (**higher is better**). {meta.get('n_images', '?')} images, "
            f"{meta.get('steps', '?')} steps, FG-CAM on {BASE_LABELS.get(meta.get('base'), meta.get('base'))} "
            f"(CAM layer `{meta.get('cam_layer', '?')}`); ± is the 95% confidence interval of the mean.")
        st.dataframe(trust_page.comparison_table(table, meta), hide_index=True, width="stretch")
        for layer in meta.get("layers") or table["layer"].unique().tolist():
            left, right = st.columns(2)
            with left:
                common.altair_chart(trust_charts.curve_chart(curves, layer, "deletion"), width="content")
            with right:
                common.altair_chart(trust_charts.curve_chart(curves, layer, "insertion"), width="content")
        if meta.get("created"):
            st.caption(f"Comparison made {meta['created']} from {meta.get('source', directory)}.")

    auc = cache.table[["deletion_auc", "insertion_auc"]] if {"deletion_auc", "insertion_auc"} <= set(
        cache.table.columns) else pd.DataFrame()
    if not auc.empty and auc.notna().any().any():
        st.subheader("Per-image faithfulness of this cache's maps")
        st.caption(f"From the explain job's --faithfulness option: {int(auc['deletion_auc'].notna().sum()):,} "
                   "images scored.")
        left, right = st.columns(2)
        for column, metric, better in ((left, "deletion_auc", "lower"), (right, "insertion_auc", "higher")):
            values = auc[metric].to_numpy(np.float64)
            with column:
                common.altair_chart(charts.histogram_chart(
                    charts.histogram_frame(values, bins=30, value_range=(0, 1)),
                    f"{metric} ({better} is better), median {np.nanmedian(values):.3f}", width=360, height=180),
                    width="content")
    return problem is None


# ------------------------------------------------------------------------------------------------ sanity checks
def sanity_section(cache: Cache, comparison_shown: bool) -> None:
    """The sanity checks stored with the comparison: curves against randomised depth, the class check, and
    what they mean in one sentence per layer."""
    st.header("Does the map depend on the model, and on the class?")
    if not comparison_shown:
        st.caption("No sanity checks for this cache: they are made with the method comparison (above).")
        return
    directory = cache.root / compare.TRUST_DIR_NAME
    variant = common.query_value("sn_variant", "abs", choices=list(sanity.VARIANTS))
    metric = common.query_value("sn_metric", "spearman", choices=list(trust_charts.SANITY_METRICS))
    try:
        found = trust_page.sanity_page_data(directory, variant, "spearman")
        shown = trust_page.sanity_page_data(directory, variant, metric) if found is not None else None
    except compare.ComparisonError as error:
        st.warning(f"The sanity checks cannot be read: {error}")
        return
    if found is None:
        common.show_missing(missing(SANITY_CHECKS, cache.root, note="The comparison stored here was made without "
                                    "them."))
        return
    curves, classes, meta = found
    st.markdown(
        "Two checks of Adebayo et al. (NeurIPS 2018). **Model randomisation**: the model's layers are replaced by "
        "random ones from the top down, and each map is compared with the original model's: a map that barely "
        "changes describes the image, not what the model learnt (the random and edge maps, which ignore the model, "
        "stay at 1). **Another class**: the map of the predicted class against the map of a random other class: "
        "a map that barely changes does not explain the decision. "
        f"Mean over {meta.get('n_images', '?')} images, with its 95% confidence interval.")
    variants = meta.get("variants") or {v: v for v in sanity.VARIANTS}
    left, right = st.columns(2)
    chosen_variant = left.radio("Maps compared", list(variants), format_func=lambda v: variants.get(v, v),
                                index=list(variants).index(variant) if variant in variants else 0)
    chosen_metric = right.radio("Similarity", list(trust_charts.SANITY_METRICS), horizontal=True,
                                format_func=trust_charts.SANITY_METRICS.get,
                                index=list(trust_charts.SANITY_METRICS).index(metric))
    if (chosen_variant, chosen_metric) != (variant, metric):
        common.set_query(sn_variant=chosen_variant, sn_metric=chosen_metric)
        st.rerun()
    sizes = meta.get("layer_sizes", {})
    for layer in meta.get("layers") or curves["layer"].unique().tolist():
        where = f"{layer} ({sizes[layer][0]}×{sizes[layer][1]})" if layer in sizes else layer
        st.subheader(f"Maps at {where}")
        sentence = trust_page.sanity_verdict(curves, classes if len(classes) else None, layer)
        if sentence:
            st.markdown(f"**{sentence}**")
            st.caption(trust_page.SENTENCE_NUMBERS)
            caveat = trust_page.sanity_caveat(curves, layer)
            if caveat:
                st.warning(caveat, icon=":material/info:")
        left, right = st.columns(2)
        with left:
            common.altair_chart(trust_charts.sanity_curve_chart(shown[0], layer, metric), width="content")
        with right:
            if len(classes[classes["layer"] == layer].dropna(subset=[f"{metric}_mean"])):
                common.altair_chart(trust_charts.class_check_chart(classes, layer, metric), width="content")
            else:
                st.caption("The class check was not run (--no-class-check).")
    if meta.get("sentence"):
        st.caption(f"In numbers (|map|, rank correlation): {meta['sentence']}")


# ------------------------------------------------------------------------------------------------ insertion test
def insertion_section(cache: Cache) -> None:
    """The stored artefact insertion tests (`python -m analysis insertion-test`), one row per tested selection."""
    from analysis.trust.region_insertion import read_insertion_reports

    st.header("Does pasting the region make other images look like the class?")
    st.markdown("The artefact insertion test (Reveal-to-Revise, Pahde et al. 2023): the region a selection's mean "
                "map points to is cut out of its images and pasted into images of other classes; we count the "
                "predictions that flip to the selection's class, against pasting a random region of the same size. "
                "A shortcut flips far more with the region.")
    saved = read_insertion_reports(cache.root)
    note = ("Tag a suspicious cluster first (Clusters page), or select with `--pred CLASS`, `--class CLASS` or "
            "`--ids FILE`; then reload this page.")
    if not saved:
        common.show_missing(missing(INSERTION_TESTS, cache.root, note=note, options=("--tag", "shortcut")))
        return
    old = [run.name for run in saved if trust_page.made_before_cache(run.modified, cache.manifest)]
    saved = [run for run in saved if run.name not in old]
    if old:
        common.show_missing(missing(INSERTION_TESTS, cache.root, "stale", f"{len(old)} saved test(s) are older than "
                                    "this cache, their ids may name other images now", note, ("--tag", "shortcut")))
    if not saved:
        return
    table = trust_page.insertion_table(saved)
    common.altair_chart(trust_charts.insertion_chart(table), width="content")
    for selection, into, region, verdict in zip(table["selection"], table["flips to"], table["region"],
                                                table["verdict"]):
        st.markdown(f"**{selection} → {into}** ({region}): {verdict}")
    st.dataframe(table.drop(columns=["name", "verdict"]), hide_index=True, width="stretch", column_config={
        column: st.column_config.NumberColumn(format="percent")
        for column in ("flipped, region pasted", "flipped, random region")} | {
        column: st.column_config.NumberColumn(format="%.3f") for column in ("p before", "p region", "p random")})
    tiles = st.columns(min(len(saved), 4))
    for k, run in enumerate(saved[:4]):
        tiles[k].image(trust_page.region_tile(cache, run.source_ids, run.region, INSERTION_TILE),
                       width=INSERTION_TILE,
                       caption=f"{run.description} → {run.into_name}: the pasted region (red) on the selection's "
                               "mean image")
    st.caption(f"Run another: `{INSERTION_TESTS.command_line(cache.root, '--tag', 'shortcut')}` (see --help for "
               "--into, --q, --targets).")


# ------------------------------------------------------------------------------------------------ shortcut test
@st.cache_resource(show_spinner="Loading the cache's model ...", max_entries=2)
def cached_model(_cache: Cache, key: str):  # -> analysis.models.LoadedModel; errors are not cached
    from analysis.pipeline.models import model_from_manifest

    return model_from_manifest(_cache.manifest)


@st.cache_data(show_spinner="Blurring the region and running the model ...", max_entries=16)
def cached_test(_cache: Cache, key: str, ids: tuple[int, ...], q: float):
    from analysis.trust.region_removal import shortcut_test_on_cache

    return shortcut_test_on_cache(_cache, list(ids), q=q, loaded=cached_model(_cache, key))


def shortcut_section(cache: Cache) -> None:
    from analysis.pipeline.models import ModelSpecError

    st.header("Does the model use the region its maps point to?")
    st.markdown("The causal shortcut test: the top q% of the selection's mean map is blurred away on each of its "
                "images and the model runs again; as a control, a region of the same shape at a random place is "
                "blurred instead. A large drop for the region and a small one for the control means the model "
                "really depends on what the region holds (Lapuschkin et al. 2019).")
    table = cache.table
    names = class_names(cache)
    by = common.query_value("st_by", "label", choices=list(SELECT_BY))
    classes = sorted(int(c) for c in table[by].unique())
    with st.form("shortcut"):
        a, b, c, d = st.columns([1, 2, 2, 1])
        by = a.radio("Select images by", list(SELECT_BY), format_func=SELECT_BY.get,
                     index=list(SELECT_BY).index(by))
        all_classes = sorted(set(table["label"].tolist()) | set(table["pred"].tolist()))
        chosen = b.selectbox("Class", all_classes, format_func=lambda k: names[k],
                             index=all_classes.index(common.query_value("st_class", classes[0], int, all_classes)))
        q = c.slider("Region: top q% of the mean map", 1.0, 50.0, step=1.0,
                     value=common.query_value("st_q", 5.0, float, low=1.0, high=50.0))
        limit = d.number_input("At most images", 1, MAX_IMAGES,
                               value=common.query_value("st_max", DEFAULT_MAX_IMAGES, int, low=1, high=MAX_IMAGES))
        submitted = st.form_submit_button("Run the test", icon=":material/science:")
    common.set_query(st_run=None)  # (links made before the test needed a click carry it: it means nothing now)
    if submitted:
        common.set_query(st_by=by, st_class=chosen, st_q=f"{q:g}", st_max=int(limit))
        st.session_state["st_request"] = (str(cache.root), by, int(chosen), float(q), int(limit))
    request = st.session_state.get("st_request")
    if request is None or request[0] != str(cache.root):
        st.caption("Choose a selection and press **Run the test** (it loads the model named in the cache's "
                   "manifest and runs it on the CPU: 3 forward passes per image, 5 with masks).")
        return
    _, by, chosen, q, limit = request
    ids = trust_page.shortcut_selection(table, by, chosen, limit)
    if len(ids) == 0:
        st.warning(f"No image has {SELECT_BY[by]} {names[chosen]}.")
        return
    try:
        report = cached_test(cache, common.cache_key(cache), tuple(int(i) for i in ids), float(q))
    except ModelSpecError as error:
        st.warning(f"The shortcut test needs the model, which cannot be loaded here: {error}")
        return
    except (ValueError, CacheError) as error:
        st.warning(f"The shortcut test cannot run on this selection: {error}")
        return
    show_shortcut_test(cache, report, by, names[chosen])


def show_shortcut_test(cache: Cache, report: CacheShortcutReport, by: str, name: str) -> None:
    """The shortcut test's result: the region, accuracies and changed predictions, the verdict, per class."""
    summary = report.result.summary
    st.subheader(f"{int(summary['n'])} images with {SELECT_BY[by]} {name}, region: top {summary['q']:g}% "
                 f"({summary['region_share']:.1%} of the image)")
    left, right = st.columns([1, 2])
    left.image(trust_page.region_tile(cache, report.ids, report.result.region, REGION_TILE), width=REGION_TILE,
               caption="the tested region (red) on the selection's mean image")
    with right:
        m = st.columns(3)
        m[0].metric("Accuracy before", f"{summary['accuracy_before']:.1%}")
        m[1].metric("… region blurred", f"{summary['accuracy_prototype']:.1%}",
                    delta=f"{summary['accuracy_prototype'] - summary['accuracy_before']:+.1%}")
        m[2].metric("… random region blurred", f"{summary['accuracy_random']:.1%}",
                    delta=f"{summary['accuracy_random'] - summary['accuracy_before']:+.1%}")
        m = st.columns(3)
        m[0].metric("Mean probability before", f"{summary['probability_before']:.3f}")
        m[1].metric("Predictions changed, region", f"{summary['changed_prototype']:.1%}")
        m[2].metric("Predictions changed, random", f"{summary['changed_random']:.1%}")
        st.markdown(f"**{trust_page.shortcut_verdict(summary)}**")
        if report.skipped:
            st.caption(f"{len(report.skipped)} image(s) could not be loaded and were left out.")
        if report.stored_pred_mismatches:
            st.caption(f"{report.stored_pred_mismatches} image(s) are now predicted differently than in the cache.")
    if report.per_class is not None and len(report.per_class):
        st.markdown("**Object only / background only** (Xiao et al. 2021): accuracy with the background blurred "
                    "away, and with the object blurred away.")
        st.dataframe(report.per_class, hide_index=True, width="stretch")
    per_image = report.result.per_image
    common.csv_download("Download the per-image results (CSV)", per_image,
                        f"shortcut_test_{by}_{name}_q{summary['q']:g}.csv", key="st_csv")


def main() -> None:
    cache = common.get_cache()
    st.title("Trust")
    shown = faithfulness_section(cache)
    sanity_section(cache, shown)
    st.divider()
    insertion_section(cache)
    st.divider()
    shortcut_section(cache)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
