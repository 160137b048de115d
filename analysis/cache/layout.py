"""What a cache directory holds: the names of its files and folders, the stored schemas, and the errors a
reader raises. The layout itself is described in analysis/cache/__init__.py."""
from __future__ import annotations

import pyarrow as pa


FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
SHARD_PREFIX = "shard-"
COMPACT_PREFIX = "compact-"
TMP_PREFIX = ".tmp-"
COVERED_NAME = "shards.json"
DAMAGED_DIR = "damaged"   # committed parts a resumed job found unreadable, moved here (kept) and redone
LOCK_NAME = ".lock"       # the writer's lock (WriterLock); never deleted, see there


# Results derived from a cache and kept in its directory (compare-methods, the offline clustering): --overwrite
# removes them with the cache, and each records the cache_identity it was made from.
TRUST_DIR = "trust"
DASHBOARD_DIR = "dashboard"  # the Clusters page's own clusterings, saved by older versions: removed with the cache
ANALYSIS_DIR = "analysis"   # the offline clustering's results (python -m analysis cluster)
DERIVED_DIRS = (TRUST_DIR, DASHBOARD_DIR, ANALYSIS_DIR)


# The tags database (analysis/review/) and the tags of replaced caches: kept by --overwrite (set aside instead).
REVIEW_PREFIX = "review"


# Public per-image columns, in order, with their dtypes (docs/contracts.md).
TABLE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("path", pa.string()),
    ("label", pa.int64()),
    ("pred", pa.int64()),
    ("label_name", pa.string()),
    ("pred_name", pa.string()),
    ("confidence", pa.float32()),
    ("top5_classes", pa.list_(pa.int64())),
    ("top5_probs", pa.list_(pa.float32())),
    ("correct", pa.bool_()),
    ("background_share", pa.float32()),
    ("background_hotspot", pa.float32()),
    ("border_share", pa.float32()),
    ("concentration", pa.float32()),
    ("has_foreground", pa.bool_()),
    ("deletion_auc", pa.float32()),    # NaN unless the job ran with --faithfulness
    ("insertion_auc", pa.float32()),
    ("image_width", pa.int32()),       # the original image's size (0: not recorded, a cache of an older job)
    ("image_height", pa.int32()),
    ("crop_x0", pa.float32()),         # the crop box: the region of the original the model saw, in original
    ("crop_y0", pa.float32()),         # pixels (analysis.pipeline.geometry); NaN where it is unknown
    ("crop_x1", pa.float32()),
    ("crop_y1", pa.float32()),
])
OPTIONAL_SCORES = ("deletion_auc", "insertion_auc")
SIZE_COLUMNS = ("image_width", "image_height")
BOX_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")


# Internal columns: how to find and rescale the stored maps of a row.
INTERNAL_SCHEMA = pa.schema([
    ("_scale_pred", pa.float32()),
    ("_scale_true", pa.float32()),   # NaN for correct rows
    ("_true_row", pa.int64()),       # row in maps_true.npy of the same part, -1 for correct rows
])
STORED_SCHEMA = pa.schema(list(TABLE_SCHEMA) + list(INTERNAL_SCHEMA))
ERRORS_SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("reason", pa.string())])
DESCRIPTOR_FILES = {"positive": "desc_positive.npy", "absolute": "desc_absolute.npy"}
CONCEPT_DESCRIPTOR = "concepts"     # not a file: made from the stored channel relevance when read


# Optional per-row arrays: name -> file in every part, row i = table row i of the part, any dtype and trailing
# shape. To store a new one, add it here and put it in ShardRecords.row_arrays (the job: BatchOutput.row_arrays);
# writing, compaction and `Cache.row_array` need nothing else. Caches written before an array existed lack its
# file: the reader then gives None.
ROW_ARRAYS = {"probabilities": "probabilities.npy", "probability_classes": "probability_classes.npy",
              "channel_relevance": "channel_relevance.npy",   # float16 [n, K], analysis.pipeline.channel_relevance
              "channel_relevance_true": "channel_relevance_true.npy"}
PROBABILITY_TOP_K = 20            # with more than FULL_PROBABILITIES_MAX classes, only the top 20 are stored
FULL_PROBABILITIES_MAX = 100


class CacheError(Exception):
    """A cache directory that is missing, corrupt or not a cache (the message is one line)."""


class UnknownGeometry(CacheError):
    """Where an image's map lies in the original image is not known (a cache of an older job, or a transform
    whose geometry could not be measured)."""


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:08d}"


def _parse_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix):]
    return int(digits) if digits.isdigit() else None


def is_cache_entry(name: str) -> bool:
    """Whether a name in a cache directory is one this project writes there (the rest is the user's)."""
    return name in (MANIFEST_NAME, SHARDS_DIR, DAMAGED_DIR, LOCK_NAME, *DERIVED_DIRS) or \
        name.startswith((COMPACT_PREFIX, TMP_PREFIX, REVIEW_PREFIX))
