"""Which off-the-object score should the suspicion average: background_share (mass outside the object) or
background_hotspot (share of the strongest relevance outside it)? Measured on stored offline clusterings of
demo caches whose planted tag is known (shortcut.csv): the rank of the cluster of tagged images, and how unusual
the top cluster is against chance (analysis.explore.clustering.calibrate_suspicion) for a tagged and a clean model.

The clusters are the stored ones (the same for both scores); only the summaries and the calibration are
recomputed, once per score.

    .venv/bin/python bench/bench_suspicion.py --cache tagged=DIR/cache:DIR/shortcut.csv \
        --cache clean=DIR2/cache:DIR/shortcut.csv [--scopes all pred:bag] [--stored-format 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.explore import cluster_offline as offline  # noqa: E402
from analysis.explore.cluster_offline import aggregates as offline_aggregates, store as offline_store  # noqa: E402
from analysis.explore import clustering  # noqa: E402
from analysis.explore.clustering import suspicion  # noqa: E402
from analysis.cache import load  # noqa: E402
from data import demo, shortcut  # noqa: E402

SCORES = ("background_share", "background_hotspot")


def measure(name: str, cache_dir: Path, marks_csv: Path, scopes: list[str], partitions: int) -> list[dict]:
    cache = load(cache_dir)
    names = offline.class_names_of(cache)
    table = cache.columns(list(offline.SUMMARY_ROW_COLUMNS) + ["path", "label_name"])
    marks = pd.DataFrame(demo.read_shortcut_csv(marks_csv))[["path", "marked"]]
    marked_by_id = table.merge(marks, on="path", how="left").set_index("id")["marked"].fillna(False).astype(bool)
    target_by_id = marked_by_id & (table.set_index("id")["label_name"] != shortcut.SHORTCUT_CLASS)
    aggregates = offline.read_class_aggregates(cache)
    records = []
    for scope in scopes:
        stored = [s for s in offline.stored_scopes(cache.root, offline.cache_fingerprint(cache))
                  if s.fresh and s.scope == scope][:1]
        if not stored:
            print(f"{name}: no stored clustering of {scope}", file=sys.stderr)
            continue
        mask = offline.scope_mask(table, scope, names)
        rows = table[mask].reset_index(drop=True)
        ids = rows["id"].to_numpy(np.int64)
        descriptors = offline.read_descriptors(cache.root, ids, stored[0].settings.descriptor)
        consensus = aggregates.consensus[stored[0].settings.descriptor]
        marked, target = marked_by_id.loc[ids].to_numpy(), target_by_id.loc[ids].to_numpy()
        for record in stored[0].meta["clusterings"]:
            clustering_obj = offline.StoredClustering(stored[0], record, offline.choices_of(stored))
            frame = clustering_obj.assignments
            assert (frame["id"].to_numpy() == ids).all()
            labels = frame["cluster"].to_numpy(np.int64)
            # The cluster of the shortcut: the one holding the most tagged images of other classes.
            held = [(target[labels == c].sum(), c) for c in np.unique(labels)]
            tag_cluster = max(held)[1] if target.any() else None
            checked = clustering_obj.verification      # the causal test, run on the stored ranking's top clusters
            verdicts = "" if checked is None else " ".join(
                f"{c}:{'S' if v == 'shortcut' else v[:3]}" for c, v in zip(checked["cluster"], checked["verdict"]))
            for score in SCORES:
                suspicion.OFF_OBJECT_SCORE = score     # the alternative measured (the module's one setting)
                summary, _ = clustering.summarize_clusters(labels, rows, descriptors, consensus, names)
                calibration = clustering.calibrate_suspicion(labels, rows, descriptors, consensus, partitions)
                top = calibration.top()
                top_cluster = int(summary["cluster"].iloc[0])
                records.append({
                    "cache": name, "scope": scope, "clustering": record["name"], "off-object score": score,
                    "tag cluster rank": (int(summary.loc[summary["cluster"] == tag_cluster, "rank"].iloc[0])
                                         if tag_cluster is not None else None),
                    "tag cluster size": int((labels == tag_cluster).sum()) if tag_cluster is not None else 0,
                    "holds tagged non-bags": (float(target[labels == tag_cluster].sum() / max(target.sum(), 1))
                                              if tag_cluster is not None else 0.0),
                    "top: tagged share": float(marked[labels == top_cluster].mean()),
                    "top suspicion": top["suspicion"], "null max": top["null_max_mean"],
                    "margin": top["suspicion"] - top["null_max_mean"], "z": top["z"], "p": top["p"],
                    "top 3": " ".join(map(str, summary["cluster"].head(3))),
                    "stored verdicts": verdicts})
    suspicion.OFF_OBJECT_SCORE = SCORES[-1]
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", action="append", required=True, metavar="NAME=CACHE:SHORTCUT_CSV")
    parser.add_argument("--scopes", nargs="+", default=["all", "pred:bag"])
    parser.add_argument("--partitions", type=int, default=100)
    parser.add_argument("--stored-format", type=int, default=offline.FORMAT_VERSION,
                        help="read clusterings stored by this format version (1: before the suspicion used "
                             "background_hotspot; the clusters are the same, only the summaries are recomputed)")
    args = parser.parse_args(argv)
    # the modules that write and read the format compare against their own copy of the number
    offline_store.FORMAT_VERSION = offline_aggregates.FORMAT_VERSION = args.stored_format
    records = []
    for item in args.cache:
        name, _, paths = item.partition("=")
        cache_dir, _, marks = paths.partition(":")
        records += measure(name, Path(cache_dir), Path(marks), args.scopes, args.partitions)
    frame = pd.DataFrame.from_records(records)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
