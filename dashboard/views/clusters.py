"""Clusters (the SpRAy idea, at dataset scale): images whose explanations look alike are grouped, the groups
ranked by suspicion so a shortcut ("Clever Hans") strategy shows first.

The page only reads what `python -m analysis cluster` stored for every image of every scope (all, mistakes,
true:<class>, pred:<class>; analysis.explore.cluster_offline): nothing is clustered here, so a million-image cache
opens as fast as a small one. The embedding is drawn as a density of every point plus a subsample of marks
(analysis.explore.cluster_display); a box dragged on it selects every image inside, drawn or not. Settings and the
box live in the URL (c_scope, c_clust, c_focus, c_sel, c_gallery_page, c_gallery_tag). The gallery's images
(a whole cluster or the box) can be tagged, and filtered by tag (dashboard/tagging.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import streamlit as st

from analysis.cache import Cache
from analysis.cache.derived import CLUSTERINGS, MissingResult, missing
from analysis.explore import cluster_display as display, cluster_offline
from analysis.explore.cluster_data import LIVE_MAX, LIVE_MIN, cluster_label, recluster_selection
from analysis.present import charts
from analysis.present.tiles import prototype_tile
from analysis.review import Review, tag_views
from dashboard import common, tagging

PROTOTYPE_TILE = 120
PROTOTYPES_PER_ROW = 6
CARDS = 12                   # clusters shown as cards (all of them are in the table below)
DRAWN_POINTS = 10_000        # marks sent to the browser; the density shows every point
VERDICT_ICONS = {"shortcut": ":red[**shortcut**]", "uses the object": ":green[uses the object]",
                 "off the object, not used": "off the object, not used", "not used": "not used",
                 "undecided": ":orange[**undecided**]", "not tested": "not tested"}


def missing_results(cache: Cache) -> MissingResult:
    """Why there is nothing to show, and the command that makes it."""
    stored_dir = cluster_offline.results_root(cache.root) / cluster_offline.CLUSTERING_DIR
    stale = stored_dir.is_dir() and any(stored_dir.glob(f"*/{cluster_offline.SCOPE_PREFIX}*"))
    return missing(CLUSTERINGS, cache.root, "stale" if stale else "missing",
                   "computed on an older state of this cache, or by an older version of the code",
                   note="The explain job runs it at its end.")


@st.cache_resource(show_spinner="Reading the clustering ...", max_entries=8)
def _stored(_found: cluster_offline.StoredScope, name: str, _choices: pd.DataFrame,
            stamp: tuple) -> cluster_offline.StoredClustering:
    """The stored clustering `name` of a stored scope, kept across reruns so that its tables are read once
    (`stamp` = its folder and creation time: a rerun of the cluster command makes a new one)."""
    record = next(r for r in _found.meta.get("clusterings", []) if r["name"] == name)
    return cluster_offline.StoredClustering(_found, record, _choices)


@st.cache_resource(show_spinner=False, max_entries=4)
def _image_columns(_cache: Cache, key: str) -> pd.DataFrame:
    """id, label_name, pred_name, correct, confidence of every image, indexed by id (no list columns: cheap at a
    million rows)."""
    return _cache.columns(["id", "label_name", "pred_name", "correct", "confidence"]).set_index("id")


def _number(value: float, digits: int = 2) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def members_table(cache: Cache, ids: Sequence[int], clusters: pd.Series, review: Review | None) -> pd.DataFrame:
    """The selected images' table rows with their cluster and tags (built only when the download is clicked)."""
    rows = cache.columns(["id", "path", "label_name", "pred_name", "confidence", "correct", "background_share",
                          "background_hotspot", "border_share"]).set_index("id").loc[ids].reset_index()
    rows.insert(1, "cluster", clusters.loc[ids].to_numpy())
    return rows.assign(tags="") if review is None else tag_views.with_tags(rows, review)


def choose_clustering(cache: Cache, scopes: list[str]) -> tuple[str, cluster_offline.StoredClustering]:
    """The scope and clustering menus (URL-bound); a new scope clears the previous one's cluster, layout and box."""
    row = st.columns([2, 3])
    with row[0]:
        scope = common.url_selectbox("Scope", scopes, "c_scope", scopes[0], display.scope_label,
                                     help="pred:<class>: what the model looked at when it said that class -- where "
                                          "a shortcut's images of other classes land.")
    if st.session_state.get("c_last_scope", scope) != scope:   # another scope: its own clusters, layout and box
        for key in ("c_clust", "c_focus", "c_gallery_page", "c_scatter", "c_last_selection"):
            st.session_state.pop(key, None)
        common.set_query(c_clust=None, c_focus=None, c_gallery_page=None, c_sel=None)
    st.session_state["c_last_scope"] = scope
    default = cluster_offline.read_clustering(cache, scope)   # newest run, its first algorithm, the eigengap's k
    choices = default.choices
    labels = display.choice_labels(choices)
    with row[1]:
        chosen = common.url_selectbox("Clustering", list(labels), "c_clust",
                                      display.choice_key(default.settings.key(), default.name), labels.get)
    run, name = chosen.split("/", 1)
    found = next(s for s in cluster_offline.stored_scopes(cache.root, cluster_offline.cache_fingerprint(cache))
                 if s.fresh and s.scope == scope and s.settings.key() == run)
    return scope, _stored(found, name, choices, (str(found.path), found.meta.get("created"), name))


def show_metrics(cache: Cache, stored: cluster_offline.StoredClustering,
                 verdicts: dict[int, tuple[str, str]]) -> None:
    """The headline numbers, and how unusual the top cluster is against random partitions."""
    summary, calibration, verification = stored.summary, stored.calibration, stored.verification
    top = summary.iloc[0]
    metrics = st.columns(4)
    metrics[0].metric("Images clustered", f"{stored.n:,}", help="Every image of the scope: no sample.")
    metrics[1].metric("Clusters", f"{len(summary)}", f"k from the {stored.k_from}", delta_color="off",
                      delta_arrow="off")
    metrics[2].metric("Eigengap suggests k", f"{stored.suggested_k}")
    metrics[3].metric("Most suspicious", f"{cluster_label(int(top['cluster']))}",
                      f"suspicion {_number(top['suspicion'])}", delta_color="off", delta_arrow="off")
    # The verdict in full, with what it rests on (a metric box cuts "off the object, not used" to "off the o...").
    verdict, reason = verdicts.get(int(top["cluster"]), ("not verified", ""))
    st.markdown(f"**Its verdict:** {VERDICT_ICONS.get(verdict, verdict)}" + (f" — {reason}" if reason else ""),
                help="The causal test (`cluster --verify-top N`, needs the model): blur the region its prototype "
                     "points to and a random region of the same size; for a region on the object, paste it into "
                     "other classes' images. 'undecided' where the test could not have shown the use (spread "
                     "evidence, a region the blur does not change).")
    if np.isfinite(calibration.get("null_max_mean", np.nan)):
        st.caption(f"How unusual the top cluster is: suspicion {_number(calibration['suspicion'])} against "
                   f"{_number(calibration['null_max_mean'])} ± {_number(calibration['null_max_sd'])} for the most "
                   f"suspicious group of {calibration['partitions']} random partitions of the scope into groups of "
                   f"the same sizes (z = {_number(calibration['z'], 1)}, p = {_number(calibration['p'], 3)}). "
                   "Comparable across scopes and caches; any clustering beats chance, so the verdict is the causal "
                   "test's" + ("." if verification is not None else
                               f" (not run here: `{common.analysis_command(cache, 'cluster', '--verify-top', '3')}`)."))


def show_embedding(stored: cluster_offline.StoredClustering, images: pd.DataFrame, focus: int) -> np.ndarray | None:
    """The 2-D layout (density + sampled marks) and the eigenvalues; returns the ids inside the box dragged on
    the layout or carried by the link (?c_sel=), None without a box."""
    points = stored.display_points(DRAWN_POINTS)
    points = points.join(images[["label_name", "pred_name", "correct"]], on="id")
    counts, x_edges, y_edges = stored.density()
    density = display.coarse_density(counts, x_edges, y_edges)
    left, right = st.columns([3, 2])
    with left:
        if len(density) <= 1 and stored.n >= 3:   # every point at one place: nothing to draw or select
            event = None
            st.markdown("**2-D layout**: none, every point lies at one place (the maps of the scope are alike).")
        else:
            drawn = f"{len(points):,} of {stored.n:,} points drawn" if len(points) < stored.n else \
                f"all {stored.n:,} points drawn"
            st.markdown(f"**2-D layout** ({stored.settings.embedding}) of the explanations: grey shows where every "
                        f"image lies, the marks are a sample ({drawn}; every small cluster whole). Drag a box to "
                        "show every image inside it below; double-click clears.")
            event = st.altair_chart(charts.density_scatter(density, points, highlight=focus), on_select="rerun",
                                    key="c_scatter", width="content")
    with right:
        if len(stored.eigenvalues) > 1:
            st.altair_chart(charts.eigenvalue_chart(stored.eigenvalues, stored.suggested_k), height=240,
                            key="c_eigen")
            st.caption("Smallest eigenvalues of the kNN graph's normalised Laplacian: k well-separated groups give "
                       "k values near 0, then a jump (the eigengap).")
    # The box lives in the browser; mirror it in the URL so a copied link shows the same images (only a new
    # selection is written, so opening a link does not wipe the box it carries).
    box = display.box_from_event(event)
    encoding = display.encode_box(*box) if box else None
    if common.new_selection(encoding, "c_last_selection"):
        common.set_query(c_sel=encoding)
    if box is None:
        box = display.decode_box(common.query_value("c_sel", None))
    return stored.ids_in_box(*box) if box else None


def show_clusters(stored: cluster_offline.StoredClustering, verdicts: dict[int, tuple[str, str]]) -> None:
    """The most suspicious clusters as cards (prototype, suspicion and its parts), then all of them as a table."""
    summary, verification = stored.summary, stored.verification
    st.subheader("Clusters, most suspicious first")
    parts = display.suspicion_parts(summary)
    tiles = [prototype_tile(p, PROTOTYPE_TILE) for p in stored.prototypes[:CARDS]]
    for start in range(0, min(CARDS, len(summary)), PROTOTYPES_PER_ROW):
        columns = st.columns(PROTOTYPES_PER_ROW)
        for column, position in zip(columns, range(start, min(start + PROTOTYPES_PER_ROW, CARDS, len(summary)))):
            record, part = summary.iloc[position], parts.iloc[position]
            cluster = int(record["cluster"])
            with column:
                st.image(tiles[position], caption=f"prototype {cluster_label(cluster)}", width=PROTOTYPE_TILE)
                verdict = verdicts.get(cluster, ("", ""))[0]
                st.markdown(
                    f"**#{record['rank']} {cluster_label(cluster)}** · suspicion "
                    f"**{_number(record['suspicion'])}**  \n{record['size']:,} images, accuracy "
                    f"{record['accuracy']:.0%}  \n"
                    + " · ".join(f"{label} {_number(part[key])}" for key, label in display.SUSPICION_PARTS.items())
                    + f"  \nz = {_number(record.get('suspicion_z', np.nan), 1)}"
                    + (f"  \nverdict: {VERDICT_ICONS.get(verdict, verdict)}" if verdict else "")
                    + f"  \n{record['class_mix']}"
                    + (f"  \nconcepts {record['concept_mix']}" if "concept_mix" in record else ""))
    table = summary.assign(cluster=summary["cluster"].map(cluster_label),
                           **{f"{key}": parts[key] for key in display.SUSPICION_PARTS if key != "border_share"})
    table["verdict"] = [verdicts.get(int(c), ("", ""))[0] for c in summary["cluster"]]
    table["why"] = [verdicts.get(int(c), ("", ""))[1] for c in summary["cluster"]]
    concepts = ["concept_mix"] if "concept_mix" in table else []   # a clustering on concepts
    st.dataframe(table[["rank", "cluster", "size", "accuracy", "class_mix", *concepts, "off_object", "border_share",
                        "error_rate", "unlike_class", "suspicion", "suspicion_z", "verdict", "why"]],
                 hide_index=True, width="stretch",
                 column_config={"accuracy": st.column_config.ProgressColumn("accuracy", format="percent",
                                                                            min_value=0, max_value=1),
                                **{c: st.column_config.NumberColumn(c.replace("_", " "), format="%.2f")
                                   for c in ("off_object", "border_share", "error_rate", "unlike_class",
                                             "suspicion")},
                                "suspicion_z": st.column_config.NumberColumn("z vs chance", format="%.1f"),
                                "concept_mix": st.column_config.TextColumn(
                                    "concepts", help="the channels with the largest mean share of the members' "
                                                     "evidence (see the Concepts page)")})
    if verification is not None:
        with st.expander("The causal test of the top clusters"):
            st.dataframe(verification, hide_index=True, width="stretch")


def show_images(cache: Cache, stored: cluster_offline.StoredClustering, images: pd.DataFrame,
                selected: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The images of the box, or of the cluster chosen in the menu (mistakes first): filter by tag, tag them
    all, download them, and the gallery."""
    summary = stored.summary
    cluster_order = summary["cluster"].astype(int).tolist()
    st.subheader("Images")
    if selected is not None:
        st.markdown(f"**{len(selected):,} images in the box** (every image of the scope inside it, drawn or not).")
        selection = selected
        source, csv_name = "the box selection", "box_selection.csv"
    else:
        focus = common.url_selectbox(
            "Cluster", cluster_order, "c_focus", cluster_order[0],
            lambda c: f"{cluster_label(c)} (rank {cluster_order.index(c) + 1}, "
                      f"{int(summary.loc[summary['cluster'] == c, 'size'].iloc[0]):,} images)",
            help="Or drag a box on the chart.")
        members = stored.members(focus)
        selection = members[np.argsort(images.loc[members, "correct"].to_numpy(), kind="stable")]   # mistakes first
        source, csv_name = f"cluster {cluster_label(focus)}", f"cluster_{cluster_label(focus)}.csv"
    shown = tagging.tag_filter(cache, selection, key="c_gallery", container=st.columns([2, 3])[0])
    if shown:
        tagging.tag_controls(cache, shown, key="c_tagging",
                             what=f"the {len(shown):,} image{'s' if len(shown) != 1 else ''} of {source}" +
                                  (" (every page)" if len(shown) == len(selection) else " that pass the filter"))
    by_cluster = stored.assignments.set_index("id")["cluster"]
    review = tagging.get_review(cache)   # for the tags column, read only when the download is clicked
    common.csv_download(f"Download {source} (CSV)",
                        lambda ids=selection: members_table(cache, ids, by_cluster, review), csv_name, key="c_csv")
    common.gallery(cache, shown, key="c_gallery", captions=tagging.captions_with_tags(
        cache, shown, lambda i: common.image_caption(i, images.at[i, 'label_name'], images.at[i, 'pred_name'])))
    return selection, source


@st.cache_data(show_spinner=False, max_entries=8)
def _reclustered(_cache: Cache, key: str, ids: tuple[int, ...], k: int, algorithm: str, descriptor: str):
    return recluster_selection(_cache, np.asarray(ids, np.int64), k, algorithm, descriptor=descriptor)


def show_recluster(cache: Cache, selection: np.ndarray, source: str, images: pd.DataFrame,
                   descriptor: str) -> None:
    """Live re-clustering of the images shown (a cluster or the box), on a click, on the offline clustering's
    descriptor: what splits inside them."""
    st.subheader("Re-cluster these images")
    if not LIVE_MIN <= len(selection) <= LIVE_MAX:
        st.caption(f"A selection of {LIVE_MIN:,} to {LIVE_MAX:,} images can be clustered again on its own here "
                   f"({len(selection):,} in {source}); drag a box around fewer images.")
        return
    left, middle, _ = st.columns([1, 1, 2])
    k = int(left.number_input("Clusters (0: the eigengap's choice)", 0, 20, 0, key="c_live_k"))
    algorithm = middle.selectbox("Algorithm", ["kmeans", "spectral"], key="c_live_algo")
    ids = tuple(int(i) for i in np.sort(selection))
    asked = st.session_state.get("c_live_asked") == (common.cache_key(cache), ids, k, algorithm, descriptor)
    if not asked and not st.button(f"Re-cluster the {len(ids):,} images of {source}", key="c_live_go",
                                   icon=":material/scatter_plot:"):
        return   # nothing expensive starts without a click
    st.session_state["c_live_asked"] = (common.cache_key(cache), ids, k, algorithm, descriptor)
    with st.spinner(f"Clustering {len(ids):,} images ..."):
        result, summary, prototypes = _reclustered(cache, common.cache_key(cache), ids, k, algorithm, descriptor)
    if result.note:
        st.info(result.note, icon=":material/info:")
    frame = result.frame().join(images[["label_name", "pred_name", "correct"]], on="id")
    chart, table = st.columns([3, 2])
    chart.altair_chart(charts.cluster_scatter(frame, selectable=False, width=420, height=340))
    concepts = ["concept_mix"] if "concept_mix" in summary else []
    table.dataframe(summary[["rank", "cluster", "size", "accuracy", "class_mix", *concepts, "suspicion"]].assign(
        cluster=summary["cluster"].map(cluster_label)), hide_index=True, width="stretch",
        column_config={"suspicion": st.column_config.NumberColumn("suspicion", format="%.2f"),
                       "accuracy": st.column_config.NumberColumn("accuracy", format="percent")})
    columns = st.columns(PROTOTYPES_PER_ROW)
    for column, (_, record), prototype in zip(columns, summary.head(PROTOTYPES_PER_ROW).iterrows(), prototypes):
        column.image(prototype_tile(prototype, PROTOTYPE_TILE), width=PROTOTYPE_TILE,
                     caption=f"#{record['rank']} {cluster_label(int(record['cluster']))}, {record['size']:,} images")


def main() -> None:
    cache = common.get_cache()
    st.title("Clusters")
    st.caption("Every image of the chosen scope, clustered offline by how its explanation looks; clusters ranked by "
               "suspicion (relevance off the object or on the border, errors, a map unlike its class's usual one), "
               "so a shortcut shows first.")
    scopes = cluster_offline.fresh_scopes(cache)
    if not scopes:
        common.show_missing(missing_results(cache))
        st.stop()
    scope, stored = choose_clustering(cache, scopes)
    for message in stored.messages:      # e.g. every map of the scope alike: one cluster
        st.info(f"{display.scope_label(scope)}: {message}.", icon=":material/info:")
    if not len(stored.summary):
        st.info(f"The scope {display.scope_label(scope)} holds no image.")
        st.stop()
    verification = stored.verification
    verdicts = {} if verification is None else {
        int(c): (v, r) for c, v, r in zip(verification["cluster"], verification["verdict"], verification["reason"])}
    if stored.settings.descriptor == "concepts":
        st.caption("This clustering groups images by **which channels** of the CAM layer hold their evidence (the "
                   "concepts descriptor), not by where the maps put it; each cluster is still drawn and scored by "
                   "its maps, and names its strongest channels (see the Concepts page).")
    show_metrics(cache, stored, verdicts)
    cluster_order = stored.summary["cluster"].astype(int).tolist()
    focus = common.query_value("c_focus", cluster_order[0], int, cluster_order)
    images = _image_columns(cache, common.cache_key(cache))
    selected = show_embedding(stored, images, focus)
    show_clusters(stored, verdicts)
    selection, source = show_images(cache, stored, images, selected)
    show_recluster(cache, selection, source, images, stored.settings.descriptor)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
