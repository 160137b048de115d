"""The causal check of the top clusters (cluster --verify-top): the shortcut test on each cluster's
prototype region and the verdict rule documented at `verdict`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

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
    """The causal test of the top clusters (analysis.trust.region_removal) and the verdict rule's thresholds."""

    top: int = TOP_TO_VERIFY          # clusters of each clustering, by suspicion rank
    q: float = 5.0                    # the region: top q% of the prototype
    images: int = 500                 # members tested per cluster (a seeded sample of larger clusters)
    seed: int = 0
    alpha: float = 0.01               # family-wise level: divided by the number of clusters tested in the run
    min_difference: float = 0.10      # flip rate of the region minus that of the control, at least
    off_object: float = 0.5           # share of the region off the object (or in the border) to call it "off"
    batch_size: int = 64

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


VERDICTS = {
    "shortcut": "the region lies off the object and blurring it changes far more predictions than a random "
                "region: the model depends on something that is not the object",
    "uses the object": "blurring the region changes far more predictions than a random region, but the region "
                       "is on the object: the model working, not a shortcut",
    "off the object, not used": "the region lies off the object, but blurring it changes predictions no more "
                                "than a random region",
    "not used": "blurring the region changes predictions no more than a random region",
}


def mcnemar_greater(changed_region: np.ndarray, changed_control: np.ndarray) -> float:
    """One-sided exact McNemar test (the two blurs are paired per image): p-value of "the region changes more
    predictions than the control" = P(Binomial(b + c, 1/2) >= b), b (c) = images changed by the region only (by
    the control only). 1 when no image is discordant."""
    from scipy.stats import binomtest

    region, control = np.asarray(changed_region, bool), np.asarray(changed_control, bool)
    b, c = int((region & ~control).sum()), int((~region & control).sum())
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def verdict(off_object_share: float, changed_region: float, changed_control: float, p_value: float,
            alpha: float, options: VerifyOptions = VerifyOptions()) -> str:
    """Our rule: "shortcut" needs both the location (most of the region off the object by mask or box -- in the
    border strip without them) and the causal effect (region flips exceed the control's by the exact McNemar
    test at `alpha` and by at least `min_difference`, so that a negligible but significant difference at a
    million images is not called a shortcut). The effect on the object is the model working."""
    off = bool(np.isfinite(off_object_share) and off_object_share >= options.off_object)
    causal = bool(p_value < alpha and changed_region - changed_control >= options.min_difference)
    if causal:
        return "shortcut" if off else "uses the object"
    return "off the object, not used" if off else "not used"


def region_off_object(region: np.ndarray, foreground: np.ndarray | None) -> tuple[float, str]:
    """(share of the region's pixels off the object, how it was judged): the mean over images whose
    foreground is known of the share outside their foreground dilated by one map pixel (as
    background_hotspot); without any foreground, the share in the border strip (as border_share)."""
    import torch

    from analysis.pipeline.scores import dilate, frame_mask
    from analysis.trust.region_removal import foreground_to_input

    region_t = torch.as_tensor(np.asarray(region, bool))
    total = float(region_t.sum())
    if foreground is not None:
        known = foreground.reshape(len(foreground), -1).any(axis=1)
        if known.any():
            grown = foreground_to_input(dilate(foreground[known], 1), *region_t.shape)
            outside = (region_t[None] & ~grown).flatten(1).sum(1).float() / max(total, 1.0)
            return float(outside.mean()), "off the object's mask or box"
    frame = frame_mask(*region_t.shape)
    return float((region_t & frame).sum()) / max(total, 1.0), "in the border strip (no mask or box)"


VERIFICATION_COLUMNS = ["clustering", "rank", "cluster", "size", "tested", "skipped", "q", "changed_region",
                        "changed_control", "p_value", "alpha", "off_object_share", "location_rule", "accuracy_before",
                        "accuracy_region", "verdict", "reason"]


def _test_cluster(cache: Any, loaded: Any, model: Any, sample: np.ndarray, prototype: np.ndarray,
                  labels_by_id: pd.Series, options: VerifyOptions, alpha: float) -> dict[str, Any]:
    """The causal test of one cluster on its sampled members: the record's test fields (tested, skipped, the
    changed shares, p-value, location, accuracies, verdict and reason)."""
    import torch

    from analysis.trust.region_removal import load_inputs, shortcut_test

    images, positions, errors = load_inputs([cache.image_path(int(i)) for i in sample], loaded.transform,
                                            loaded.in_channels)
    skipped = {"skipped": len(errors), "tested": 0, "verdict": "not tested"}
    if not positions:
        return {**skipped, "reason": f"no image could be loaded ({errors[0][1] if errors else 'none'})"}
    if not np.isfinite(prototype).all() or prototype.max() <= 0:
        return {**skipped, "reason": "the prototype has no positive relevance: no region to test"}
    tested = sample[positions]
    labels = torch.from_numpy(labels_by_id.loc[tested].to_numpy(np.int64).copy())
    try:
        result = shortcut_test(model, images, labels, prototype, q=options.q, seed=options.seed,
                               forward_batch=options.batch_size)
    except ValueError as error:   # e.g. a prototype without positive relevance
        return {**skipped, "reason": str(error).splitlines()[0]}
    frame = result.per_image
    p_value = mcnemar_greater(frame["changed_prototype"].to_numpy(), frame["changed_random"].to_numpy())
    off_share, judged = region_off_object(result.region, cache.foreground(tested))
    changed_region, changed_control = float(frame["changed_prototype"].mean()), float(frame["changed_random"].mean())
    return {"skipped": len(errors), "tested": int(len(tested)), "changed_region": changed_region,
            "changed_control": changed_control, "p_value": p_value, "off_object_share": off_share,
            "location_rule": judged, "accuracy_before": float(result.summary["accuracy_before"]),
            "accuracy_region": float(result.summary["accuracy_prototype"]),
            "verdict": verdict(off_share, changed_region, changed_control, p_value, alpha, options), "reason": ""}


def _write_verification(cache: Any, stored: StoredScope, frame: pd.DataFrame, options: VerifyOptions,
                        alpha: float) -> None:
    """verification.parquet next to the scope's result (atomic rename), with what it was made with."""
    from analysis.cache.files import file_replaced_atomically, save_parquet

    meta = {"options": options.as_dict(), "alpha": alpha, "created": now_iso(),
            "model_sha256": (cache.manifest.get("model") or {}).get("weights_sha256"),
            "cache_fingerprint": stored.meta.get("cache_fingerprint")}
    table_out = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(
        {b"fgcam_verification": json.dumps(meta).encode()})
    with file_replaced_atomically(stored.path / "verification.parquet") as tmp:
        save_parquet(tmp, table_out)


def verify_clusters(cache: Any, stored: StoredScope, loaded: Any, options: VerifyOptions, alpha: float,
                    device: Any = "cpu", progress: Progress | None = None) -> pd.DataFrame:
    """Run the causal test on the top `options.top` clusters of every clustering of a stored scope; returns one
    row per tested cluster (see docs/contracts.md) and writes it next to the scope's result."""
    summary_all = pq.read_table(stored.path / "summary.parquet").to_pandas()
    prototypes_all = np.load(stored.path / "prototypes.npy")
    side = int(round(np.sqrt(prototypes_all.shape[1])))
    names = [r["name"] for r in stored.meta.get("clusterings", [])]
    assignments = pq.read_table(stored.path / "assignments.parquet", columns=["id", *names]).to_pandas()
    labels_by_id = cache.columns(["id", "label"]).set_index("id")["label"]
    model = loaded.model.to(device)
    records = []
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
                    "size": int(record.size), "q": float(options.q), "alpha": float(alpha)}
            records.append({**base, **_test_cluster(cache, loaded, model, sample,
                                                    prototypes_all[row_index].reshape(side, side), labels_by_id,
                                                    options, alpha)})
    frame = pd.DataFrame.from_records(records, columns=VERIFICATION_COLUMNS)
    _write_verification(cache, stored, frame, options, alpha)
    return frame


def stored_verification_options(stored: StoredScope) -> dict[str, Any] | None:
    """The options a stored verification was made with (None when there is none)."""
    try:
        metadata = pq.read_schema(stored.path / "verification.parquet").metadata or {}
        return json.loads(metadata[b"fgcam_verification"]).get("options")
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
