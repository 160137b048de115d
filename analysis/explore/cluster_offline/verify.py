"""The causal check of the top clusters (cluster --verify-top): the region test on each cluster's prototype
(Lapuschkin et al., "Unmasking Clever Hans predictors", Nature Communications 2019), the insertion test for a
region on the object (Pahde et al., Reveal to Revise, MICCAI 2023), the background swap where the evidence is
spread and the objects' masks or boxes are known (Xiao et al., ICLR 2021: `analysis.trust.background_swap`).
What they measured becomes a verdict by the rule in `analysis.explore.cluster_offline.verdicts`.

Ours: the region grows with the prototype's spread (`region_for`; by default it stays the top q%, see
`VerifyOptions.q_max`)."""
from __future__ import annotations

import functools
import json
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.explore.clustering import Progress
from analysis.cache.files import now_iso
from analysis.explore.cluster_offline.store import StoredScope
from analysis.explore.cluster_offline.verdicts import (VERIFICATION_COLUMNS, VerifyOptions, mcnemar_greater,
                                                       with_verdicts)


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


def _insertion(cache: Any, loaded: Any, inputs: Any, model: Any, images: Any, tested: np.ndarray,
               preds: np.ndarray, prototype: np.ndarray, q: float, options: VerifyOptions) -> dict[str, float]:
    """The insertion test of an on-object region: pasted from the members into images of other classes
    (label and prediction both another class than the members' usual prediction)."""
    from analysis.trust.region_insertion import default_targets, insertion_test

    into = int(np.bincount(preds).argmax())
    table = cache.columns(["id", "label", "pred"])
    targets = default_targets(table, into, tested, options.insertion_targets, options.seed)
    found = inputs.load(cache.image_paths(targets), loaded.transform, loaded.in_channels,
                        model, options.batch_size)
    if not found.positions or found.images.shape[1:] != images.shape[1:]:
        return {}
    result = insertion_test(model, images, found.images, into, prototype, q=q, seed=options.seed,
                            forward_batch=options.batch_size, before=found.outputs)
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


def typical_background_of(cache: Any, loaded: Any, options: VerifyOptions, inputs: Any) -> Any:
    """The dataset's typical background at the model's input ([C, H, W]; `analysis.trust.background_swap`),
    from a seeded sample of `options.insertion_targets` images with a mask or box; None without any.
    `inputs`: the run's `analysis.trust.region_removal.RunInputs`."""
    from analysis.trust.background_swap import typical_background

    ids = cache.columns(["id"])["id"].to_numpy(np.int64)
    sample = np.sort(np.random.default_rng(options.seed).choice(ids, min(len(ids), options.insertion_targets),
                                                                replace=False))
    foreground = cache.foreground(sample)
    if foreground is None:
        return None
    known = foreground.reshape(len(sample), -1).any(axis=1)
    sample, foreground = sample[known], foreground[known]
    found = inputs.load(cache.image_paths(sample), loaded.transform, loaded.in_channels)
    if not found.positions:
        return None
    return typical_background(found.images, _grown_foreground(foreground[found.positions], *found.images.shape[-2:]))


def _background_swap(model: Any, images: Any, before: Any, foreground: np.ndarray | None, typical: Any,
                     options: VerifyOptions) -> dict[str, float]:
    """The background swap of a spread cluster's members (`images`, the model's outputs on them `before`, their
    masks or boxes `foreground` at map size, None without any) whose objects are known: the typical background
    against other members' backgrounds."""
    import torch

    from analysis.trust.background_swap import background_swap_test

    known = np.zeros(len(images), bool) if foreground is None else foreground.reshape(len(images), -1).any(axis=1)
    if known.sum() < 2 or typical is None or typical.shape != images.shape[1:]:
        return {}
    known_rows = torch.from_numpy(known)
    members, member_fg = images[known_rows], _grown_foreground(foreground[known], *images.shape[-2:])
    rng = np.random.default_rng(options.seed)
    same = torch.from_numpy((np.arange(len(members)) + int(rng.integers(1, len(members)))) % len(members))
    result = background_swap_test(model, members, member_fg, typical, members[same], member_fg[same],
                                  options.batch_size, before=before[known_rows])
    return {"changed_background": float(result.changed_typical.mean()),
            "changed_background_control": float(result.changed_same.mean()),
            "p_background_raw": mcnemar_greater(result.changed_typical, result.changed_same),
            "background_removal": result.removal}


def _test_cluster(cache: Any, loaded: Any, inputs: Any, model: Any, sample: np.ndarray, prototype: np.ndarray,
                  labels_by_id: pd.Series, options: VerifyOptions, typical: Callable[[], Any]) -> dict[str, Any]:
    """The tests of one cluster on its sampled members: the record's measured fields (the verdict comes once
    the run's p-values are adjusted together, `with_verdicts`). `inputs`: the run's images and the model's
    outputs on them (`analysis.trust.region_removal.RunInputs`); `typical()`: the run's typical background
    (made once, when a cluster first needs it)."""
    import torch

    from analysis.pipeline.faithfulness import upsample_maps
    from analysis.trust.region_removal import shortcut_test

    found = inputs.load(cache.image_paths(sample), loaded.transform, loaded.in_channels, model,
                        options.batch_size)
    images, errors, before = found.images, found.errors, found.outputs
    skipped = {"skipped": len(errors), "tested": 0, "verdict": "not tested"}
    if not found.positions:
        return {**skipped, "reason": f"no image could be loaded ({errors[0][1] if errors else 'none'})"}
    if not np.isfinite(prototype).all() or prototype.max() <= 0:
        return {**skipped, "reason": "the prototype has no positive relevance: no region to test"}
    tested = sample[found.positions]
    labels = torch.from_numpy(labels_by_id.loc[tested].to_numpy(np.int64).copy())
    q, mass = region_for(prototype, options)
    try:
        result = shortcut_test(model, images, labels, prototype, q=q, seed=options.seed,
                               forward_batch=options.batch_size, before=before)
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
        record.update(_insertion(cache, loaded, inputs, model, images, tested, preds, prototype, q, options))
    elif mass < options.concentrated:
        record.update(_background_swap(model, images, before, foreground, typical(), options))
    return record


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
                  progress: Progress | None = None, inputs: Any = None) -> pd.DataFrame:
    """The tests of the top `options.top` clusters of every clustering of a stored scope: one row per tested
    cluster with what was measured (no verdict yet: `with_verdicts` adjusts the run's p-values together).
    `inputs`: the images earlier scopes of the run loaded and the model's outputs on them
    (`analysis.trust.region_removal.RunInputs`)."""
    from analysis.trust.region_removal import RunInputs

    inputs = RunInputs() if inputs is None else inputs
    summary_all = pq.read_table(stored.path / "summary.parquet").to_pandas()
    prototypes_all = np.load(stored.path / "prototypes.npy")
    side = int(round(np.sqrt(prototypes_all.shape[1])))
    names = [r["name"] for r in stored.meta.get("clusterings", [])]
    assignments = pq.read_table(stored.path / "assignments.parquet", columns=["id", *names]).to_pandas()
    labels_by_id = cache.columns(["id", "label"]).set_index("id")["label"]
    model = loaded.model.to(device)
    records = []
    typical = functools.cache(lambda: typical_background_of(cache, loaded, options, inputs))
    # Two clusterings of a scope often find the same cluster (same members, same prototype): its tests are
    # deterministic, so it is measured once.
    measured: dict[tuple[bytes, bytes], dict[str, Any]] = {}
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
            prototype = prototypes_all[row_index].reshape(side, side)
            key = (sample.tobytes(), prototype.tobytes())
            if key not in measured:
                measured[key] = _test_cluster(cache, loaded, inputs, model, sample, prototype, labels_by_id,
                                              options, typical)
            records.append({**base, **measured[key]})
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
