"""The cache writer and reader on real files (synthetic rows written through the real writer)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cache import CacheError, CacheWriter, load, normalise_maps
from tests.helpers import REPO_ROOT, synthetic_manifest, synthetic_records, write_synthetic_cache


def _expected(ids: np.ndarray, shard_size: int, n_images: int | None = None,
              map_size: int = 8) -> dict[int, dict]:
    """Original float32 arrays per id, regenerated from the same deterministic records."""
    out = {}
    for start in sorted({int(i) // shard_size * shard_size for i in ids}):
        stop = start + shard_size if n_images is None else min(start + shard_size, n_images)
        shard_ids = np.arange(start, stop)
        rec = synthetic_records(shard_ids, map_size=map_size)
        wrong = np.cumsum(~rec.rows["correct"].to_numpy()) - 1
        for k, i in enumerate(shard_ids):
            correct = bool(rec.rows["correct"].iloc[k])
            out[int(i)] = {
                "pred": rec.maps_pred[k],
                "true": rec.maps_pred[k] if correct else rec.maps_true[wrong[k]],
                "desc": rec.descriptors_positive[k], "desc_abs": rec.descriptors_absolute[k],
                "fg": rec.foreground[k], "row": rec.rows.iloc[k],
            }
    return out


def _check_round_trip(cache, ids: np.ndarray, shard_size: int, n_images: int | None = None) -> None:
    expected = _expected(ids, shard_size, n_images)
    maps = cache.maps(ids)
    true_maps = cache.maps(ids, which="true")
    assert maps.dtype == np.float32 and maps.shape == (len(ids), 8, 8)
    for k, i in enumerate(ids):
        e = expected[int(i)]
        # float16 keeps 11 significant bits: relative error <= 2**-11 of the map's max |value|.
        tol = np.abs(e["pred"]).max() * 2.0 ** -11
        np.testing.assert_allclose(maps[k], e["pred"], rtol=0, atol=tol)
        np.testing.assert_allclose(true_maps[k], e["true"], rtol=0, atol=np.abs(e["true"]).max() * 2.0 ** -11)
        np.testing.assert_array_equal(cache.descriptors([i])[0], e["desc"])
        np.testing.assert_array_equal(cache.descriptors([i], kind="absolute")[0], e["desc_abs"])
        np.testing.assert_array_equal(cache.foreground([i])[0], e["fg"])


def test_round_trip_of_shards_written_out_of_order(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path)
    writer.initialise()
    writer.write_manifest(synthetic_manifest(tmp_path / "images", 30))
    for shard in (2, 0, 1):  # ranks commit in any order; the reader sorts by id
        writer.write_shard(shard, synthetic_records(np.arange(shard * 10, shard * 10 + 10)))
    cache = load(tmp_path)
    assert list(cache.table["id"]) == list(range(30))
    assert writer.committed_shards() == {0, 1, 2}
    table = cache.table
    assert [c for c in table.columns if c.startswith("_")] == []
    assert table["pred"].dtype == np.int64 and table["confidence"].dtype == np.float32
    assert table["correct"].dtype == bool
    assert list(table.loc[3, "top5_classes"]) == list(_expected(np.array([3]), 10)[3]["row"]["top5_classes"])
    _check_round_trip(cache, np.array([29, 0, 13, 3, 14]), 10)
    # true map of a correct row is its pred map; of a wrong row (id 3: 3 % 3 == 0) a different map
    np.testing.assert_array_equal(cache.maps([1], "true"), cache.maps([1], "pred"))
    assert not np.allclose(cache.maps([3], "true"), cache.maps([3], "pred"))


def test_tiny_relevance_survives_float16(tmp_path: Path) -> None:
    # 1e-9 is below float16's smallest subnormal (6e-8): storing raw float16 would give zeros.
    maps = np.array([[[1e-9, -2e-9], [5e-10, 0.0]]], np.float32)
    stored, scale = normalise_maps(maps)
    assert stored.dtype == np.float16 and scale[0] == np.float32(2e-9)
    np.testing.assert_allclose(stored.astype(np.float32) * scale[:, None, None], maps, rtol=1e-3)
    zeros, zero_scale = normalise_maps(np.zeros((1, 2, 2), np.float32))
    assert zero_scale[0] == 0 and not np.any(zeros)


def test_compaction_merges_and_resume_sees_compacted_shards(tmp_path: Path) -> None:
    writer = write_synthetic_cache(tmp_path, n_images=25, shard_size=10, compact=True)
    assert not list((tmp_path / "shards").iterdir())
    assert [p.name for p in tmp_path.glob("compact-*")] == ["compact-000001"]
    assert writer.committed_shards() == {0, 1, 2}
    cache = load(tmp_path)
    assert list(cache.ids) == list(range(25))
    _check_round_trip(cache, np.array([24, 0, 3, 12, 21]), 10, n_images=25)

    # A later shard plus a second compaction: the union, and the old compaction is gone.
    writer.write_shard(3, synthetic_records(np.arange(30, 40)))
    assert list(load(tmp_path).ids) == list(range(25)) + list(range(30, 40))
    writer.compact()
    assert [p.name for p in tmp_path.glob("compact-*")] == ["compact-000002"]
    cache = load(tmp_path)
    assert list(cache.ids) == list(range(25)) + list(range(30, 40))
    _check_round_trip(cache, np.array([3, 24]), 10, n_images=25)
    _check_round_trip(cache, np.array([39, 33]), 10)


def test_compaction_killed_before_cleanup_counts_each_image_once(tmp_path: Path) -> None:
    writer = write_synthetic_cache(tmp_path / "a", n_images=20, shard_size=10, compact=False)
    backup = tmp_path / "backup"
    shutil.copytree(tmp_path / "a" / "shards", backup)
    writer.compact()
    # Simulate kill -9 after the compaction's rename but before the shards were deleted.
    shutil.rmtree(tmp_path / "a" / "shards")
    shutil.copytree(backup, tmp_path / "a" / "shards")
    cache = load(tmp_path / "a")
    assert list(cache.ids) == list(range(20))
    assert writer.compact() is None  # nothing new: only removes the leftovers
    assert not list((tmp_path / "a" / "shards").iterdir())
    assert list(load(tmp_path / "a").ids) == list(range(20))


def test_readers_ignore_temporary_shards(tmp_path: Path) -> None:
    writer = write_synthetic_cache(tmp_path, n_images=10, shard_size=10, compact=False)
    # A shard being written: a .tmp directory with only part of its files.
    tmp = tmp_path / "shards" / ".tmp-shard-00000001.123.abcd"
    tmp.mkdir()
    (tmp / "table.parquet").write_bytes(b"half")
    assert list(load(tmp_path).ids) == list(range(10))
    assert writer.committed_shards() == {0}
    writer.remove_stale_temporaries()
    assert not tmp.exists()


def test_committing_a_shard_twice_is_refused(tmp_path: Path) -> None:
    writer = write_synthetic_cache(tmp_path, n_images=10, shard_size=10, compact=False)
    with pytest.raises(FileExistsError):
        writer.write_shard(0, synthetic_records(np.arange(10)))
    assert list(load(tmp_path).ids) == list(range(10))


def test_shard_records_are_validated(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path)
    writer.initialise()
    records = synthetic_records(np.arange(6))
    records.maps_true = records.maps_true[:1]  # ids 0 and 3 are wrong: two true maps needed
    with pytest.raises(ValueError, match="maps_true has 1 rows for 2 wrong"):
        writer.write_shard(0, records)
    assert writer.committed_shards() == set()
    assert not any((tmp_path / "shards").iterdir())  # the temporary directory was removed


def test_errors_table_and_empty_cache(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path)
    writer.initialise()
    writer.write_manifest(synthetic_manifest(tmp_path / "images", 4, finished=False))
    empty = load(tmp_path)
    assert len(empty) == 0 and list(empty.table.columns)[:3] == ["id", "path", "label"]
    assert len(empty.errors) == 0 and not empty.complete
    with pytest.raises(KeyError):
        empty.maps([0])
    records = synthetic_records(np.array([0, 2, 3]))
    records.errors = pd.DataFrame({"id": [1], "path": ["dog/bad.png"], "reason": ["zero-byte file"]})
    writer.write_shard(0, records)
    cache = load(tmp_path)
    assert cache.errors[["path", "reason"]].values.tolist() == [["dog/bad.png", "zero-byte file"]]
    with pytest.raises(KeyError, match=r"\[1\]"):
        cache.maps([1])
    writer.compact()
    assert load(tmp_path).errors[["path", "reason"]].values.tolist() == [["dog/bad.png", "zero-byte file"]]


def test_foreground_is_none_without_a_source(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path)
    writer.initialise()
    writer.write_manifest(synthetic_manifest(tmp_path / "images", 5))
    writer.write_shard(0, synthetic_records(np.arange(5), with_foreground=False))
    assert load(tmp_path).foreground([0, 1]) is None


def test_image_path_stays_inside_the_dataset_root(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c")
    writer.initialise()
    writer.write_manifest(synthetic_manifest(tmp_path / "images", 4))
    records = synthetic_records(np.arange(4))
    records.rows.loc[1, "path"] = "../../etc/passwd"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "out").symlink_to(tmp_path)       # a link out of the root
    records.rows.loc[3, "path"] = "out/c/manifest.json"
    writer.write_shard(0, records)
    cache = load(tmp_path / "c")
    expected = [(tmp_path / "images" / records.rows.loc[i, "path"]).resolve() for i in (2, 0)]
    assert cache.image_path(0) == expected[1]
    assert cache.image_paths(np.array([2, 0])) == expected and cache.image_paths([]) == []    # in the order asked
    for bad in (1, 3):
        with pytest.raises(CacheError, match="escapes"):
            cache.image_path(bad)
        with pytest.raises(CacheError, match="escapes"):
            cache.image_paths([0, bad])


@pytest.mark.parametrize("damage", ["missing", "file", "no_manifest", "bad_json", "not_a_cache",
                                    "missing_array", "truncated_array", "version"])
def test_bad_cache_directories_raise_cache_error(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "c"
    write_synthetic_cache(root, n_images=10, shard_size=5, compact=False)
    manifest = root / "manifest.json"
    if damage == "missing":
        shutil.rmtree(root)
    elif damage == "file":
        shutil.rmtree(root)
        root.write_text("x")
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "bad_json":
        manifest.write_text("{not json")
    elif damage == "not_a_cache":
        manifest.write_text(json.dumps({"hello": 1}))
    elif damage == "missing_array":
        (root / "shards" / "shard-00000001" / "maps_pred.npy").unlink()
    elif damage == "truncated_array":
        path = root / "shards" / "shard-00000001" / "maps_pred.npy"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "version":
        data = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(CacheError) as info:
        load(root)
    assert "\n" not in str(info.value)


def test_opening_100k_images_is_fast_and_small(tmp_path: Path) -> None:
    """100,000 rows in 100 shards, compacted; open + one map + table in a fresh process."""
    write_synthetic_cache(tmp_path, n_images=100_000, shard_size=1000, map_size=8, compact=True)
    script = (
        "import time, resource, sys\n"
        "t = time.perf_counter()\n"
        "from analysis.cache import load\n"
        "t_import = time.perf_counter()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"c = load({str(tmp_path)!r}); m = c.maps([99_999, 5]); n = len(c.table)\n"
        "t_open = time.perf_counter() - t_import\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(n, t_open, (after - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    n, seconds, extra_mib = int(out[0]), float(out[1]), float(out[2])
    assert n == 100_000
    assert seconds < 1.0, f"opening took {seconds:.2f} s"
    assert extra_mib < 200, f"opening used {extra_mib:.0f} MiB"


def test_reading_during_compaction_always_sees_every_row(tmp_path: Path) -> None:
    """A reader process loads the cache in a loop while this process compacts 60 shards into one."""
    writer = write_synthetic_cache(tmp_path, n_images=600, shard_size=10, compact=False)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from analysis.cache import load\n"
        "root = Path(sys.argv[1]); seen = set()\n"
        "end = time.monotonic() + 60\n"
        "while not (root / 'stop').exists() and time.monotonic() < end:\n"
        "    c = load(root)\n"
        "    assert list(c.ids) == list(range(600)), len(c.ids)\n"
        "    assert c.maps([599, 0]).shape == (2, 8, 8)\n"
        "    seen.add(any(root.glob('compact-*')))\n"
        "    (root / 'loaded').touch()\n"
        "print(sorted(seen))\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "loaded").exists() and time.monotonic() < deadline:  # the reader loaded it once
        time.sleep(0.01)
    writer.compact()
    time.sleep(1.0)
    (tmp_path / "stop").write_text("")
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert out.strip() == "[False, True]"  # it read both before and after the compaction
