"""Out-of-sample class probabilities from the user (e.g. cross-validation), for the label-error ranking.

The CSV: a header `path,<class>,<class>,...` -- `path` is the image's path as the cache lists it (relative to
the dataset root, as on the pages and in `export`; an absolute path inside the dataset root works too), then
one column per class name of the cache (any order, every class, nothing else). One row per explained image;
each row's probabilities are finite, >= 0 and sum to 1 within `SUM_TOLERANCE`. Every problem is a
`ProbabilityFileError` whose message is one line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cache import Cache

PATH_COLUMN = "path"
SUM_TOLERANCE = 1e-3


class ProbabilityFileError(ValueError):
    """The probabilities file cannot be used (one line saying what is wrong and where)."""


def _first(items: list[str], more: int) -> str:
    return ", ".join(repr(i) for i in items[:3]) + (f" and {more - 3} more" if more > 3 else "")


def _relative_paths(cache: Cache, paths: pd.Series) -> pd.Series:
    """Absolute paths inside the dataset root made relative (as the cache lists them); others unchanged."""
    root = Path(cache.manifest["dataset"]["root"]).resolve()

    def relative(text: str) -> str:
        path = Path(text)
        return path.resolve().relative_to(root).as_posix() if path.is_absolute() and \
            path.resolve().is_relative_to(root) else text
    return paths.map(relative)


def _read(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise ProbabilityFileError(f"{path}: no such file" if not Path(path).exists() else f"{path} is not a file")
    try:
        frame = pd.read_csv(path, dtype={PATH_COLUMN: str}, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise ProbabilityFileError(f"cannot read {path} as a CSV: {str(error).splitlines()[0]}") from None
    if PATH_COLUMN not in frame.columns:
        raise ProbabilityFileError(f"{path} has no {PATH_COLUMN!r} column (the header is path,<class>,<class>,...)")
    duplicates = frame[PATH_COLUMN][frame[PATH_COLUMN].duplicated()].astype(str).tolist()
    if duplicates:
        raise ProbabilityFileError(f"{path} lists {len(duplicates)} path(s) twice: {_first(duplicates, len(duplicates))}")
    return frame


def _values(frame: pd.DataFrame, names: list[str], path: Path) -> np.ndarray:
    """float64 [rows, K] in the cache's class order, checked to be distributions."""
    columns = [str(c) for c in frame.columns if c != PATH_COLUMN]
    missing, extra = [n for n in names if n not in columns], [c for c in columns if c not in names]
    if missing or extra:
        raise ProbabilityFileError(
            f"{path}: the class columns must be exactly the cache's {len(names)} class names"
            + (f"; missing: {_first(missing, len(missing))}" if missing else "")
            + (f"; not a class of this cache: {_first(extra, len(extra))}" if extra else ""))
    try:
        values = frame[names].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise ProbabilityFileError(f"{path}: a class column holds something that is not a number") from None
    bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1)
    sums = values.sum(axis=1)
    bad |= np.abs(sums - 1.0) > SUM_TOLERANCE
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise ProbabilityFileError(
            f"{path}: {int(bad.sum())} row(s) are not probabilities (finite, >= 0, summing to 1 within "
            f"{SUM_TOLERANCE:g}); first: line {row + 2} ({frame[PATH_COLUMN].iloc[row]!r}) sums to {sums[row]:.6g}")
    return values


def read_probability_file(cache: Cache, path: Path | str) -> np.ndarray:
    """float64 [n, K]: the file's probabilities in the cache's table order and class order (see the module
    docstring). ProbabilityFileError (one line) for an unreadable file, wrong class columns, a row that is not a
    distribution, a path that is not an image of the cache, or an image of the cache without a row."""
    path = Path(path)
    names = [str(n) for n in cache.manifest.get("class_names") or []]
    frame = _read(path)
    values = _values(frame, names, path)
    given = _relative_paths(cache, frame[PATH_COLUMN].astype(str))
    listed = cache.columns(["path"])["path"].astype(str)
    unknown = given[~given.isin(set(listed))].tolist()
    if unknown:
        raise ProbabilityFileError(f"{path}: {len(unknown)} path(s) are not images of this cache (paths are "
                                   f"relative to the dataset root, as on the pages): {_first(unknown, len(unknown))}")
    missing = listed[~listed.isin(set(given))].tolist()
    if missing:
        raise ProbabilityFileError(f"{path} has no row for {len(missing)} image(s) of the cache: "
                                   f"{_first(missing, len(missing))}")
    position = pd.Series(np.arange(len(given)), index=given.to_numpy())
    return values[position.loc[listed.to_numpy()].to_numpy()]
