"""Per-row arrays in the cache (analysis/cache/ ROW_ARRAYS): the class probabilities the job stores, kept by
compaction, the top 20 for many classes, and caches written before they existed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cache import CacheWriter, full_probabilities, load, probability_arrays
from analysis.review import label_issues
from tests.helpers import synthetic_manifest, synthetic_records


def _probabilities(ids: np.ndarray, classes: int) -> np.ndarray:
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    return rng.dirichlet(np.full(classes, 0.3), size=len(ids)).astype(np.float32)


def _write(root: Path, shards: dict[int, np.ndarray], classes: int, with_probabilities=lambda shard: True,
           compact: bool = False) -> CacheWriter:
    writer = CacheWriter(root)
    writer.initialise()
    manifest = synthetic_manifest(root / "images", sum(len(i) for i in shards.values()))
    manifest["class_names"] = [f"class {k}" for k in range(classes)]
    writer.write_manifest(manifest)
    for shard, ids in shards.items():
        records = synthetic_records(ids)
        if with_probabilities(shard):
            records.row_arrays = probability_arrays(_probabilities(ids, classes))
        writer.write_shard(shard, records)
    if compact:
        writer.compact()
    return writer


def test_probability_arrays_and_their_reconstruction_by_hand() -> None:
    few = np.array([[0.7, 0.2, 0.1]], np.float32)
    stored = probability_arrays(few)
    assert list(stored) == ["probabilities"] and stored["probabilities"].dtype == np.float16
    np.testing.assert_allclose(full_probabilities(stored["probabilities"], None, 3), few, atol=1e-3)

    many = np.zeros((2, 150), np.float32)
    many[0, :] = 0.5 / 130
    many[0, 130:] = 0.5 / 20          # classes 130..149 hold half the mass
    many[1, 7] = 1.0
    stored = probability_arrays(many)
    assert stored["probabilities"].shape == (2, 20) and stored["probability_classes"].dtype == np.int32
    assert sorted(stored["probability_classes"][0]) == list(range(130, 150))
    assert stored["probability_classes"][1][0] == 7 and stored["probabilities"][1][0] == 1.0
    rebuilt = full_probabilities(stored["probabilities"], stored["probability_classes"], 150)
    # The stored top 20 in place; the other 130 classes share the rest evenly: 0.5 / 130 each, and 0.
    np.testing.assert_allclose(rebuilt[0], many[0], rtol=2e-3)
    np.testing.assert_allclose(rebuilt[1], many[1], atol=1e-7)


@pytest.mark.parametrize("classes", [3, 150])
def test_probabilities_survive_shards_out_of_order_and_compaction(tmp_path: Path, classes: int) -> None:
    shards = {2: np.arange(20, 30), 0: np.arange(0, 10), 1: np.arange(10, 20)}
    writer = _write(tmp_path, shards, classes)
    expected = np.concatenate([_probabilities(shards[k], classes) for k in (0, 1, 2)])
    tolerance = {"rtol": 2.0 ** -10, "atol": 1e-7}
    for state in ("shards", "compacted"):
        cache = load(tmp_path)
        everything = cache.probabilities()
        assert everything.shape == (30, classes) and everything.dtype == np.float32, state
        if classes <= 100:
            np.testing.assert_allclose(everything, expected, **tolerance)
        else:   # the top 20 of each row are exact; the rest share what is left
            top = np.argsort(-expected, axis=1)[:, :20]
            np.testing.assert_allclose(np.take_along_axis(everything, top, 1), np.take_along_axis(expected, top, 1),
                                       **tolerance)
            np.testing.assert_allclose(everything.sum(axis=1), 1.0, atol=1e-2)
        np.testing.assert_array_equal(cache.probabilities([25, 3]), everything[[25, 3]])
        writer.compact()
    assert [p.name for p in tmp_path.glob("compact-*/probabilities.npy")] == ["probabilities.npy"]


def test_a_cache_written_before_probabilities_existed(tmp_path: Path) -> None:
    """No probabilities (None, not an error); label_issues falls back to the table's top 5, which for the
    synthetic 3-class records is the whole distribution."""
    _write(tmp_path, {0: np.arange(0, 12), 1: np.arange(12, 24)}, 3, with_probabilities=lambda shard: False,
           compact=True)
    cache = load(tmp_path)
    assert cache.probabilities() is None and cache.row_array("probabilities", [1, 2]) is None
    frame = label_issues(cache, method="self_confidence")
    assert frame.attrs["probabilities"] == "top-5" and len(frame) == 24
    table = cache.table.set_index("id").loc[frame["id"]]
    given = [dict(zip(c, p))[label] for c, p, label in zip(table["top5_classes"], table["top5_probs"], table["label"])]
    np.testing.assert_allclose(frame["label_quality"], np.array(given) / [sum(p) for p in table["top5_probs"]],
                               rtol=1e-5)


def test_a_shard_without_the_array_hides_it_but_an_empty_shard_does_not(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    _write(mixed, {0: np.arange(0, 10), 1: np.arange(10, 20)}, 3, with_probabilities=lambda shard: shard == 0)
    assert load(mixed).probabilities() is None
    CacheWriter(mixed).compact()
    assert load(mixed).probabilities() is None and not list(mixed.glob("compact-*/probabilities.npy"))

    # A shard whose images were all skipped has no rows and writes no arrays.
    with_empty = tmp_path / "with_empty"
    writer = _write(with_empty, {0: np.arange(0, 10)}, 3)
    empty = synthetic_records(np.arange(0, 0))
    empty.errors = pd.DataFrame({"id": [10], "path": ["x.png"], "reason": ["unreadable"]})
    writer.write_shard(1, empty)
    assert load(with_empty).probabilities().shape == (10, 3)
    writer.compact()
    assert load(with_empty).probabilities().shape == (10, 3)


def test_row_arrays_are_validated(tmp_path: Path) -> None:
    records = synthetic_records(np.arange(4))
    records.row_arrays = {"probabilities": np.zeros((3, 3), np.float16)}
    with pytest.raises(ValueError, match="shape"):
        records.validate()
    records.row_arrays = {"logits": np.zeros((4, 3), np.float16)}
    with pytest.raises(ValueError, match="unknown row array"):
        records.validate()
    with pytest.raises(ValueError, match="name must be one of"):
        load_cache = _write(tmp_path, {0: np.arange(4)}, 3)
        load(load_cache.root).row_array("logits")
