"""From finding to fixing: tags on images, "find more like these", likely label errors, the tagged list.

```python
from analysis.review import Review, label_issues
review = Review("cache/")                     # opens or creates cache/review.sqlite
Review("cache/", read_only=True)              # reads it only (SQLite mode=ro); every write raises ReviewError
review.tag(ids, "shortcut", note=None, who=None)
review.untag(ids, "shortcut")
review.ids("shortcut")                        # np.int64 array of tagged ids
review.tags()                                 # DataFrame: id, tag, note, who, time
review.reject(ids, "shortcut")                # "not this kind": a negative for the probe
review.rank_like(review.ids("shortcut"), review.rejected("shortcut"))   # DataFrame: id, score
label_issues(load("cache/"))                  # DataFrame: id, label_quality (lowest first)
```

**Storage.** One SQLite database per cache, DIR/review.sqlite, in WAL mode so that several people on one
dashboard (one process, many threads, or several processes) read while one writes. Every write is one
`BEGIN IMMEDIATE` transaction on a fresh connection with a busy timeout, retried with backoff when SQLite
still reports the database busy, so two writers at once both land. A (id, tag) pair is either tagged or
rejected, never both: tagging removes a rejection and rejecting removes the tag. SQLite's WAL needs a
local file system (not NFS).

**Tags belong to their cache.** Image ids are positions in the cache's sorted image list, so the database
records the identity of the cache it was made on: the manifest's `created` stamp, the dataset's fingerprint
and the manifest's `cache_id` (random, one per cache made). When the cache is replaced (`explain
--overwrite`, which calls `keep_tags_aside`, or any other way), the old tags are moved, in the same
transaction, to DIR/review-<old created stamp>.sqlite (a database of the same layout, never read again by
this code: open it with the sqlite3 shell to recover them) and the database starts empty for the new cache.
A Review opened on a cache that has since been replaced refuses to write (ReviewError: reload).

Likely label errors (`label_issues`): Cleanlab's label quality scores (Northcutt, Jiang, Chuang, "Confident
learning", JAIR 2021) on the class probabilities the job stores; "find more like these" is `analysis.review.probe`.
"""
from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import pandas as pd

from analysis.cache.identity import identity_record
from analysis.cache import MANIFEST_NAME, Cache, CacheError, CacheWriter, load
from analysis.review.probe import as_ids, rank_by_probe

DB_NAME = "review.sqlite"
ASIDE_PREFIX = "review-"
DEFAULT_TAGS = ("shortcut", "label error", "ambiguous", "fine")
MAX_TAG_LENGTH = 64
MAX_WHO_LENGTH = 100
MAX_NOTE_LENGTH = 2000
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0        # SQLite waits this long for another writer before reporting "busy"
WRITE_ATTEMPTS = 8           # ... and then the whole transaction is retried this many times
LABEL_QUALITY_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
# Measured on planted flips with shortcut victims present (bench/bench_label_errors.py): the highest AP.
DEFAULT_LABEL_QUALITY_METHOD = "normalized_margin"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS tags (id INTEGER NOT NULL, tag TEXT NOT NULL, note TEXT, who TEXT, "
    "time TEXT NOT NULL, PRIMARY KEY (id, tag))",
    "CREATE TABLE IF NOT EXISTS rejections (id INTEGER NOT NULL, tag TEXT NOT NULL, who TEXT, "
    "time TEXT NOT NULL, PRIMARY KEY (id, tag))",
    "CREATE INDEX IF NOT EXISTS tags_by_tag ON tags (tag, id)",
    "CREATE INDEX IF NOT EXISTS rejections_by_tag ON rejections (tag, id)",
)


class ReviewError(Exception):
    """Tags cannot be read or written (the message is one line and says what to do)."""


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------

def clean_tag(name: Any) -> str:
    """A tag name with surrounding blanks removed; ValueError unless it is non-empty text of at most
    MAX_TAG_LENGTH characters on one line."""
    if not isinstance(name, str):
        raise ValueError(f"a tag is text, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise ValueError("a tag cannot be empty")
    if _CONTROL.search(name):
        raise ValueError("a tag is one line of text (no line breaks or tabs)")
    if len(name) > MAX_TAG_LENGTH:
        raise ValueError(f"a tag has at most {MAX_TAG_LENGTH} characters ({len(name)} given)")
    return name


def _clean_optional(value: Any, what: str, limit: int, one_line: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} is text, got {type(value).__name__}")
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        raise ValueError(f"{what} has at most {limit} characters ({len(value)} given)")
    if one_line and _CONTROL.search(value):
        raise ValueError(f"{what} is one line of text")
    if not one_line and _CONTROL.search(value.replace("\n", "").replace("\t", "").replace("\r", "")):
        raise ValueError(f"{what} holds control characters")
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------
# The tags database
# ----------------------------------------------------------------------------------------------------------

class Review:
    """Tags, rejections and "find more like these" on one cache (see the module doc).

    `Review(root)` opens or creates ROOT/review.sqlite; `cache` (an already loaded `analysis.cache.Cache` of
    the same directory) saves loading it again for id checks and rankings. `set_aside` is where the tags of
    a replaced cache were moved when this object opened the database (None: nothing was moved).
    `read_only=True` (a dashboard shared with `--read-only`) opens an existing database for reading only (SQLite's
    mode=ro: the database itself is never written) and refuses every write with ReviewError.
    Thread-safe: every call opens its own connection. ReviewError (one line) when the database cannot be
    used; ValueError for bad arguments.
    """

    def __init__(self, root: Path | str, cache: Cache | None = None, read_only: bool = False):
        self.root = Path(root)
        self.path = self.root / DB_NAME
        self.read_only = read_only
        manifest = _disk_manifest(self.root)
        self.identity = identity_record(manifest)
        if cache is not None and identity_record(cache.manifest) != self.identity:
            raise ReviewError(f"the cache in {self.root} was replaced after it was opened: reload it")
        self._cache = cache
        self.set_aside: Path | None = self._open()

    # -- connections and transactions ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            if self.read_only:
                connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                             timeout=BUSY_TIMEOUT_S, isolation_level=None)
            else:
                connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as error:
            raise ReviewError(f"cannot open {self.path}: {_one_line(error)}") from None
        return connection

    def _transaction(self, work: Callable[[sqlite3.Connection], T], check_identity: bool = True) -> T:
        """Run `work` in one write transaction (BEGIN IMMEDIATE), retrying when the database is busy."""
        if self.read_only:
            raise ReviewError("this dashboard is read-only: tags are shown here, not changed")
        for attempt in range(WRITE_ATTEMPTS):
            with closing(self._connect()) as connection:
                try:
                    connection.execute("BEGIN IMMEDIATE")
                    if check_identity:
                        self._check_identity(connection)
                    result = work(connection)
                    connection.execute("COMMIT")
                    return result
                except sqlite3.OperationalError as error:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    if _is_busy(error) and attempt < WRITE_ATTEMPTS - 1:
                        time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
                        continue
                    raise ReviewError(f"cannot write the tags in {self.path}: {_one_line(error)}") from None
                except sqlite3.DatabaseError as error:
                    raise ReviewError(f"{self.path} is not a readable tags database ({_one_line(error)}); "
                                      "move it away to start a new one") from None
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
        raise AssertionError("unreachable")

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        for attempt in range(WRITE_ATTEMPTS):
            with closing(self._connect()) as connection:
                try:
                    return connection.execute(sql, parameters).fetchall()
                except sqlite3.OperationalError as error:
                    if _is_busy(error) and attempt < WRITE_ATTEMPTS - 1:
                        time.sleep(0.05 * (attempt + 1))
                        continue
                    raise ReviewError(f"cannot read the tags in {self.path}: {_one_line(error)}") from None
                except sqlite3.DatabaseError as error:
                    raise ReviewError(f"{self.path} is not a readable tags database ({_one_line(error)}); "
                                      "move it away to start a new one") from None
        raise AssertionError("unreachable")

    def _check_identity(self, connection: sqlite3.Connection) -> None:
        stored = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        if {key: stored.get(key) for key in self.identity} != self.identity:
            raise ReviewError(f"the cache in {self.root} was replaced after it was opened (its tags were set "
                              "aside): reload it")

    def _open(self) -> Path | None:
        if not self.root.is_dir():
            raise ReviewError(f"cache directory not found: {self.root}")
        if self.read_only:  # nothing to create, switch or set aside: the tags as they are, if they are this cache's
            if not self._identity_matches():
                raise ReviewError(f"no tags of this cache in {self.path} (none made yet, or made on a cache it "
                                  "replaced)")
            return None
        for attempt in range(WRITE_ATTEMPTS):  # switching to WAL needs a moment without other writers
            with closing(self._connect()) as connection:
                try:
                    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as error:
                    if _is_busy(error) and attempt < WRITE_ATTEMPTS - 1:
                        time.sleep(0.05 * (attempt + 1))
                        continue
                    raise ReviewError(f"cannot use {self.path}: {_one_line(error)} (a read-only "
                                      "directory? tags need a writable cache directory)") from None
                except sqlite3.DatabaseError as error:
                    raise ReviewError(f"{self.path} is not a readable tags database ({_one_line(error)}); "
                                      "move it away to start a new one") from None
        if str(mode).lower() != "wal":
            raise ReviewError(f"{self.path}: SQLite cannot use write-ahead logging here (journal mode "
                              f"{mode!r}; a network file system?): tags need a local directory")
        if self._identity_matches():  # the usual case (a page opening it again): no write lock needed
            return None
        return self._transaction(self._adopt, check_identity=False)

    def _identity_matches(self) -> bool:
        try:
            stored = dict(self._query("SELECT key, value FROM meta"))
        except ReviewError:  # no tables yet (a new database); a corrupt file is reported by the transaction
            return False
        return {key: stored.get(key) for key in self.identity} == self.identity

    def _adopt(self, connection: sqlite3.Connection) -> Path | None:
        """Create the tables; set aside the tags of another cache. Runs inside the write transaction."""
        for statement in _SCHEMA:
            connection.execute(statement)
        stored = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        moved = None
        if "cache_created" in stored and {key: stored.get(key) for key in self.identity} != self.identity:
            moved = self._move_aside(connection, stored)
        if moved is not None or "cache_created" not in stored:
            rows = {**self.identity, "schema_version": str(SCHEMA_VERSION), "made": _now()}
            connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows.items())
        return moved

    def _move_aside(self, connection: sqlite3.Connection, stored: dict[str, str]) -> Path:
        """Copy every row into a new database file next to this one, then empty this one (the caller's
        transaction makes the emptying atomic; the copy is complete and renamed into place before)."""
        stamp = re.sub(r"[^0-9A-Za-z+-]", "-", stored.get("cache_created") or "unknown")[:40]
        target = self.root / f"{ASIDE_PREFIX}{stamp}.sqlite"
        number = 2
        while target.exists():
            target = self.root / f"{ASIDE_PREFIX}{stamp}-{number}.sqlite"
            number += 1
        tmp = self.root / f".tmp-{target.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            with closing(sqlite3.connect(tmp, isolation_level=None)) as copy:
                copy.execute("BEGIN")
                for statement in _SCHEMA:
                    copy.execute(statement)
                for table in ("meta", "tags", "rejections"):
                    rows = connection.execute(f"SELECT * FROM {table}").fetchall()
                    if rows:
                        marks = ", ".join("?" * len(rows[0]))
                        copy.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
                copy.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('set_aside', ?)", (_now(),))
                copy.execute("COMMIT")
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        connection.execute("DELETE FROM tags")
        connection.execute("DELETE FROM rejections")
        connection.execute("DELETE FROM meta")
        return target

    # -- ids ------------------------------------------------------------------------------------------------
    @property
    def cache(self) -> Cache:
        """The cache (loaded on first use)."""
        if self._cache is None:
            self._cache = load(self.root)
        return self._cache

    def _known(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        ids = as_ids(ids)
        if len(ids) == 0:
            raise ValueError("no image selected")
        cached = self.cache.ids
        missing = ids[~np.isin(ids, cached)]
        if len(missing):
            fresh = load(self.root).ids  # the job may have committed more images since the cache was opened
            missing = missing[~np.isin(missing, fresh)]
            if len(missing):
                raise ValueError(f"{len(missing)} id(s) are not images of the cache (e.g. {missing[:5].tolist()})")
        return ids

    # -- writing --------------------------------------------------------------------------------------------
    def tag(self, ids: Iterable[int] | np.ndarray, tag: str, note: str | None = None,
            who: str | None = None) -> int:
        """Tag images (again: the note and who are replaced when given, the time always); removes a rejection
        of the same tag. Returns the number of images."""
        ids, tag = self._known(ids), clean_tag(tag)
        note = _clean_optional(note, "a note", MAX_NOTE_LENGTH, one_line=False)
        who = _clean_optional(who, "a name", MAX_WHO_LENGTH, one_line=True)
        now = _now()
        rows = [(int(i), tag, note, who, now) for i in ids]

        def work(connection: sqlite3.Connection) -> int:
            connection.executemany("DELETE FROM rejections WHERE id = ? AND tag = ?", [r[:2] for r in rows])
            connection.executemany(
                "INSERT INTO tags (id, tag, note, who, time) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id, tag) DO "
                "UPDATE SET note = COALESCE(excluded.note, note), who = COALESCE(excluded.who, who), "
                "time = excluded.time", rows)
            return len(rows)

        return self._transaction(work)

    def untag(self, ids: Iterable[int] | np.ndarray, tag: str) -> int:
        """Remove a tag from images; returns how many had it."""
        ids, tag = as_ids(ids), clean_tag(tag)
        return self._transaction(lambda connection: _deleted(connection, "tags", ids, tag))

    def reject(self, ids: Iterable[int] | np.ndarray, tag: str, who: str | None = None) -> int:
        """Record "not this kind" (a negative for `rank_like`); removes the tag. Returns the number of images."""
        ids, tag = self._known(ids), clean_tag(tag)
        who = _clean_optional(who, "a name", MAX_WHO_LENGTH, one_line=True)
        now = _now()
        rows = [(int(i), tag, who, now) for i in ids]

        def work(connection: sqlite3.Connection) -> int:
            connection.executemany("DELETE FROM tags WHERE id = ? AND tag = ?", [r[:2] for r in rows])
            connection.executemany(
                "INSERT INTO rejections (id, tag, who, time) VALUES (?, ?, ?, ?) ON CONFLICT (id, tag) DO "
                "UPDATE SET who = COALESCE(excluded.who, who), time = excluded.time", rows)
            return len(rows)

        return self._transaction(work)

    def unreject(self, ids: Iterable[int] | np.ndarray, tag: str) -> int:
        """Forget rejections; returns how many there were."""
        ids, tag = as_ids(ids), clean_tag(tag)
        return self._transaction(lambda connection: _deleted(connection, "rejections", ids, tag))

    # -- reading --------------------------------------------------------------------------------------------
    def ids(self, tag: str) -> np.ndarray:
        """int64 ids tagged `tag`, ascending."""
        rows = self._query("SELECT id FROM tags WHERE tag = ? ORDER BY id", (clean_tag(tag),))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def rejected(self, tag: str) -> np.ndarray:
        """int64 ids rejected for `tag`, ascending."""
        rows = self._query("SELECT id FROM rejections WHERE tag = ? ORDER BY id", (clean_tag(tag),))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def tags(self, tag: str | None = None) -> pd.DataFrame:
        """Every tag (or every image tagged `tag`): columns id, tag, note, who, time; sorted by id, tag."""
        if tag is None:
            rows = self._query("SELECT id, tag, note, who, time FROM tags ORDER BY id, tag")
        else:
            rows = self._query("SELECT id, tag, note, who, time FROM tags WHERE tag = ? ORDER BY id",
                               (clean_tag(tag),))
        frame = pd.DataFrame(rows, columns=["id", "tag", "note", "who", "time"])
        return frame.astype({"id": np.int64})

    def tag_names(self) -> list[str]:
        """The default tags, then every other tag in use (alphabetical): the choices a page offers."""
        used = [r[0] for r in self._query("SELECT DISTINCT tag FROM tags UNION SELECT DISTINCT tag FROM rejections")]
        return list(DEFAULT_TAGS) + sorted(set(used) - set(DEFAULT_TAGS), key=str.casefold)

    def tag_column(self, ids: Iterable[int] | np.ndarray) -> pd.Series:
        """For each id (in the order given): its tags joined by "; " ("" when untagged), e.g. a gallery
        tile's caption or a CSV export's tags column. Index = the ids."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        frame = self.tags()
        joined = frame.groupby("id")["tag"].agg("; ".join) if len(frame) else pd.Series(dtype=object)
        return pd.Series([joined.get(int(i), "") for i in ids], index=ids, dtype=object, name="tags")

    # -- find more like these -------------------------------------------------------------------------------
    def rank_like(self, positive_ids: Iterable[int] | np.ndarray, negative_ids: Iterable[int] | np.ndarray = (),
                  kind: str = "positive", seed: int = 0) -> pd.DataFrame:
        """Every image that is neither positive nor negative, most like the positives first: DataFrame with
        columns id, score (the linear probe's log-odds, see `analysis.review.probe`). How well the probe separates
        what is tagged so far: `ranking.attrs["probe"]` (`analysis.review.probe.ProbeQuality.as_dict()`:
        cross-validated average precision and its chance level). `kind`: the descriptors used."""
        cache = self.cache
        frame, quality = rank_by_probe(cache.ids, cache.descriptors(kind=kind), positive_ids, negative_ids,
                                       seed=seed)
        frame.attrs["probe"] = {**quality.as_dict(), "kind": kind}
        return frame


def _deleted(connection: sqlite3.Connection, table: str, ids: np.ndarray, tag: str) -> int:
    before = connection.total_changes
    connection.executemany(f"DELETE FROM {table} WHERE id = ? AND tag = ?", [(int(i), tag) for i in ids])
    return connection.total_changes - before


def _disk_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = CacheWriter(root).read_manifest()
    except CacheError as error:
        raise ReviewError(str(error)) from None
    if manifest is None:
        raise ReviewError(f"not an explanation cache (no {MANIFEST_NAME}): {root}")
    return manifest


def keep_tags_aside(root: Path | str) -> Path | None:
    """After a cache was replaced: move the tags made on the old one aside (see the module doc); returns
    where they went, None when there were none to move. For `explain --overwrite`."""
    root = Path(root)
    if not (root / DB_NAME).exists():
        return None
    return Review(root).set_aside
