"""The causal check of the top clusters (cluster --verify-top): the region test on each cluster's prototype
(Lapuschkin et al., "Unmasking Clever Hans predictors", Nature Communications 2019), the insertion test for a
region on the object (Pahde et al., Reveal to Revise, MICCAI 2023), the background swap where the evidence is
spread and the objects' masks or boxes are known (Xiao et al., ICLR 2021: `analysis.trust.background_swap`),
and the verdict rule documented at `verdict`.

Ours: the region grows with the prototype's spread (`region_for`), the p-values of a run are adjusted together
(Benjamini-Hochberg), and a verdict that would reassure ("not used", "uses the object") is given only where the
test could have shown the opposite -- otherwise "undecided", naming the test that would decide (issue 21:
measured on artefacts the first rule was never shown, bench/clever_hans.py)."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.explore.clustering import Progress
from analysis.explore.cluster_offline.settings import TOP_TO_VERIFY
from analysis.cache.files import now_iso
from analysis.explore.cluster_offline.store import StoredScope


@dataclass(frozen=True)
class VerifyOptions:
    """The causal tests of the top clusters and the verdict rule's thresholds (see `verdict`)."""

    top: int = TOP_TO_VERIFY          # clusters of each clustering, by suspicion rank
    q: float = 5.0                    # the smallest region: the prototype's top q%
    q_max: float = 5.0                # the largest: the region may grow from q until it holds `region_mass`; measured
                                      # with q_max 25 (bench/clever_hans.py) it made false shortcuts on a background
                                      # change and a random-place patch, so by default it stays the top q%
    region_mass: float = 0.5          # ... of the prototype's positive relevance, or reaches q_max
    images: int = 500                 # members tested per cluster (a seeded sample of larger clusters)
    seed: int = 0
    alpha: float = 0.01               # false discovery rate (Benjamini-Hochberg) over the clusters tested in the run
    min_difference: float = 0.10      # flip rate of the region minus that of the control, at least
    off_object: float = 0.5           # share of the region off the object (or in the border) to call it "off"
    concentrated: float = 0.20        # "not used" only when the region held at least this share of the relevance
                                      # (4 times an even spread over a 5% region)
    removable: float = 0.15           # ... and the blur changed its pixels by at least this share of the contrast
    insertion_targets: int = 200      # images of other classes the region is pasted into (on-object regions)
    min_insertion: float = 0.25       # pasted, the region makes this many more of them the class than the control
                                      # (a piece of trousers made 12% of other images trousers in the benchmark)
    object_insertion: float = 0.10    # "uses the object" only when it makes fewer than this many more (between the
                                      # two: undecided -- a stamp on the object made 15-19% in the benchmark)
    insertion_speaks: float = 0.5     # ... and most members are predicted as the class pasted toward (it speaks for
                                      # them alone: Lite0's watermark mistakes, 15-24% of one class, were cleared)
    off_object_insertion: float = 0.05   # off the object, a significant carry (p < alpha) of at least this much is
                                      # a shortcut: what lies off the object carries none of the object's shape.
                                      # Measured (bench/clever_hans.py): a corner patch on half of the target
                                      # class made 6.5-7% (p 1e-4); no clean cluster's off-object region above 2.5%
                                      # (p >= 0.06)
    background_difference: float = 0.25  # the background swap: the typical background changes this many more
                                      # predictions than other members' backgrounds. Higher than the blur's 10
                                      # points: the control gives a carrier a clean member's background too, so in a
                                      # cluster that mixes images with and without the artefact the difference
                                      # shrinks with its share of carriers. Measured (bench/clever_hans.py and the
                                      # small rows): random-place `all` clusters with 38-45% carriers made 12-18
                                      # points; clusters of 93-100% carriers 10-99 points
    batch_size: int = 64

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


VERDICTS = {
    "shortcut": "blurring the region changes far more predictions than a random region, and pasted into images of "
                "other classes it makes them this class -- or, where the evidence is spread, the dataset's "
                "typical background changes far more predictions than the cluster's own: the model depends on "
                "something that is not the object",
    "uses the object": "blurring the region changes far more predictions than a random region; the region is on "
                       "the object and pasting it elsewhere does not carry the class most members are predicted "
                       "as: the model working",
    "off the object, not used": "the region lies off the object, but blurring it changes predictions no more "
                                "than a random region, although it held the cluster's evidence",
    "not used": "blurring the region changes predictions no more than a random region, although it held the "
                "cluster's evidence",
    "undecided": "the tests could not have shown the use: the evidence is spread (the region holds little of it) "
                 "and no background swap showed a dependence, blurring does not change what lies there, or too "
                 "few images; the reason names the test that would decide",
}


@dataclass(frozen=True)
class Evidence:
    """What a cluster's tests measured (the verdict's inputs; NaN where a test did not run)."""

    changed_region: float             # share of the predictions that blurring the region changed
    changed_control: float            # ... that blurring a random region of the same shape changed
    p_value: float                    # exact one-sided McNemar (region vs control), adjusted for the run (BH)
    off_object_share: float           # share of the region off the object
    region_mass: float                # share of the prototype's positive relevance inside the region
    removal: float                    # mean absolute change the blur made in the region / the images' contrast
    q: float = 5.0                           # the region's share of the image, in percent (grown when spread)
    inserted_region: float = float("nan")    # share of other classes' images made this class by pasting it
    inserted_control: float = float("nan")   # ... by pasting a random region of the same shape
    p_insertion: float = float("nan")
    inserted_share: float = float("nan")     # share of the members predicted as the class it was pasted toward
    changed_background: float = float("nan")          # share of predictions the typical background changed
    changed_background_control: float = float("nan")  # ... another member's background (the control)
    p_background: float = float("nan")                # exact McNemar of the two swaps, adjusted for the run (BH)
    background_removal: float = float("nan")          # how much the swap changed the background / the contrast


def mcnemar_greater(changed_region: np.ndarray, changed_control: np.ndarray) -> float:
    """One-sided exact McNemar test (the two blurs are paired per image): p-value of "the region changes more
    predictions than the control" = P(Binomial(b + c, 1/2) >= b), b (c) = images changed by the region only (by
    the control only). 1 when no image is discordant."""
    from scipy.stats import binomtest

    region, control = np.asarray(changed_region, bool), np.asarray(changed_control, bool)
    b, c = int((region & ~control).sum()), int((~region & control).sum())
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Adjusted p-values (Benjamini & Hochberg 1995): a cluster is a discovery at false discovery rate `alpha`
    when its adjusted p-value is below `alpha`. NaN stays NaN and does not count."""
    p = np.asarray(p_values, np.float64)
    out, finite = np.full(p.shape, np.nan), np.isfinite(p)
    values = p[finite]
    if values.size:
        order = np.argsort(values)
        scaled = values[order] * values.size / np.arange(1, values.size + 1)
        adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        result = np.empty_like(values)
        result[order] = adjusted
        out[finite] = result
    return out


def verdict(evidence: Evidence, alpha: float, options: VerifyOptions = VerifyOptions()) -> tuple[str, str]:
    """(verdict, the sentence it rests on). Our rule, after Lapuschkin et al. 2019's region test and Reveal to
    Revise's insertion test, made safe for artefacts it was not built for:

    * the region is *necessary* when blurring it flips far more predictions than a random region (false
      discovery rate `alpha`, and at least `min_difference`); *sufficient* in the measure that, pasted into
      other classes' images, it makes them this class more often than a random region does;
    * "shortcut": necessary, and sufficient beyond what the object's own parts carry -- significantly and by
      `off_object_insertion` for a region off the object, `min_insertion` on it (where an object part is
      expected to carry some);
    * "uses the object": necessary, on the object, and pasted elsewhere it carries (almost) nothing -- toward the
      class most members are predicted as (`insertion_speaks`: a test toward one class cannot clear the others);
    * where the evidence is spread and the objects' masks are known: "shortcut" when the dataset's typical
      background changes significantly more predictions (by `background_difference`) than other members' do;
    * "not used": not necessary -- the blur changed predictions by less than `min_difference` more than the
      control, not merely without significance -- although the region held the cluster's evidence and the blur
      changed it;
    * "undecided" wherever the tests could not tell: a large effect on too few images to be significant,
      evidence spread beyond the region (and no background swap, or one that showed nothing), a region the blur
      does not change, a region off the object that carries nothing elsewhere (the object's outline?), or an insertion
      effect between an object part's and a mark's. Its reason names the test that would decide."""
    e, o = evidence, options
    necessary = bool(e.p_value < alpha and e.changed_region - e.changed_control >= o.min_difference)
    off = bool(np.isfinite(e.off_object_share) and e.off_object_share >= o.off_object)
    place = f"{e.off_object_share:.0%} of it off the object" if np.isfinite(e.off_object_share) else "place unknown"
    effect = (f"blurring the region changed {e.changed_region:.0%} of the predictions, a random region "
              f"{e.changed_control:.0%}")
    if necessary:
        return _necessary_verdict(e, o, off, f"{effect} ({place})")
    if e.changed_region - e.changed_control >= o.min_difference:
        # A large effect that is not significant: too few images to tell (4 images all changed: p = 1/16).
        return "undecided", (f"{effect}, but that is not significant (p = {e.p_value:.2g}, too few images); "
                             "more images like these, or a model trained without them (`report --compare`), "
                             "would decide")
    if e.region_mass < o.concentrated:
        spread = f"{effect}, but the region holds only {e.region_mass:.0%} of the cluster's evidence (it is spread)"
        return _background_verdict(e, o, spread) or ("undecided", (
            f"{spread}, so blurring it could not show its use; with the objects' masks or boxes the background swap "
            "would test what lies around them; a model trained without these images (`report --compare`) would "
            "decide"))
    if e.removal < o.removable:
        return "undecided", (f"{effect}, but the blur hardly changes what lies there (flat or already smooth: "
                             f"{e.removal:.0%} of the contrast); pasting it elsewhere (`insertion-test`) would decide")
    return ("off the object, not used" if off else "not used"), (
        f"{effect}, although the region held {e.region_mass:.0%} of the cluster's evidence")


def _necessary_verdict(e: Evidence, o: VerifyOptions, off: bool, effect: str) -> tuple[str, str]:
    """The verdict of a region whose blur changes the predictions: what pasting it elsewhere shows."""
    if not np.isfinite(e.inserted_region):
        return "undecided", (f"{effect}; the insertion test could not run (no image of another class to paste "
                             "into): `python -m analysis insertion-test` on other images would decide")
    gain = e.inserted_region - e.inserted_control
    pasted = (f"pasted into other classes' images it makes {e.inserted_region:.0%} of them this class (a random "
              f"region {e.inserted_control:.0%})")
    # A region grown to hold a spread prototype's evidence and lying on the object is a large part of the object:
    # that it carries the class when pasted is expected, so there it never makes a shortcut.
    bar = o.off_object_insertion if off else (o.min_insertion if e.q <= o.q else float("inf"))
    carries = bool(e.p_insertion < o.alpha and gain >= bar)
    if carries:
        return "shortcut", f"{effect}; {pasted}: it carries the class without the object"
    if off:
        return "undecided", (f"{effect}; {pasted}: off the object yet carrying little elsewhere (the object's "
                             "outline?); the members' tiles or a model trained without them decide")
    if gain < o.object_insertion and e.inserted_share >= o.insertion_speaks:
        return "uses the object", f"{effect}; {pasted}: the object's own shape"
    if gain < o.object_insertion:
        share = f"only {e.inserted_share:.0%}" if np.isfinite(e.inserted_share) else "an unknown share"
        return "undecided", (f"{effect}; {pasted}, but {share} of the members are predicted as this class: "
                             "pasting it cannot show what it does for the others; a model trained without these "
                             "images (`report --compare`) would decide")
    return "undecided", (f"{effect}; {pasted}: more than the object's own parts usually carry, less than a mark "
                         "does; a model trained without these images (`report --compare`) or the tiles decide")


def _background_verdict(e: Evidence, o: VerifyOptions, spread: str) -> tuple[str, str] | None:
    """The verdict of a spread cluster whose backgrounds were swapped (None when the swap did not run)."""
    if not np.isfinite(e.changed_background):
        return None
    swapped = (f"replacing what lies around the object by the dataset's typical background changed "
               f"{e.changed_background:.0%} of the predictions, by other members' backgrounds "
               f"{e.changed_background_control:.0%}")
    if e.p_background < o.alpha and e.changed_background - e.changed_background_control >= o.background_difference:
        return "shortcut", f"{spread}; {swapped}: the model depends on what lies around the object"
    alike = (f" (the swap changed the background by only {e.background_removal:.0%} of the contrast: the "
             "backgrounds are alike)" if np.isfinite(e.background_removal) and e.background_removal < o.removable
             else "")
    return "undecided", (f"{spread}; {swapped}{alike}: no dependence on the background shown, the evidence may lie "
                         "on the object; a model trained without these images (`report --compare`) would decide")


def region_for(prototype: np.ndarray, options: VerifyOptions) -> tuple[float, float]:
    """(q, mass): the smallest top share q of the prototype's cells, from `options.q` up to `options.q_max`,
    whose positive relevance reaches `options.region_mass` of the whole; and the share it holds. A compact
    artefact keeps the smallest region; relevance spread over text or a texture grows it."""
    values = np.sort(np.clip(np.asarray(prototype, np.float64).ravel(), 0, None))[::-1]
    total = values.sum()
    if total <= 0:
        return float(options.q), float("nan")
    cumulative = np.cumsum(values) / total
    cells = int(np.searchsorted(cumulative, options.region_mass) + 1)
    # a q above q_max (`cluster --verify-q 25`) is the region asked for: np.clip would give q_max instead
    q = float(np.clip(100.0 * cells / values.size, options.q, max(options.q, options.q_max)))
    kept = max(1, int(np.ceil(q / 100.0 * values.size - 1e-9)))
    return q, float(cumulative[min(kept, values.size) - 1])


def region_off_object(region: np.ndarray, foreground: np.ndarray | None,
                      weights: np.ndarray | None = None) -> tuple[float, str]:
    """(share of the region off the object, how it was judged): the mean over images whose foreground is
    known of the share outside their foreground dilated by one map pixel (as background_hotspot); without any
    foreground, the share in the border strip (as border_share). With `weights` ([H, W], the prototype at the
    input size), each pixel counts by its relevance: a 5% region is larger than a small mark, and the pixels
    it takes in around the mark (often on the object) hold little of the relevance."""
    import torch

    from analysis.pipeline.scores import dilate, frame_mask
    from analysis.trust.region_removal import foreground_to_input

    region_t = torch.as_tensor(np.asarray(region, bool))
    weight = region_t.float() if weights is None else \
        region_t.float() * torch.as_tensor(np.clip(np.asarray(weights, np.float32), 0, None))
    if float(weight.sum()) <= 0:
        weight = region_t.float()
    total = float(weight.sum())
    if foreground is not None:
        known = foreground.reshape(len(foreground), -1).any(axis=1)
        if known.any():
            grown = foreground_to_input(dilate(foreground[known], 1), *region_t.shape)
            outside = (weight[None] * ~grown).flatten(1).sum(1) / max(total, 1e-12)
            return float(outside.mean()), "off the object's mask or box"
    frame = frame_mask(*region_t.shape)
    return float((weight * frame).sum()) / max(total, 1e-12), "in the border strip (no mask or box)"


def removal_strength(images: Any, region: np.ndarray) -> float:
    """Mean absolute change the test's blur makes on the region's pixels, over the images' mean absolute
    deviation from their own mean (their contrast): near 0 where the region is flat or already smooth, so that
    blurring it cannot remove what lies there."""
    import torch

    from analysis.pipeline.faithfulness import DEFAULT_BLUR_SIGMA, gaussian_blur
    from analysis.trust.region_removal import relative_change

    mask = torch.as_tensor(np.asarray(region, bool))
    if not mask.any():
        return float("nan")
    return relative_change(images, gaussian_blur(images, DEFAULT_BLUR_SIGMA), mask)


VERIFICATION_COLUMNS = ["clustering", "rank", "cluster", "size", "tested", "skipped", "q", "region_mass", "removal",
                        "changed_region", "changed_control", "p_raw", "p_value", "alpha", "off_object_share",
                        "location_rule", "inserted_region", "inserted_control", "p_insertion", "inserted_share",
                        "changed_background", "changed_background_control", "p_background_raw", "p_background",
                        "background_removal", "accuracy_before", "accuracy_region", "verdict", "reason"]


def _insertion(cache: Any, loaded: Any, decoded: Any, model: Any, images: Any, tested: np.ndarray, preds: np.ndarray,
               prototype: np.ndarray, q: float, options: VerifyOptions) -> dict[str, float]:
    """The insertion test of an on-object region: pasted from the members into images of other classes
    (label and prediction both another class than the members' usual prediction)."""
    from analysis.trust.region_insertion import default_targets, insertion_test
    from analysis.trust.region_removal import load_inputs

    into = int(np.bincount(preds).argmax())
    table = cache.columns(["id", "label", "pred"])
    targets = default_targets(table, into, tested, options.insertion_targets, options.seed)
    loaded_targets, positions, _ = load_inputs([cache.image_path(int(i)) for i in targets], loaded.transform,
                                               loaded.in_channels, decoded)
    if not positions or loaded_targets.shape[1:] != images.shape[1:]:
        return {}
    result = insertion_test(model, images, loaded_targets, into, prototype, q=q, seed=options.seed,
                            forward_batch=options.batch_size)
    frame = result.per_image
    return {"inserted_region": float(result.summary["flipped_prototype"]),
            "inserted_control": float(result.summary["flipped_random"]),
            "p_insertion": mcnemar_greater(frame["flipped_prototype"].to_numpy(), frame["flipped_random"].to_numpy()),
            "inserted_share": float((preds == into).mean())}


def _grown_foreground(masks: np.ndarray, height: int, width: int) -> Any:
    """Masks at map size, grown by one map pixel (as the off-object share is judged), at the input size."""
    from analysis.pipeline.scores import dilate
    from analysis.trust.region_removal import foreground_to_input

    return foreground_to_input(dilate(masks, 1), height, width)


def typical_background_of(cache: Any, loaded: Any, options: VerifyOptions, decoded: Any = None) -> Any:
    """The dataset's typical background at the model's input ([C, H, W]; `analysis.trust.background_swap`),
    from a seeded sample of `options.insertion_targets` images with a mask or box; None without any."""
    from analysis.trust.background_swap import typical_background
    from analysis.trust.region_removal import load_inputs

    ids = cache.columns(["id"])["id"].to_numpy(np.int64)
    sample = np.sort(np.random.default_rng(options.seed).choice(ids, min(len(ids), options.insertion_targets),
                                                                replace=False))
    foreground = cache.foreground(sample)
    if foreground is None:
        return None
    known = foreground.reshape(len(sample), -1).any(axis=1)
    sample, foreground = sample[known], foreground[known]
    images, positions, _ = load_inputs([cache.image_path(int(i)) for i in sample], loaded.transform,
                                       loaded.in_channels, decoded)
    if not positions:
        return None
    return typical_background(images, _grown_foreground(foreground[positions], *images.shape[-2:]))


def _background_swap(model: Any, images: Any, foreground: np.ndarray | None, typical: Any,
                     options: VerifyOptions) -> dict[str, float]:
    """The background swap of a spread cluster's members (`images`, their masks or boxes `foreground` at map
    size, None without any) whose objects are known: the typical background against other members'
    backgrounds."""
    import torch

    from analysis.trust.background_swap import background_swap_test

    known = np.zeros(len(images), bool) if foreground is None else foreground.reshape(len(images), -1).any(axis=1)
    if known.sum() < 2 or typical is None or typical.shape != images.shape[1:]:
        return {}
    members, member_fg = images[torch.from_numpy(known)], _grown_foreground(foreground[known], *images.shape[-2:])
    rng = np.random.default_rng(options.seed)
    same = torch.from_numpy((np.arange(len(members)) + int(rng.integers(1, len(members)))) % len(members))
    result = background_swap_test(model, members, member_fg, typical, members[same], member_fg[same],
                                  options.batch_size)
    return {"changed_background": float(result.changed_typical.mean()),
            "changed_background_control": float(result.changed_same.mean()),
            "p_background_raw": mcnemar_greater(result.changed_typical, result.changed_same),
            "background_removal": result.removal}


def _test_cluster(cache: Any, loaded: Any, decoded: Any, model: Any, sample: np.ndarray, prototype: np.ndarray,
                  labels_by_id: pd.Series, options: VerifyOptions, typical: Callable[[], Any]) -> dict[str, Any]:
    """The tests of one cluster on its sampled members: the record's measured fields (the verdict comes once
    the run's p-values are adjusted together, `with_verdicts`). `decoded`: the run's decoded images
    (`analysis.trust.region_removal.DecodedImages`); `typical()`: the run's typical background (made once, when
    a cluster first needs it)."""
    import torch

    from analysis.pipeline.faithfulness import upsample_maps
    from analysis.trust.region_removal import load_inputs, shortcut_test

    images, positions, errors = load_inputs([cache.image_path(int(i)) for i in sample], loaded.transform,
                                            loaded.in_channels, decoded)
    skipped = {"skipped": len(errors), "tested": 0, "verdict": "not tested"}
    if not positions:
        return {**skipped, "reason": f"no image could be loaded ({errors[0][1] if errors else 'none'})"}
    if not np.isfinite(prototype).all() or prototype.max() <= 0:
        return {**skipped, "reason": "the prototype has no positive relevance: no region to test"}
    tested = sample[positions]
    labels = torch.from_numpy(labels_by_id.loc[tested].to_numpy(np.int64).copy())
    q, mass = region_for(prototype, options)
    try:
        result = shortcut_test(model, images, labels, prototype, q=q, seed=options.seed,
                               forward_batch=options.batch_size)
    except ValueError as error:   # e.g. a prototype without positive relevance
        return {**skipped, "reason": str(error).splitlines()[0]}
    frame = result.per_image
    changed_region, changed_control = float(frame["changed_prototype"].mean()), float(frame["changed_random"].mean())
    p_raw = mcnemar_greater(frame["changed_prototype"].to_numpy(), frame["changed_random"].to_numpy())
    foreground = cache.foreground(tested)
    off_share, judged = region_off_object(result.region, foreground,
                                          upsample_maps(torch.as_tensor(prototype, dtype=torch.float32)[None],
                                                        *result.region.shape)[0].numpy())
    record = {"skipped": len(errors), "tested": int(len(tested)), "q": q, "region_mass": mass,
              "removal": removal_strength(images, result.region), "changed_region": changed_region,
              "changed_control": changed_control, "p_raw": p_raw, "off_object_share": off_share,
              "location_rule": judged, "accuracy_before": float(result.summary["accuracy_before"]),
              "accuracy_region": float(result.summary["accuracy_prototype"]), "reason": ""}
    preds = frame["pred_before"].to_numpy(np.int64)
    if p_raw < options.alpha and changed_region - changed_control >= options.min_difference:
        record.update(_insertion(cache, loaded, decoded, model, images, tested, preds, prototype, q, options))
    elif mass < options.concentrated:
        record.update(_background_swap(model, images, foreground, typical(), options))
    return record


def with_verdicts(frames: list[pd.DataFrame], options: VerifyOptions) -> list[pd.DataFrame]:
    """The run's records with their p-values adjusted together (Benjamini-Hochberg over every tested cluster
    of the run) and each verdict and its reason."""
    sizes = [len(frame) for frame in frames]
    joined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=VERIFICATION_COLUMNS)
    joined["p_value"] = benjamini_hochberg(joined["p_raw"].to_numpy(np.float64))
    joined["p_background"] = benjamini_hochberg(joined["p_background_raw"].to_numpy(np.float64))
    joined["alpha"] = float(options.alpha)
    for index, record in joined.iterrows():
        if record["verdict"] == "not tested":
            continue
        evidence = Evidence(**{f: float(record[f]) for f in Evidence.__dataclass_fields__})
        joined.loc[index, ["verdict", "reason"]] = verdict(evidence, options.alpha, options)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [joined.iloc[start:end].reset_index(drop=True) for start, end in zip(bounds[:-1], bounds[1:])]


def write_verification(cache: Any, stored: StoredScope, frame: pd.DataFrame, options: VerifyOptions) -> None:
    """verification.parquet next to the scope's result (atomic rename), with what it was made with."""
    from analysis.cache.files import file_replaced_atomically, save_parquet

    meta = {"options": options.as_dict(), "alpha": options.alpha, "created": now_iso(),
            "model_sha256": (cache.manifest.get("model") or {}).get("weights_sha256"),
            "cache_fingerprint": stored.meta.get("cache_fingerprint")}
    table_out = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(
        {b"fgcam_verification": json.dumps(meta).encode()})
    with file_replaced_atomically(stored.path / "verification.parquet") as tmp:
        save_parquet(tmp, table_out)


def test_clusters(cache: Any, stored: StoredScope, loaded: Any, options: VerifyOptions, device: Any = "cpu",
                  progress: Progress | None = None, decoded: Any = None) -> pd.DataFrame:
    """The tests of the top `options.top` clusters of every clustering of a stored scope: one row per tested
    cluster with what was measured (no verdict yet: `with_verdicts` adjusts the run's p-values together).
    `decoded`: images decoded by earlier scopes of the run (`analysis.trust.region_removal.DecodedImages`)."""
    from analysis.trust.region_removal import DecodedImages

    decoded = DecodedImages() if decoded is None else decoded
    summary_all = pq.read_table(stored.path / "summary.parquet").to_pandas()
    prototypes_all = np.load(stored.path / "prototypes.npy")
    side = int(round(np.sqrt(prototypes_all.shape[1])))
    names = [r["name"] for r in stored.meta.get("clusterings", [])]
    assignments = pq.read_table(stored.path / "assignments.parquet", columns=["id", *names]).to_pandas()
    labels_by_id = cache.columns(["id", "label"]).set_index("id")["label"]
    model = loaded.model.to(device)
    records = []
    typical = functools.cache(lambda: typical_background_of(cache, loaded, options, decoded))
    for name in names:
        rows = np.nonzero(summary_all["clustering"].to_numpy() == name)[0]
        for row_index, record in zip(rows, summary_all.iloc[rows].itertuples()):
            if record.rank > options.top or record.cluster < 0:
                continue
            members = assignments["id"].to_numpy(np.int64)[assignments[name].to_numpy() == record.cluster]
            rng = np.random.default_rng([options.seed, int(record.cluster)])
            sample = np.sort(rng.choice(members, options.images, replace=False)) if len(members) > options.images \
                else members
            if progress:
                progress(f"verifying {name} #{record.rank} ({len(sample)} images)")
            base = {"clustering": name, "rank": int(record.rank), "cluster": int(record.cluster),
                    "size": int(record.size), "verdict": "", "reason": ""}
            records.append({**base, **_test_cluster(cache, loaded, decoded, model, sample,
                                                    prototypes_all[row_index].reshape(side, side), labels_by_id,
                                                    options, typical)})
    frame = pd.DataFrame.from_records(records, columns=VERIFICATION_COLUMNS)
    numeric = [c for c in VERIFICATION_COLUMNS if c not in ("clustering", "location_rule", "verdict", "reason")]
    return frame.astype({c: np.float64 for c in numeric if c not in ("rank", "cluster", "size", "tested", "skipped")})


def verify_clusters(cache: Any, stored: StoredScope, loaded: Any, options: VerifyOptions, device: Any = "cpu",
                    progress: Progress | None = None) -> pd.DataFrame:
    """The causal test of one stored scope alone (its own family for the p-value adjustment): tested, judged
    and written next to the scope's result (see docs/contracts.md). A run over many scopes adjusts them
    together (`analysis.explore.cluster_offline.run`)."""
    frame = with_verdicts([test_clusters(cache, stored, loaded, options, device, progress)], options)[0]
    write_verification(cache, stored, frame, options)
    return frame


def stored_verification_options(stored: StoredScope) -> dict[str, Any] | None:
    """The options a stored verification was made with (None when there is none)."""
    try:
        metadata = pq.read_schema(stored.path / "verification.parquet").metadata or {}
        return json.loads(metadata[b"fgcam_verification"]).get("options")
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
