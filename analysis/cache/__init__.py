"""On-disk cache of a dataset explanation: the shard writer and the reading API, as a package.

layout (names, schemas, errors), files (durable writes: one file, one folder), identity (which cache this is),
arrays (per-row arrays as stored), channels (the stored channel relevance read back), placement (a stored map
laid over the original image), lock (the writer lock), writer (CacheWriter), reader (Cache, load), derived
(the results other commands keep beside a cache: their places, freshness, and the "missing or stale: run
this" record). The public names are re-exported here: `from analysis.cache import load, Cache, ...`.

Layout of a cache directory::

    DIR/manifest.json                 job identity, options, counts (written atomically)
    DIR/shards/shard-00000012/        one committed shard (ids [12*S, 13*S) of the sorted dataset)
        table.parquet                 one row per explained image (public columns + internal `_` columns)
        maps_pred.npy                 float16 [n, M, M]  map of the predicted class / its per-row max |value|
        maps_true.npy                 float16 [n_wrong, M, M] map of the true class, wrong rows only
        desc_positive.npy             float32 [n, D*D] unit-mass pooled positive relevance
        desc_absolute.npy             float32 [n, D*D] unit-mass pooled |relevance|
        foreground.npy                uint8 [n, ceil(M*M/8)] packed bits (only when a foreground is known)
        probabilities.npy             float16 [n, K] class probabilities (K > 100: the top 20, descending, with
        probability_classes.npy       int32 [n, 20] their classes); see ROW_ARRAYS (absent in older caches)
        errors.parquet                id, path, reason of every image of the shard's range that was skipped
    DIR/compact-000001/               the same files for many shards at once, plus shards.json (covered shards)
    DIR/shards/.tmp-*                 a shard being written (ignored by readers, removed on the next run)
    DIR/damaged/                      committed parts a resumed job could not read back (kept; their ids redone)
    DIR/.lock                         the writer lock (WriterLock): one job writes a cache at a time

Every shard and compaction is written under a temporary name, fsync'ed and renamed, so a reader (or a
resumed job) only ever sees complete parts.  Maps are stored divided by their max |value| because input-level
relevance can be far below float16's smallest normal number; the float32 scale lives in the table.
"""
from analysis.cache.layout import (ANALYSIS_DIR, BOX_COLUMNS, COMPACT_PREFIX, CONCEPT_DESCRIPTOR, COVERED_NAME,
                                   CacheError, DAMAGED_DIR,
                                   DASHBOARD_DIR, DERIVED_DIRS, DESCRIPTOR_FILES, ERRORS_SCHEMA, FORMAT_VERSION,
                                   FULL_PROBABILITIES_MAX, INTERNAL_SCHEMA, LOCK_NAME, MANIFEST_NAME, OPTIONAL_SCORES,
                                   PROBABILITY_TOP_K, REVIEW_PREFIX, ROW_ARRAYS, SHARDS_DIR, SHARD_PREFIX,
                                   SIZE_COLUMNS, STORED_SCHEMA, TABLE_SCHEMA, TMP_PREFIX, TRUST_DIR, UnknownGeometry,
                                   is_cache_entry, shard_name)
from analysis.cache.files import now_iso, wipe_cache_dir, write_json_atomic
from analysis.cache.identity import cache_identity, new_cache_id
from analysis.cache.arrays import (full_probabilities, normalise_maps, pack_foreground, probability_arrays,
                                   unpack_foreground)
from analysis.cache.lock import CacheLocked, WriterLock
from analysis.cache.writer import CacheWriter, ShardRecords, part_problem
from analysis.cache.reader import Cache, load


__all__ = ["ANALYSIS_DIR", "BOX_COLUMNS", "COMPACT_PREFIX", "CONCEPT_DESCRIPTOR", "COVERED_NAME", "Cache",
           "CacheError", "CacheLocked",
           "CacheWriter", "DAMAGED_DIR", "DASHBOARD_DIR", "DERIVED_DIRS", "DESCRIPTOR_FILES", "ERRORS_SCHEMA",
           "FORMAT_VERSION", "FULL_PROBABILITIES_MAX", "INTERNAL_SCHEMA", "LOCK_NAME", "MANIFEST_NAME",
           "OPTIONAL_SCORES", "PROBABILITY_TOP_K", "REVIEW_PREFIX", "ROW_ARRAYS", "SHARDS_DIR", "SHARD_PREFIX",
           "SIZE_COLUMNS", "STORED_SCHEMA", "ShardRecords", "TABLE_SCHEMA", "TMP_PREFIX", "TRUST_DIR",
           "UnknownGeometry", "WriterLock", "cache_identity",
           "full_probabilities", "is_cache_entry", "load", "new_cache_id", "normalise_maps", "now_iso",
           "pack_foreground", "part_problem", "probability_arrays", "shard_name", "unpack_foreground",
           "wipe_cache_dir", "write_json_atomic"]
