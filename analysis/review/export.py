"""The tagged list as a table (for `python -m analysis export` and the pages' downloads)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.review.tags import Review


EXPORT_COLUMNS = ("id", "path", "label", "prediction", "tags", "note", "who", "when")


def tagged_table(review: Review, tag: str) -> pd.DataFrame:
    """The images tagged `tag`: columns id, path (absolute), label, prediction (class names), tags (all of
    the image's tags, "; "-joined), note, who, when (of this tag); sorted by id. Empty when none."""
    cache = review.cache
    tagged = review.tags(tag)
    if len(tagged) == 0:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in EXPORT_COLUMNS})
    rows = cache.table.set_index("id").loc[tagged["id"].to_numpy(np.int64)]
    return pd.DataFrame({
        "id": tagged["id"].to_numpy(np.int64),
        "path": [str(path) for path in cache.image_paths(tagged["id"].to_numpy())],
        "label": rows["label_name"].to_numpy(), "prediction": rows["pred_name"].to_numpy(),
        "tags": review.tag_column(tagged["id"].to_numpy(np.int64)).to_numpy(),
        "note": tagged["note"].to_numpy(), "who": tagged["who"].to_numpy(), "when": tagged["time"].to_numpy(),
    })
