"""Trust: how faithful are the maps (deletion / insertion, FG-CAM against the plain CAM, LRP and a random map,
from `python -m analysis compare-methods --cache DIR`), and does the model really use the region a selection's
maps point to (the causal shortcut test, run here on demand)?

View state in the URL: st_by, st_class, st_q, st_max (a copied link fills in the same form). The test runs only
when the form's button is clicked (it loads the model and runs it on up to 5,000 images): never on opening a page,
whatever the URL says; its results stay on the page for the session and are cached per cache and settings.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from analysis.explore import charts, statistics as explore, overlay
from analysis.trust import compare
from analysis.cache import Cache, CacheError
from analysis.explore.report import mean_model_view
from dashboard import common

SELECT_BY = {"label": "true class", "pred": "predicted class"}
DEFAULT_MAX_IMAGES = 200     # images tested per run: 3 forward passes each (plus 2 with masks), on the CPU
MAX_IMAGES = 5000
REGION_TILE = 256
CURVE_WIDTH = 300


def cache_key(cache: Cache) -> tuple:
    return str(cache.root), len(cache), str(cache.manifest.get("updated"))


# ------------------------------------------------------------------------------------------------ faithfulness
def comparison_table(table: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The comparison's table for people: mean ± 95% CI half-width and std of both AUCs, best per layer."""
    sizes = meta.get("layer_sizes", {})
    out = pd.DataFrame({
        "layer": [f"{layer} ({sizes[layer][0]}×{sizes[layer][1]})" if layer in sizes else layer
                  for layer in table["layer"]],
        "method": table["label"],
        "images": table["n"].astype(int),
        "deletion AUC ↓": [f"{m:.3f} ± {c:.3f}" for m, c in zip(table["deletion_auc_mean"], table["deletion_auc_ci95"])],
        "deletion std": table["deletion_auc_std"].round(3),
        "insertion AUC ↑": [f"{m:.3f} ± {c:.3f}" for m, c in zip(table["insertion_auc_mean"],
                                                                 table["insertion_auc_ci95"])],
        "insertion std": table["insertion_auc_std"].round(3),
    })
    best_deletion = table.groupby("layer")["deletion_auc_mean"].transform("min") == table["deletion_auc_mean"]
    best_insertion = table.groupby("layer")["insertion_auc_mean"].transform("max") == table["insertion_auc_mean"]
    out["best at its layer"] = np.select([best_deletion & best_insertion, best_deletion, best_insertion],
                                         ["deletion and insertion", "deletion", "insertion"], "")
    if "constant_maps" in table.columns and (table["constant_maps"] > 0).any():
        out["constant maps"] = table["constant_maps"].map("{:.0%}".format)
    return out


def curve_chart(curves: pd.DataFrame, layer: str, curve: str) -> alt.Chart:
    data = curves[(curves["layer"] == layer) & (curves["curve"] == curve)]
    better = "lower" if curve == "deletion" else "higher"
    what = "most relevant pixels blurred" if curve == "deletion" else "most relevant pixels restored"
    return alt.Chart(data, width=CURVE_WIDTH, height=220,
                     title=f"{curve.capitalize()} at {layer} ({better} curve is better)").mark_line().encode(
        x=alt.X("fraction:Q", title=f"fraction of {what}", axis=alt.Axis(format="%")),
        y=alt.Y("probability:Q", title="mean probability of the class", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("label:N", title="method", sort=data.drop_duplicates("label")["label"].tolist(),
                        legend=alt.Legend(orient="bottom", columns=2, labelLimit=0)),
        strokeDash=alt.condition(alt.datum.method == "random", alt.value([4, 3]), alt.value([1, 0])),
        tooltip=["label:N", alt.Tooltip("fraction:Q", format=".0%"), alt.Tooltip("probability:Q", format=".3f")],
    )


def faithfulness_section(cache: Cache) -> None:
    st.header("Are the maps faithful?")
    directory = cache.root / compare.TRUST_DIR_NAME
    try:
        table, curves, meta = compare.trust_page_data(directory)
        stale = compare.made_for_another_cache(meta, cache.manifest)
    except compare.ComparisonError as error:
        if (directory / compare.META_FILE).exists():
            st.warning(f"The method comparison cannot be read: {error}. Make it again with:")
        else:
            st.info(f"No method comparison for this cache yet (nothing in `{directory}`). Make one with:")
        stale = ""
    if stale is not None:
        if stale:
            st.warning(f"The method comparison in `{directory}` does not belong to this cache: {stale}. It is not "
                       "shown; make it again with:")
        st.code(f"python -m analysis compare-methods --cache {cache.root}", language="bash")
        st.caption("It scores FG-CAM, FG-CAM denoised, the plain CAM, LRP and a random map on a sample of the "
                   "cache's images (--sample, default 100) and writes them to CACHE/trust/; reload this page "
                   "when it has finished.")
    else:
        st.markdown(
            f"Deletion blurs an image's most relevant pixels first: a faithful map makes the class probability "
            f"fall fast (**lower area under the curve is better**). Insertion restores them into a blurred image: "
            f"it should rise fast (**higher is better**). {meta.get('n_images', '?')} images, "
            f"{meta.get('steps', '?')} steps, FG-CAM on {compare.BASE_LABELS.get(meta.get('base'), meta.get('base'))} "
            f"(CAM layer `{meta.get('cam_layer', '?')}`); ± is the 95% confidence interval of the mean.")
        st.dataframe(comparison_table(table, meta), hide_index=True, width="stretch")
        for layer in meta.get("layers") or table["layer"].unique().tolist():
            left, right = st.columns(2)
            with left:
                common.altair_chart(curve_chart(curves, layer, "deletion"), width="content")
            with right:
                common.altair_chart(curve_chart(curves, layer, "insertion"), width="content")
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


# ------------------------------------------------------------------------------------------------ shortcut test
@st.cache_resource(show_spinner="Loading the cache's model ...", max_entries=2)
def cached_model(_cache: Cache, key: tuple):  # -> analysis.models.LoadedModel; errors are not cached
    from analysis.trust.region_test import model_from_manifest

    return model_from_manifest(_cache.manifest)


@st.cache_data(show_spinner="Blurring the region and running the model ...", max_entries=16)
def cached_test(_cache: Cache, key: tuple, ids: tuple[int, ...], q: float):
    from analysis.trust.region_test import shortcut_test_on_cache

    return shortcut_test_on_cache(_cache, list(ids), q=q, loaded=cached_model(_cache, key))


def region_tile(cache: Cache, ids: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The selection's mean image with the tested region tinted red and outlined."""
    tile = mean_model_view(cache, ids[explore.sample_rows(len(ids), 64)], REGION_TILE)
    if tile is None:
        tile = overlay.placeholder(REGION_TILE, "no image")
    mask = np.asarray(Image.fromarray(region.astype(np.uint8) * 255).resize((REGION_TILE, REGION_TILE),
                                                                             Image.NEAREST)) > 127
    tinted = tile.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array([178, 24, 43], np.float32)
    return overlay.with_outline(np.round(tinted).astype(np.uint8), region)


def shortcut_section(cache: Cache) -> None:
    from analysis.pipeline.models import ModelSpecError

    st.header("Does the model use the region its maps point to?")
    st.markdown("The causal shortcut test: the top q% of the selection's mean map is blurred away on each of its "
                "images and the model runs again; as a control, a region of the same shape at a random place is "
                "blurred instead. A large drop for the region and a small one for the control means the model "
                "really depends on what the region holds (Lapuschkin et al. 2019).")
    table = cache.table
    names = list(cache.manifest.get("class_names") or [])
    by = common.query_value("st_by", "label", choices=list(SELECT_BY))
    classes = sorted(int(c) for c in table[by].unique())
    with st.form("shortcut"):
        a, b, c, d = st.columns([1, 2, 2, 1])
        by = a.radio("Select images by", list(SELECT_BY), format_func=SELECT_BY.get,
                     index=list(SELECT_BY).index(by))
        all_classes = sorted(set(table["label"].tolist()) | set(table["pred"].tolist()))
        chosen = b.selectbox("Class", all_classes, format_func=lambda k: names[k] if k < len(names) else str(k),
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
    column = table[by].to_numpy()
    ids = table["id"].to_numpy()[column == chosen]
    if len(ids) == 0:
        st.warning(f"No image has {SELECT_BY[by]} {names[chosen] if chosen < len(names) else chosen}.")
        return
    ids = ids[explore.sample_rows(len(ids), int(limit), seed=0)]
    try:
        report = cached_test(cache, cache_key(cache), tuple(int(i) for i in ids), float(q))
    except ModelSpecError as error:
        st.warning(f"The shortcut test needs the model, which cannot be loaded here: {error}")
        return
    except (ValueError, CacheError) as error:
        st.warning(f"The shortcut test cannot run on this selection: {error}")
        return
    summary = report.result.summary
    name = names[chosen] if chosen < len(names) else str(chosen)
    st.subheader(f"{int(summary['n'])} images with {SELECT_BY[by]} {name}, region: top {summary['q']:g}% "
                 f"({summary['region_share']:.1%} of the image)")
    left, right = st.columns([1, 2])
    left.image(region_tile(cache, report.ids, report.result.region), width=REGION_TILE,
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
        gap = summary["changed_prototype"] - summary["changed_random"]
        verdict = ("The region matters much more than a random one of the same size: evidence that the model "
                   "uses what it holds." if gap >= 0.2 else
                   "Blurring the region changes about as much as blurring a random one: no evidence that the "
                   "model depends on this region in particular." if abs(gap) < 0.05 else
                   "The region matters somewhat more than a random one.")
        st.markdown(f"**{verdict}**")
        if report.skipped:
            st.caption(f"{len(report.skipped)} image(s) could not be loaded and were left out.")
        if report.stored_pred_mismatches:
            st.caption(f"{report.stored_pred_mismatches} image(s) are now predicted differently than in the cache.")
    if report.per_class is not None and len(report.per_class):
        st.markdown("**Object only / background only** (Xiao et al. 2021): accuracy with the background blurred "
                    "away, and with the object blurred away.")
        st.dataframe(report.per_class, hide_index=True, width="stretch")
    per_image = report.result.per_image
    st.download_button("Download the per-image results (CSV)", per_image.to_csv(index=False).encode(),
                       file_name=f"shortcut_test_{by}_{name}_q{summary['q']:g}.csv", mime="text/csv",
                       icon=":material/download:", key="st_csv")


def main() -> None:
    cache = common.get_cache()
    st.title("Trust")
    faithfulness_section(cache)
    st.divider()
    shortcut_section(cache)


main()
