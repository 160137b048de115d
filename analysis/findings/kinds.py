"""The kinds of finding, one function each (`KINDS`): each reads what the analysis stored or computes it from the
cache, and returns its findings with their sentences. Adding a kind is one function and one entry in `KINDS`.

Thresholds are ours and stated where they are used; a kind whose test was not run says "undecided" and names
the command that would decide.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis.cache.classes import class_names
from analysis.explore.statistics import confusion_matrix
from analysis.findings.model import Finding

# A class confused with another: at least this many images and this share of the true class (ours).
CONFUSION_MIN_IMAGES = 5
CONFUSION_MIN_SHARE = 0.05
CONFUSIONS_SHOWN = 3
# Background attention of a predicted class: its median off-object score at least this much above the median
# of the other classes' images, and at least this high (ours).
BACKGROUND_MIN_EXCESS = 0.15
BACKGROUND_MIN_MEDIAN = 0.3
# A shortcut cluster joins an earlier (stronger) finding when half of its images lie in that finding's group,
# or half of the group in it (the mistakes' cluster of a shortcut is usually a part of the all-images one).
SAME_CLUSTER_OVERLAP = 0.5
# A concept strong in few images of a class (analysis.explore.concepts' flagged channels) is a finding when at
# least this share of those images, and this many, are labelled another class (ours: a feature that mostly pulls
# other classes' images in, the victims a shortcut makes), at most CONCEPTS_SHOWN of them, most mistakes first.
CONCEPT_MIN_MISTAKES = 0.5
CONCEPT_MIN_WRONG = 5
CONCEPTS_SHOWN = 3
EXAMPLES = 8


def plural(count: int, one: str, many: str) -> str:
    return one if count == 1 else many


def _examples(ids: np.ndarray, seed: int = 0) -> list[int]:
    """Up to EXAMPLES ids, a seeded sample spread over the list."""
    ids = np.asarray(ids, np.int64)
    if len(ids) <= EXAMPLES:
        return [int(i) for i in ids]
    return sorted(int(i) for i in np.random.default_rng(seed).choice(ids, EXAMPLES, replace=False))


def region_words(region: np.ndarray) -> str:
    """Where a boolean region [S, S] lies, in words: a corner, an edge or the centre, by its bounding box's
    centre in thirds of the image."""
    rows, cols = np.nonzero(region)
    side = region.shape[0]
    y, x = (rows.min() + rows.max() + 1) / 2 / side, (cols.min() + cols.max() + 1) / 2 / side
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    if vertical and horizontal:
        return f"in the {vertical}-{horizontal} corner"
    if vertical or horizontal:
        return f"at the {vertical or horizontal} edge"
    return "in the centre"


def _shortcut_finding(cache: Any, clustering: Any, row: Any, q: float, names: list[str], table: pd.DataFrame
                      ) -> Finding:
    """One verified shortcut cluster; the region is the one the causal test blurred (the prototype's top q%)."""
    from analysis.review.shortcut_victims import region_shares
    from analysis.trust.region_removal import top_region

    members = clustering.members(int(row["cluster"]))
    labels, preds = table.loc[members, "label"].to_numpy(), table.loc[members, "pred"].to_numpy()
    target = int(np.bincount(preds).argmax())
    victims = members[(preds == target) & (labels != target)]
    victim_classes = len(np.unique(labels[(preds == target) & (labels != target)]))
    summary = clustering.summary
    position = int(np.nonzero(summary["cluster"].to_numpy() == int(row["cluster"]))[0][0])
    prototype = np.asarray(clustering.prototypes[position], np.float32)
    side = int(round(np.sqrt(prototype.size)))
    region = top_region(prototype.reshape(side, side), q, side, side).numpy()
    numbers = {"size": len(members), "scope": clustering.scope, "rank": int(row["rank"]),
               "n_called": int((preds == target).sum()), "pred_name": names[target], "n_victims": len(victims),
               "n_classes": victim_classes,
               "which": plural(len(victims), "which is", "which are"),
               "classes": plural(victim_classes, "class", "classes"),
               "evidence_share": float(region_shares(cache.descriptors(members, "positive"), prototype, q).mean()),
               "where": region_words(region), "clustering": clustering.name,
               "off_object": float(row["off_object_share"]), "location_rule": str(row["location_rule"]), "q": q,
               "changed_region": float(row["changed_region"]), "tested": int(row["tested"]),
               "changed_control": float(row["changed_control"]), "p_value": float(row["p_value"]),
               "inserted_region": float(row.get("inserted_region", np.nan)),
               "inserted_control": float(row.get("inserted_control", np.nan)),
               "changed_background": float(row.get("changed_background", np.nan)),
               "changed_background_control": float(row.get("changed_background_control", np.nan))}
    # The verdict rests on the region test, or -- where the evidence is spread -- on the background swap (which
    # runs only where the region test did not show the region necessary: one of the two decided).
    swapped = bool(np.isfinite(numbers["changed_background"]))
    tested = (["Their evidence is spread: only {evidence_share:.0%} of it lies in the top {q:g}% of their mean map "
               "({off_object:.0%} of that region lies {location_rule}).",
               "Replacing what lies around the object by the dataset's typical background changes "
               "{changed_background:.0%} of {tested} predictions, against {changed_background_control:.0%} with "
               "the backgrounds of other members of the cluster."]
              if swapped else
              ["{evidence_share:.0%} of their evidence lies in the top {q:g}% of their mean map, a region {where}; "
               "{off_object:.0%} of that region lies {location_rule}.",
               "Blurring that region changes {changed_region:.0%} of {tested} predictions, against "
               "{changed_control:.0%} for a random region of the same size; pasted into images of other "
               "classes it makes {inserted_region:.0%} of them \"{pred_name}\" (a random region "
               "{inserted_control:.0%})."])
    p_value = float(row.get("p_background", np.nan)) if swapped else numbers["p_value"]
    view = ("clusters", {"c_scope": clustering.scope, "c_clust": f"{clustering.settings.key()}/{clustering.name}",
                         "c_focus": str(int(row["cluster"]))})
    return Finding(
        kind="shortcut cluster", title=f"Shortcut: {len(members)} images the model calls \"{names[target]}\"",
        sentences=["{size} images of scope {scope} form the cluster ranked {rank}: the model calls {n_called} of "
                   "them \"{pred_name}\", {n_victims} of {which} labelled as {n_classes} other {classes}.", *tested],
        numbers=numbers, ids=[int(i) for i in members],
        strength=(numbers["changed_background"] - numbers["changed_background_control"] if swapped else
                  numbers["changed_region"] - numbers["changed_control"]),
        verdict="shortcut", page=view[0], query=view[1],
        rests_on=f"the causal tests of `cluster --verify-top`: {row.get('reason') or 'the region test'} (exact "
                 f"McNemar p = {p_value:.2g}, adjusted over the clusters tested)",
        links={k: view for k in ("n_called", "n_victims", "evidence_share", "changed_region", "changed_background")},
        examples=_examples(victims if len(victims) else members))


def _merge_same(findings: list[Finding]) -> list[Finding]:
    """One finding per group of images: a shortcut found in several scopes (all, mistakes, pred:<c>) or
    clusterings is kept once, the strongest effect, naming how often and where else it was found; a group's
    images are the union of its clusters'."""
    groups: list[tuple[Finding, set[int], list[str]]] = []
    for finding in sorted(findings, key=lambda f: -f.strength):
        ids = set(finding.ids)
        same = next((group for group in groups
                     if len(ids & group[1]) / max(1, min(len(ids), len(group[1]))) >= SAME_CLUSTER_OVERLAP), None)
        if same is None:
            groups.append((finding, ids, []))
        else:
            same[1].update(ids)
            same[2].append(finding.numbers["scope"])
    for finding, _, scopes in groups:
        if scopes:
            finding.rests_on += (f"; {len(scopes)} more verified {plural(len(scopes), 'cluster', 'clusters')} hold "
                                 f"the same images (scopes {', '.join(sorted(set(scopes)))})")
    return [finding for finding, _, _ in groups]


def shortcut_clusters(cache: Any) -> list[Finding]:
    """Clusters the causal test called "shortcut" (in every clustering computed on the cache as it is now, as
    the shortcut victims of the label-error ranking); when no cluster was tested at all, one "undecided" finding
    for the most suspicious cluster, naming the command that would decide."""
    from analysis.explore import cluster_offline
    from analysis.review.shortcut_victims import verified_shortcuts

    names, table = class_names(cache), cache.columns(["id", "label", "pred"]).set_index("id")
    found = [_shortcut_finding(cache, clustering, row, q, names, table)
             for clustering, row, q in verified_shortcuts(cache)]
    if found:
        return _merge_same(found)
    untested, undecided, tested = [], [], False
    for scope in cluster_offline.fresh_scopes(cache):
        try:
            clustering = cluster_offline.read_clustering(cache, scope)
        except cluster_offline.ClusteringNotFound:
            continue
        checked = clustering.verification
        if checked is None or checked.empty:
            untested.append(clustering)
        else:
            tested = True
            undecided += [(clustering, row) for _, row in checked[checked["verdict"] == "undecided"].iterrows()]
    if undecided:   # tested, none called a shortcut, and the tests could not tell for some: say so, not "fine"
        clustering, row = min(undecided, key=lambda pair: (int(pair[1]["rank"]), pair[0].scope != "mistakes"))
        return [_undecided_finding(clustering, row, len(undecided))]
    return [_untested_finding(cache, untested)] if untested and not tested else []


def _undecided_finding(clustering: Any, row: pd.Series, count: int) -> Finding:
    """The best-ranked cluster the causal tests could not decide (none was called a shortcut)."""
    members = clustering.members(int(row["cluster"]))
    numbers = {"size": len(members), "scope": clustering.scope, "rank": int(row["rank"]), "count": count,
               "clusters": plural(count, "cluster", "clusters"), "reason": str(row["reason"])}
    view = ("clusters", {"c_scope": clustering.scope, "c_focus": str(int(row["cluster"]))})
    return Finding(
        kind="shortcut cluster", title="Undecided: what the tests could not tell",
        sentences=["No cluster was called a shortcut, but the tests could not decide {count} {clusters}; the first, "
                   "ranked {rank} of scope {scope} ({size} images): {reason}."],
        numbers=numbers, ids=[int(i) for i in members], strength=0.0, verdict="undecided", page=view[0],
        query=view[1], links={"size": view, "count": view}, examples=_examples(members),
        rests_on="the verdict rule of `cluster --verify-top` (docs/clustering.md): a verdict that would reassure is "
                 "given only where the test could have shown the opposite")


def _untested_finding(cache: Any, untested: list[Any]) -> Finding:
    best = max(untested, key=lambda c: float(c.calibration.get("z", float("-inf")) or float("-inf")))
    top = best.summary.iloc[0]
    members = best.members(int(top["cluster"]))
    numbers = {"size": len(members), "scope": best.scope, "accuracy": float(top["accuracy"]),
               "z": float(best.calibration.get("z", float("nan")))}
    view = ("clusters", {"c_scope": best.scope, "c_focus": str(int(top["cluster"]))})
    return Finding(
        kind="shortcut cluster", title="Not tested: is the most suspicious cluster a shortcut?",
        sentences=["The most suspicious cluster ({size} images of scope {scope}, accuracy {accuracy:.0%}, "
                   "{z:.1f} standard deviations above random groups) was not tested causally, so whether the "
                   "model depends on what it looks at there is undecided."],
        numbers=numbers, ids=[int(i) for i in members], strength=0.0, verdict="undecided", page=view[0],
        query=view[1], links={"size": view}, examples=_examples(members),
        rests_on=f"no causal test was run: `python -m analysis cluster --cache {cache.root} --verify-top 3` "
                 "decides (it needs the model)")


def confused_classes(cache: Any) -> list[Finding]:
    """The largest off-diagonal cells of the confusion matrix (at least CONFUSION_MIN_IMAGES images and
    CONFUSION_MIN_SHARE of the true class)."""
    names = class_names(cache)
    table = cache.columns(["id", "label", "pred"])
    labels, preds = table["label"].to_numpy(np.int64), table["pred"].to_numpy(np.int64)
    n = len(names)
    matrix = confusion_matrix(labels, preds, n)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    totals = matrix.sum(1)
    found = []
    for cell in np.argsort(-off, axis=None, kind="stable")[:CONFUSIONS_SHOWN]:
        true, pred = divmod(int(cell), n)
        count = int(off[true, pred])
        if count < CONFUSION_MIN_IMAGES or count / totals[true] < CONFUSION_MIN_SHARE:
            break
        ids = table["id"].to_numpy(np.int64)[(labels == true) & (preds == pred)]
        view = ("mistakes", {"true": str(true), "pred": str(pred)})
        found.append(Finding(
            kind="confused classes", title=f"\"{names[true]}\" taken for \"{names[pred]}\"",
            sentences=["The model calls {count} of the {total} images labelled \"{true_name}\" \"{pred_name}\" "
                       "({share:.0%} of them)."],
            numbers={"count": count, "total": int(totals[true]), "true_name": names[true], "pred_name": names[pred],
                     "share": count / int(totals[true])},
            ids=[int(i) for i in ids], strength=count / int(totals[true]), verdict="observation", page=view[0],
            query=view[1], links={"count": view}, examples=_examples(ids),
            rests_on="the confusion matrix (a count, not a cause: the Clusters page and the causal test say why)"))
    return found


def background_classes(cache: Any) -> list[Finding]:
    """Predicted classes whose images put their strongest evidence off the object far more than the others'
    (background_hotspot with a foreground; border_share without)."""
    table = cache.table
    score = "background_hotspot" if "background_hotspot" in table and table["background_hotspot"].notna().any() \
        else "border_share"
    if score not in table or table[score].notna().sum() == 0:
        return []
    names = class_names(cache)
    values, preds = table[score].to_numpy(np.float64), table["pred"].to_numpy(np.int64)
    found = []
    for c in np.unique(preds):
        mine, rest = values[preds == c], values[preds != c]
        mine, rest = mine[np.isfinite(mine)], rest[np.isfinite(rest)]
        if len(mine) < 5 or len(rest) < 5:
            continue
        median, others = float(np.median(mine)), float(np.median(rest))
        if median - others < BACKGROUND_MIN_EXCESS or median < BACKGROUND_MIN_MEDIAN:
            continue
        ids = table["id"].to_numpy(np.int64)[preds == c]
        view = ("background", {"score": score})
        where = "off the object" if score == "background_hotspot" else "in the border strip"
        found.append(Finding(
            kind="background attention", title=f"\"{names[c]}\" decided off the object",
            sentences=["For the {n} images the model calls \"{name}\", a median {median:.0%} of the strongest "
                       f"evidence lies {where}, against {{others:.0%}} for the other classes' images."],
            numbers={"n": len(ids), "name": names[int(c)], "median": median, "others": others},
            ids=[int(i) for i in ids], strength=median - others, verdict="undecided", page=view[0], query=view[1],
            links={"median": view}, examples=_examples(ids[np.argsort(-values[preds == c])][:EXAMPLES * 4]),
            rests_on=f"the {score} score of every image; where the model looks is not yet why it decides: the causal "
                     f"test (`python -m analysis cluster --cache {cache.root} --verify-top 3`) decides"))
    return found


def tagged(cache: Any) -> list[Finding]:
    """The user's tags, one finding per tag in use."""
    import sqlite3

    from analysis.review import Review
    from analysis.review.tags import DB_NAME, ReviewError

    if not (cache.root / DB_NAME).is_file():   # never create a database only to read that it is empty
        return []
    try:
        tags = Review(cache.root, cache).tags()
    except (ReviewError, OSError, sqlite3.Error):   # unreadable or of a replaced cache: findings without tags
        return []
    found = []
    for tag, rows in tags.groupby("tag"):
        ids = np.unique(rows["id"].to_numpy(np.int64))
        view = ("review", {"fm_tag": str(tag)})
        found.append(Finding(
            kind="tag", title=f"Tagged \"{tag}\"", sentences=["{n} images are tagged \"{tag}\"."],
            numbers={"n": len(ids), "tag": str(tag)}, ids=[int(i) for i in ids], strength=float(len(ids)),
            verdict="your tag", page=view[0], query=view[1], links={"n": view}, examples=_examples(ids),
            rests_on="the tags made on the dashboard or with the review library"))
    return found


def labels_mismatched(cache: Any) -> list[Finding]:
    """Labels and model outputs that look permuted (analysis.pipeline.label_check): everything else the cache
    shows is read through the wrong class names until it is fixed."""
    from analysis.pipeline.label_check import label_mismatch

    table = cache.columns(["id", "label", "pred", "confidence"])
    found = label_mismatch(table["label"].to_numpy(), table["pred"].to_numpy(), class_names(cache),
                           table["confidence"].to_numpy())
    if found is None:
        return []
    mapped = np.isin(table["label"].to_numpy(), list(found.mapping))
    return [Finding(
        kind="labels and outputs", title="The labels and the model's outputs look permuted",
        sentences=["{n_mapped} classes' images are mostly predicted as one other output each: accuracy "
                   "{accuracy:.0%}, {remapped:.0%} if the outputs meant those classes.", found.message.replace("{", "{{")
                   .replace("}", "}}")],
        numbers={"n_mapped": len(found.mapping), "accuracy": found.accuracy, "remapped": found.remapped_accuracy},
        ids=[int(i) for i in table["id"].to_numpy()[mapped]], strength=found.remapped_accuracy - found.accuracy,
        verdict="labels and outputs mismatched", page="mistakes", query={}, examples=[],
        rests_on="the confusion matrix: a one-to-one mapping off its diagonal (or confidence far above accuracy)")]


def few_image_concepts(relevance: np.ndarray, table: pd.DataFrame, names: list[str], settings: Any,
                       cache_root: str) -> list[Finding]:
    """The method of `concepts_in_few_images` on arrays: `relevance` float [n, K] (each image's channel relevance
    for its predicted class), `table` (id, label, pred) in the same order; `cache_root` for the command named."""
    import shlex

    from analysis.explore.concepts import class_concepts, strong_channels

    ids, labels, preds = (table[c].to_numpy(np.int64) for c in ("id", "label", "pred"))
    rows = class_concepts(relevance, preds, settings, labels)
    rows = rows[(rows["kind"] == "shortcut") & (rows["mistake_share"] >= CONCEPT_MIN_MISTAKES)]
    rows = rows.assign(n_wrong=(rows["mistake_share"] * rows["n_strong"]).round().astype(int))
    rows = rows[rows["n_wrong"] >= CONCEPT_MIN_WRONG]
    found = []
    for _, row in rows.sort_values(["n_wrong", "class"], ascending=[False, True]).head(CONCEPTS_SHOWN).iterrows():
        c, k = int(row["class"]), int(row["channel"])
        of_class = np.nonzero(preds == c)[0]
        strong = of_class[strong_channels(relevance[of_class], settings.strong_rank)[:, k]]
        by_relevance = strong[np.argsort(-relevance[strong, k], kind="stable")]
        n_wrong = int((labels[strong] != c).sum())
        numbers = {"channel": k, "strong_rank": int(settings.strong_rank), "n_strong": len(strong),
                   "n_images": len(of_class), "name": names[c], "prevalence": len(strong) / len(of_class),
                   "n_wrong": n_wrong, "mistake_share": n_wrong / len(strong)}
        view = ("concepts", {"class": names[c]})
        command = (f"python -m analysis cluster --cache {shlex.quote(cache_root)} --descriptor concepts "
                   f"--scopes {shlex.quote('pred:' + names[c])} --verify-top 3")
        found.append(Finding(
            kind="concept in few images", title=f"Concept #{k}: strong in few \"{names[c]}\" images, mostly mistakes",
            sentences=["Concept #{channel} is among the {strong_rank} strongest channels of only {n_strong} of the "
                       "{n_images} images the model calls \"{name}\" ({prevalence:.0%}), and {n_wrong} of them "
                       "({mistake_share:.0%}) are labelled another class: a feature these few images share. Its "
                       "reference images show what it is."],
            numbers=numbers, ids=[int(i) for i in ids[strong]], strength=n_wrong / len(of_class),
            verdict="undecided", page=view[0], query=view[1],
            links={"channel": ("concepts", {"concept": str(k)}), "n_strong": view},
            examples=[int(i) for i in ids[by_relevance[:EXAMPLES]]],
            rests_on="the stored channel relevance: a count of the images this channel is strong in, not a cause; "
                     f"the causal test on the clusters of concepts (`{command}`) decides"))
    return found


def concepts_in_few_images(cache: Any) -> list[Finding]:
    """Channels strong in few images of a predicted class, most of those images labelled another class: the
    Concepts page's "strong in few images" (with the stored concepts' settings when they are fresh)."""
    from dataclasses import fields

    from analysis.explore.concepts import ConceptSettings, ConceptsError, read_concepts

    relevance = cache.channel_relevance(which="pred")
    if relevance is None:   # a cache made before channel relevance was stored
        return []
    try:
        stored = read_concepts(cache)
    except ConceptsError:
        stored = None
    settings = ConceptSettings()
    if stored is not None and not stored.stale:
        known = {f.name for f in fields(ConceptSettings)}
        settings = ConceptSettings(**{k: v for k, v in stored.meta["settings"].items() if k in known})
    names = class_names(cache)
    table = cache.columns(["id", "label", "pred"])
    return few_image_concepts(relevance, table, names, settings, str(cache.root))


KINDS: list[Callable[[Any], list[Finding]]] = [labels_mismatched, shortcut_clusters, confused_classes,
                                               background_classes, concepts_in_few_images, tagged]
