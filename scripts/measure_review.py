"""The README's numbers for issue 14's tools on a demo output (`python -m data.demo` or `--small`):

    python scripts/measure_review.py --demo demo_out            # about a minute on 2 cores

1. Find more like these: 10 images tagged from the suspicious cluster (the on-mark clusters among the three
   most suspicious, members that carry the mark), the probe ranks the rest; average precision of the tagged
   images of other classes than bag among the non-bags, over 10 draws of the 10.
2. Insertion test: the same clusters' region (top q%) pasted into 200 images of other classes.
3. Label errors: for several class pairs, 100 of 2,000 other test images filed in the wrong class's folder
   (data/label_noise.py), the demo's model run on them by the job; average precision of the moved images in
   `label_issues` (stored probabilities, and the top-5 fallback of older caches).
Uses shortcut.csv (where the mark is), which the dashboard never reads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAIRS = (("trouser", "dress"), ("sneaker", "sandal"), ("ankle_boot", "sneaker"), ("sandal", "bag"),
         ("dress", "coat"), ("pullover", "coat"), ("shirt", "tshirt_top"), ("coat", "shirt"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a demo output folder (holds cache/, model.pt)")
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    from sklearn.metrics import average_precision_score

    from analysis.__main__ import main as analysis_main
    from analysis.cache import load
    from analysis.trust.region_insertion import insertion_test_on_cache
    from analysis.review.probe import rank_by_probe
    from analysis.review import label_issues
    from data import demo, demo_measure, shortcut
    from data.demo_model import WEIGHTS_ENV
    from data.label_noise import write_moved_split

    paths = demo.DemoPaths(args.demo.resolve())
    os.environ[WEIGHTS_ENV] = str(paths.model)
    cache, table = demo_measure.marked_table(paths)
    summary, _ = demo_measure.cluster_shortcut(cache, table)
    on_mark = summary.head(3)[summary.head(3)["corner_share"] >= 0.3]
    members = np.concatenate(on_mark["members"].tolist())
    marked = table["marked"].to_numpy(bool)
    seen = members[np.isin(members, table["id"].to_numpy()[marked])]
    print(f"{len(table)} images; suspicious clusters (ranks {on_mark['rank'].tolist()}): {len(members)} images, "
          f"{len(seen)} carry the mark")

    ids = table["id"].to_numpy(np.int64)
    not_bag = (table["label_name"] != shortcut.SHORTCUT_CLASS).to_numpy()
    for kind in ("positive", "absolute"):
        descriptors = cache.descriptors(kind=kind)
        precisions, aucs = [], []
        for draw in range(args.draws):
            tagged = np.random.default_rng(draw).choice(seen, 10, replace=False)
            ranking, quality = rank_by_probe(ids, descriptors, tagged)
            rows = np.searchsorted(ids, ranking["id"].to_numpy())
            keep = not_bag[rows]
            precisions.append(average_precision_score(marked[rows][keep], ranking["score"].to_numpy()[keep]))
            aucs.append(quality.cv_roc_auc)
        chance = marked[not_bag].sum() / not_bag.sum()
        print(f"find more like these ({kind} descriptors): average precision {np.mean(precisions):.3f} "
              f"(min {np.min(precisions):.3f}, max {np.max(precisions):.3f}, chance {chance:.3f}); probe's "
              f"cross-validated ROC AUC {np.mean(aucs):.3f}")

    for q in (2.0, 5.0, 10.0):
        s = insertion_test_on_cache(cache, members, n_targets=200, q=q).result.summary
        print(f"insertion test q={q:g}%: {s['flipped_prototype']:.1%} of {int(s['n'])} predictions flip to bag with "
              f"the region, {s['flipped_random']:.1%} with a random region")

    work = Path(tempfile.mkdtemp(prefix="measure_review_"))
    try:
        for source, target in PAIRS:
            root = work / f"{source}-{target}"
            moved = write_moved_split(root / "images", source, target, count=100)
            code = analysis_main(["explain", "--data", str(root / "images"), *demo.model_arguments(paths),
                                  "--out", str(root / "cache"), "--map-size", "28", "--descriptor-size", "14",
                                  "--batch-size", "100", "--device", "cpu", "--workers", "0", "--quiet"])
            if code != 0:
                return code
            moved_cache = load(root / "cache")
            result = {}
            for source_name in ("stored", "top-5"):
                if source_name == "top-5":
                    for path in (root / "cache").glob("compact-*/probabilities.npy"):
                        path.unlink()
                    moved_cache = load(root / "cache")
                frame = label_issues(moved_cache)
                truth = moved_cache.table.set_index("id").loc[frame["id"], "path"].isin(moved).to_numpy()
                result[source_name] = average_precision_score(truth, -frame["label_quality"].to_numpy())
            accuracy = (moved_cache.table["pred_name"] == moved_cache.table["label_name"]).mean()
            print(f"label errors, 100 {source} filed as {target}: average precision {result['stored']:.3f} "
                  f"(top-5 fallback {result['top-5']:.3f}; accuracy against the filed labels {accuracy:.1%})")
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
