"""Clusters (the SpRAy idea): group images whose explanations look alike, rank the groups by suspicion so a
shortcut ("Clever Hans") strategy shows first, and browse them through an interactive 2-D embedding.

All settings live in the URL; results are cached in the session and saved in CACHE/dashboard/ by
analysis.report.cluster_cache, so reopening a view is instant.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis.explore import charts, clustering, statistics as explore, overlay, report
from analysis.explore.clustering import ClusteringResult, ClusteringSettings
from dashboard import common

PROTOTYPE_TILE = 120
PROTOTYPES_PER_ROW = 6
MAX_K = 30


@st.cache_data(show_spinner="Clustering the explanations ...", max_entries=16)
def _clustering(_cache, state: str, settings: ClusteringSettings) -> ClusteringResult:
    return report.cluster_cache(_cache, settings)


@st.cache_data(show_spinner="Summarising the clusters ...", max_entries=16)
def _summary(_cache, state: str, settings: ClusteringSettings) -> tuple[pd.DataFrame, np.ndarray]:
    return report.summarize(_cache, _clustering(_cache, state, settings))


def _select(label: str, options: list, key: str, default, format_func=str, **kwargs):
    """A selectbox whose value starts from the URL (?key=...) and is written back to it."""
    value = common.query_value(key, default, type(options[0]), options)
    chosen = st.selectbox(label, options, index=options.index(value), key=key, format_func=format_func, **kwargs)
    common.set_query(**{key: chosen if chosen != default else None})
    return chosen


def _selection_ids(event, frame: pd.DataFrame) -> tuple[np.ndarray, str | None]:
    """Ids chosen in the scatter (box drag or click / shift-click) and a URL encoding of that choice."""
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    box = selection.get(charts.CLUSTER_BOX) or {}
    if box.get("x") and box.get("y"):
        (x0, x1), (y0, y1) = sorted(box["x"]), sorted(box["y"])
        return _in_box(frame, x0, x1, y0, y1), f"box:{x0:.5g},{x1:.5g},{y0:.5g},{y1:.5g}"
    picked = [int(p["id"]) for p in selection.get(charts.CLUSTER_PICK) or [] if "id" in p]
    if picked:
        return np.asarray(picked, np.int64), "ids:" + ",".join(map(str, picked[:200]))
    return np.zeros(0, np.int64), None


def _in_box(frame: pd.DataFrame, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    inside = frame["x"].between(x0, x1) & frame["y"].between(y0, y1)
    return frame.loc[inside, "id"].to_numpy(np.int64)


def _selection_from_url(value: str | None, frame: pd.DataFrame) -> np.ndarray:
    """The scatter selection a copied link carries (?c_sel=box:x0,x1,y0,y1 or ids:1,2,3); only known ids."""
    if not value:
        return np.zeros(0, np.int64)
    kind, _, numbers = value.partition(":")
    try:
        parts = [float(v) for v in numbers.split(",") if v.strip()]
    except ValueError:
        return np.zeros(0, np.int64)
    if not all(np.isfinite(parts)):  # nan, inf: no point is there (and int() of them raises)
        return np.zeros(0, np.int64)
    if kind == "box" and len(parts) == 4:
        return _in_box(frame, *parts)
    if kind == "ids":
        return frame.loc[frame["id"].isin([int(p) for p in parts if p == int(p)]), "id"].to_numpy(np.int64)
    return np.zeros(0, np.int64)


cache = common.get_cache()
table = cache.table
state = f"{cache.root}|{report.cache_state(cache)}"  # st.cache_data key: which cache, in which state
names = report.class_names(cache)

st.title("Clusters")
st.caption("Images whose explanations look alike are grouped; groups are ranked by suspicion (relevance off the "
           "object or on the border, errors, a map unlike the class's usual one), so a shortcut shows first.")

# ------------------------------------------------------------------------------------------------ settings
with st.container(border=True):
    row = st.columns(4)
    with row[0]:
        scope = _select("Scope", list(clustering.SCOPES), "c_scope", "all", clustering.SCOPE_LABELS.get)
        class_index = None
        if scope == "class":
            classes = sorted(int(c) for c in table["label"].unique())
            class_index = _select("Class", classes, "c_class", classes[0], lambda c: names[c])
    with row[1]:
        descriptor = _select("Descriptor", list(clustering.DESCRIPTOR_KINDS), "c_desc", "positive",
                             {"positive": "positive relevance", "absolute": "absolute relevance"}.get,
                             help="Unit-mass downsampled maps: where the positive (or any) relevance is.")
        embedding = _select("2-D embedding", list(clustering.EMBEDDINGS), "c_emb", "tsne",
                            clustering.EMBEDDING_LABELS.get)
    with row[2]:
        algorithm = _select("Algorithm", list(clustering.ALGORITHMS), "c_algo", "kmeans",
                            clustering.ALGORITHM_LABELS.get)
    with row[3]:
        k = int(st.number_input("Number of clusters (0: eigengap suggestion)", 0, MAX_K,
                                common.query_value("c_k", 0, int, range(MAX_K + 1)), key="c_k",
                                disabled=algorithm == "hdbscan"))
        common.set_query(c_k=k or None)
        neighbours = int(st.number_input("Neighbours in the kNN graph", 2, 50,
                                         common.query_value("c_nn", 10, int, range(2, 51)), key="c_nn"))
        common.set_query(c_nn=neighbours if neighbours != 10 else None)

settings = ClusteringSettings(scope=scope, class_index=class_index, descriptor=descriptor, algorithm=algorithm,
                              n_clusters=0 if algorithm == "hdbscan" else k, n_neighbors=neighbours,
                              embedding=embedding)
scope_size = len(clustering.scope_ids(table, scope, class_index))
if scope_size < 3:
    st.info(f"The scope holds {scope_size} image(s): too few to cluster. Choose another scope.")
    st.stop()

result = _clustering(cache, state, settings)
if result.note:
    st.info(result.note)
if len(result.ids) < 3:
    st.info(f"{len(result.ids)} image(s) left to cluster: too few. Choose another scope.")
    st.stop()
summary, prototypes = _summary(cache, state, settings)
frame = result.frame().merge(table[["id", "label_name", "pred_name", "correct"]], on="id", how="left")

sampled = f" (a sample of {len(result.ids):,} of {result.scope_size:,})" if len(result.ids) < result.scope_size \
    else ""
metrics = st.columns(4)
metrics[0].metric("Images clustered", f"{len(result.ids):,}")
metrics[1].metric("Clusters", f"{result.n_clusters}")
metrics[2].metric("Eigengap suggests k", f"{result.suggested_k}")
metrics[3].metric("Most suspicious", f"{report.cluster_label(int(summary['cluster'].iloc[0]))}",
                  f"suspicion {summary['suspicion'].iloc[0]:.2f}", delta_color="off")
if sampled:
    st.caption(f"Clustering{sampled}: a seeded uniform sample keeps the page responsive.")

# ------------------------------------------------------------------------------------------------ embedding
left, right = st.columns([3, 2])
with left:
    if result.identical:  # every point at one place: no chart to select from
        event = None
        st.markdown(f"**{clustering.EMBEDDING_LABELS[embedding]}**: none, every map of the scope is alike.")
    else:
        st.markdown(f"**{clustering.EMBEDDING_LABELS[embedding]}** of the explanations: drag a box or click "
                    "points (shift-click adds) to show them below; double-click clears.")
        event = st.altair_chart(charts.cluster_scatter(frame), on_select="rerun", key="c_scatter",
                                width="stretch")
        common.chart_png_download("Embedding (PNG)", charts.cluster_scatter(frame, selectable=False),
                                  "cluster_embedding.png", "c_scatter_png")
with right:
    if len(result.eigenvalues):
        st.altair_chart(charts.eigenvalue_chart(result.eigenvalues, result.suggested_k), height=240,
                        key="c_eigen")
        st.caption("Smallest eigenvalues of the kNN graph's normalised Laplacian: k well-separated groups give k "
                   "values near 0, then a jump (the eigengap).")

# The chart's selection lives in the browser; mirror it in the URL so a copied link shows the same images.
# Only a *change* of the chart's selection is written, so opening a link does not wipe the selection it carries.
chart_ids, chart_encoding = _selection_ids(event, frame)
if st.session_state.get("c_last_selection", "unset") != chart_encoding:
    if "c_last_selection" in st.session_state or chart_encoding is not None:
        common.set_query(c_sel=chart_encoding)
    st.session_state["c_last_selection"] = chart_encoding
selected = chart_ids if chart_encoding else _selection_from_url(common.query_value("c_sel", None), frame)

# ------------------------------------------------------------------------------------------------ clusters
st.subheader("Clusters, most suspicious first")
captions = []
for position, record in summary.iterrows():
    captions.append(f"#{record['rank']} {report.cluster_label(int(record['cluster']))}: {record['size']} img, "
                    f"acc {record['accuracy']:.0%}")
tiles = [report.prototype_tile(p, PROTOTYPE_TILE) for p in prototypes]
for start in range(0, len(summary), PROTOTYPES_PER_ROW):
    for column, position in zip(st.columns(PROTOTYPES_PER_ROW), range(start, min(start + PROTOTYPES_PER_ROW,
                                                                                    len(summary)))):
        record = summary.iloc[position]
        with column:
            st.image(tiles[position], caption=f"prototype {report.cluster_label(int(record['cluster']))}",
                     width=PROTOTYPE_TILE)
            background = "–" if pd.isna(record["background_share"]) else f"{record['background_share']:.2f}"
            border = "–" if pd.isna(record["border_share"]) else f"{record['border_share']:.2f}"
            st.markdown(f"**#{record['rank']} {report.cluster_label(int(record['cluster']))}** · "
                        f"suspicion **{record['suspicion']:.2f}**  \n{record['size']} images, accuracy "
                        f"{record['accuracy']:.0%}  \nbackground {background}, border {border}  \n"
                        f"{record['class_mix']}")

table_view = summary.assign(cluster=summary["cluster"].map(report.cluster_label))
st.dataframe(table_view[["rank", "cluster", "size", "accuracy", "majority_name", "class_mix", "background_share",
                         "border_share", "unlike_class", "suspicion"]],
             hide_index=True, width="stretch",
             column_config={"accuracy": st.column_config.ProgressColumn("accuracy", format="percent",
                                                                        min_value=0, max_value=1),
                            "suspicion": st.column_config.NumberColumn("suspicion", format="%.2f")})
grid = overlay.image_grid(tiles, captions, columns=PROTOTYPES_PER_ROW, caption_height=16)
common.png_download("Prototypes (PNG)", overlay.png_bytes(grid), "cluster_prototypes.png", "c_proto_png")

# ------------------------------------------------------------------------------------------------ gallery
st.subheader("Images")
cluster_order = summary["cluster"].astype(int).tolist()
if len(selected):
    st.markdown(f"**{len(selected):,} images selected in the chart.**")
    shown = selected
    csv_name = "selected_images.csv"
else:
    focus = _select("Cluster", cluster_order, "c_focus", cluster_order[0],
                    lambda c: f"{report.cluster_label(c)} (rank {cluster_order.index(c) + 1})",
                    help="Or select points in the chart.")
    shown = report.members_by_suspicion(cache, result, focus)
    csv_name = f"cluster_{report.cluster_label(focus)}.csv"
rows = table.set_index("id").loc[shown].reset_index()
rows.insert(1, "cluster", frame.set_index("id").loc[shown, "cluster"].to_numpy())
st.download_button("Download these images (CSV)", explore.table_csv(rows), file_name=csv_name,
                   mime="text/csv", key="c_csv", icon=":material/download:")
by_id = rows.set_index("id")
common.gallery(cache, shown, key="c_gallery",
               captions=lambda i: f"#{i} {by_id.at[i, 'label_name']}→{by_id.at[i, 'pred_name']}")
