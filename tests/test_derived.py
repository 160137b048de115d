"""The home of derived results (issue 23): one atomic write for a file and one for a folder, what a result
records of the cache's state, and the one "missing or stale: run this" record the pages show. Real files,
a real (synthetic) cache."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.cache import TMP_PREFIX, load
from analysis.cache.derived import (CLASS_MAPS, CLUSTERINGS, COMPARISON, CONCEPTS, DERIVED_RESULTS, fingerprint_record,
                                    is_fresh, missing)
from analysis.cache.files import file_replaced_atomically, folder_replaced_atomically, write_json_atomic
from tests.helpers import write_synthetic_cache


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "table.parquet"
    with file_replaced_atomically(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".parquet" and tmp.name.startswith(TMP_PREFIX)
        pd.DataFrame({"a": [1, 2]}).to_parquet(tmp, index=False)   # pandas picks the format by the suffix
        assert not target.exists()                                  # nothing visible before the block ends
    assert pd.read_parquet(target)["a"].tolist() == [1, 2]
    with pytest.raises(RuntimeError, match="half way"):
        with file_replaced_atomically(target) as tmp:
            pd.DataFrame({"a": [3]}).to_parquet(tmp, index=False)
            raise RuntimeError("stopped half way")
    assert pd.read_parquet(target)["a"].tolist() == [1, 2] and not leftovers(target.parent)
    write_json_atomic(tmp_path / "meta.json", {"b": 1})
    assert json.loads((tmp_path / "meta.json").read_text()) == {"b": 1} and not leftovers(tmp_path)


def test_a_folder_is_replaced_whole_and_a_users_folder_only_while_empty(tmp_path: Path) -> None:
    final = tmp_path / "result"
    for text in ("old", "new"):
        with folder_replaced_atomically(final) as tmp:
            (tmp / "x.txt").write_text(text)
    assert (final / "x.txt").read_text() == "new" and not leftovers(tmp_path)
    users = tmp_path / "export"
    users.mkdir()
    (users / "mine.txt").write_text("keep me")
    with pytest.raises(OSError):
        with folder_replaced_atomically(users, only_over_empty=True) as tmp:
            (tmp / "list.csv").write_text("id\n")
    assert (users / "mine.txt").read_text() == "keep me" and not leftovers(tmp_path)
    (users / "mine.txt").unlink()
    with folder_replaced_atomically(users, only_over_empty=True) as tmp:
        (tmp / "list.csv").write_text("id\n")
    assert (users / "list.csv").read_text() == "id\n"


def test_a_result_made_on_one_state_of_the_cache_is_stale_on_the_next(tmp_path: Path) -> None:
    write_synthetic_cache(tmp_path / "cache", n_images=6, shard_size=3)
    meta = {"settings": {}, **fingerprint_record(load(tmp_path / "cache"))}
    assert is_fresh(meta, load(tmp_path / "cache"))
    write_synthetic_cache(tmp_path / "bigger", n_images=9, shard_size=3)   # another cache, more images
    assert not is_fresh(meta, load(tmp_path / "bigger")) and not is_fresh({}, load(tmp_path / "cache"))


def test_the_missing_or_stale_record_names_the_real_command(tmp_path: Path) -> None:
    root = tmp_path / "my cache"
    record = missing(COMPARISON, root)
    assert record.command == f"python -m analysis compare-methods --cache '{root}'"   # quoted: a space in it
    assert record.sentence() == (f"No method comparison for this cache yet: it has not been computed. Run "
                                 f"`python -m analysis compare-methods --cache '{root}'`.")
    plain = tmp_path / "cache"
    stale = missing(CLUSTERINGS, plain, "stale", "computed on an older state of this cache", "The job runs it.")
    assert stale.sentence() == (f"The stored offline clustering is stale (computed on an older state of this "
                                f"cache). Run `python -m analysis cluster --cache {plain}` to make it again. The "
                                "job runs it.")
    broken = missing(CONCEPTS, root, "unreadable", "maps.npy is cut short", options=("--top", "3"))
    assert broken.command.endswith(f"concepts --cache '{root}' --top 3")
    assert "cannot be read (maps.npy is cut short)" in broken.sentence()
    with pytest.raises(ValueError, match="missing, stale or unreadable"):
        missing(CLASS_MAPS, root, "old")
    # every derived result lives under a folder that --overwrite removes with the cache
    from analysis.cache.layout import DERIVED_DIRS
    assert all(result.parts[0] in DERIVED_DIRS and result.path(root).is_relative_to(root)
               for result in DERIVED_RESULTS)
