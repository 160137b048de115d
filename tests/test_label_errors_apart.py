"""Issue 24, item 6: label errors apart from shortcut victims. Out-of-sample probabilities from a CSV (the
reader, its one-line errors, the ranking on them against a hand-computed normalized margin), the
`label-errors` command, and the acceptance on a planted set (data/label_audit.py: real Fashion-MNIST, a
trained DemoCNN with the demo's shortcut, trousers filed as dresses, the real job and the real causal test):
flips AP >= 0.8 with at most 5 shortcut victims in the top 100, victims shown apart on the Mistakes page and
marked in the command's CSV."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cache import load
from analysis.review import (VICTIM_COLUMNS, ProbabilityFileError, label_issues, read_probability_file,
                             shortcut_victims)
from tests import helpers


def probability_csv(cache_dir: Path, path: Path, seed: int = 0) -> np.ndarray:
    """Write a valid CSV of random distributions (rows shuffled, class columns reversed); returns them in
    the cache's table order and class order."""
    cache = load(cache_dir)
    names = list(cache.manifest["class_names"])
    rng = np.random.default_rng(seed)
    values = rng.dirichlet(np.ones(len(names)), size=len(cache))
    frame = pd.DataFrame(values, columns=names)
    frame.insert(0, "path", cache.table["path"].to_numpy())
    frame.iloc[rng.permutation(len(frame))][["path", *names[::-1]]].to_csv(path, index=False)
    return values


def test_a_probability_file_is_read_in_the_caches_order_and_ranks_by_normalized_margin(small_cache: Path,
                                                                                        tmp_path: Path) -> None:
    expected = probability_csv(small_cache, tmp_path / "p.csv")
    cache = load(small_cache)
    values = read_probability_file(cache, tmp_path / "p.csv")
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    frame = label_issues(cache, probabilities=values)
    assert frame.attrs["probabilities"] == "given" and frame.attrs["victims"] == 0 and len(frame) == len(cache)
    # Normalized margin by hand: (p[label] - max other p + 1) / 2.
    labels = cache.table["label"].to_numpy()
    given = expected[np.arange(len(labels)), labels]
    other = np.where(np.eye(expected.shape[1], dtype=bool)[labels], -np.inf, expected).max(axis=1)
    by_hand = pd.Series((given - other + 1) / 2, index=cache.table["id"].to_numpy())
    np.testing.assert_allclose(frame["label_quality"], by_hand.loc[frame["id"]].to_numpy(), rtol=1e-9)
    assert frame["id"].tolist() == by_hand.sort_values(kind="stable").index.tolist()


def test_an_absolute_path_inside_the_dataset_root_is_accepted(small_cache: Path, tmp_path: Path) -> None:
    cache = load(small_cache)
    expected = probability_csv(small_cache, tmp_path / "p.csv")
    frame = pd.read_csv(tmp_path / "p.csv")
    frame["path"] = [str(Path(cache.manifest["dataset"]["root"]) / p) for p in frame["path"]]
    frame.to_csv(tmp_path / "absolute.csv", index=False)
    np.testing.assert_allclose(read_probability_file(cache, tmp_path / "absolute.csv"), expected, rtol=1e-12)


def _broken(frame: pd.DataFrame, case: str) -> pd.DataFrame:
    if case == "unknown path":
        return frame.assign(path=["nowhere/x.png"] + frame["path"].tolist()[1:])
    if case == "missing image":
        return frame.iloc[1:]
    if case == "missing class":
        return frame.drop(columns=frame.columns[1])
    if case == "extra column":
        return frame.assign(zebra=0.0)
    if case == "row sum":
        changed = frame.copy()
        changed.iloc[3, 1] += 0.01
        return changed
    if case == "negative":
        changed = frame.copy()
        changed.iloc[2, 1], changed.iloc[2, 2] = -0.5, changed.iloc[2, 2] + changed.iloc[2, 1] + 0.5
        return changed
    if case == "duplicate":
        return pd.concat([frame, frame.iloc[:1]])
    if case == "no path column":
        return frame.rename(columns={"path": "file"})
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("unknown path", "1 path(s) are not images of this cache (paths are relative to the dataset root, as on the "
                     "pages): 'nowhere/x.png'"),
    ("missing image", "has no row for 1 image(s) of the cache"),
    ("missing class", "the class columns must be exactly the cache's 3 class names; missing:"),
    ("extra column", "not a class of this cache: 'zebra'"),
    ("row sum", "1 row(s) are not probabilities (finite, >= 0, summing to 1 within 0.001); first: line 5"),
    ("negative", "1 row(s) are not probabilities"),
    ("duplicate", "lists 1 path(s) twice"),
    ("no path column", "has no 'path' column"),
])
def test_a_bad_probability_file_is_one_line_naming_the_problem(small_cache: Path, tmp_path: Path, case: str,
                                                               message: str) -> None:
    probability_csv(small_cache, tmp_path / "p.csv")
    frame = pd.read_csv(tmp_path / "p.csv")
    _broken(frame, case).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ProbabilityFileError) as error:
        read_probability_file(load(small_cache), tmp_path / "bad.csv")
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_missing_probability_file_or_a_folder_is_one_line(small_cache: Path, tmp_path: Path) -> None:
    for path, message in ((tmp_path / "nowhere.csv", f"{tmp_path / 'nowhere.csv'}: no such file"),
                          (tmp_path, f"{tmp_path} is not a file")):
        with pytest.raises(ProbabilityFileError) as error:
            read_probability_file(load(small_cache), path)
        assert str(error.value) == message


def test_region_share_is_the_descriptor_mass_on_the_prototypes_top_cells() -> None:
    from analysis.review.shortcut_victims import region_shares

    prototype = np.zeros((10, 10))
    prototype[0, :5] = [5, 4, 3, 2, 1]       # top 5% of 100 cells = the 5 cells of row 0, columns 0-4
    descriptors = np.zeros((3, 100))
    descriptors[0, [0, 1, 50]] = [0.2, 0.3, 0.5]     # half on the region
    descriptors[1, 5] = 1.0                           # next to it: none
    descriptors[2, :5] = 0.2                          # all of it
    np.testing.assert_allclose(region_shares(descriptors, prototype.reshape(-1), q=5.0), [0.5, 0.0, 1.0])
    # q = 2%: only the two strongest cells
    np.testing.assert_allclose(region_shares(descriptors, prototype.reshape(-1), q=2.0), [0.5, 0.0, 0.4])


def test_without_a_verified_shortcut_nothing_is_set_apart(small_cache: Path) -> None:
    cache = load(small_cache)
    assert shortcut_victims(cache).empty and list(shortcut_victims(cache).columns) == list(VICTIM_COLUMNS)
    assert label_issues(cache).attrs["victims"] == 0 and len(label_issues(cache)) == len(cache)


def run_command(*args: str) -> subprocess.CompletedProcess:
    """`python -m analysis label-errors ARGS`, in this process."""
    code, out, err = helpers.run_command("label-errors", *args)
    return subprocess.CompletedProcess(["label-errors", *args], code, out, err)


def test_the_command_refuses_a_bad_file_or_an_existing_output_in_one_line(small_cache: Path, tmp_path: Path) -> None:
    probability_csv(small_cache, tmp_path / "p.csv")
    pd.read_csv(tmp_path / "p.csv").iloc[1:].to_csv(tmp_path / "bad.csv", index=False)
    done = run_command("--cache", str(small_cache), "--probabilities", str(tmp_path / "bad.csv"))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "has no row for 1 image(s)" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "taken.csv").write_text("keep me")
    done = run_command("--cache", str(small_cache), "--out", str(tmp_path / "taken.csv"))
    assert done.returncode == 2 and "exists" in done.stderr and (tmp_path / "taken.csv").read_text() == "keep me"
    done = run_command("--cache", str(small_cache), "--probabilities", str(tmp_path / "p.csv"), "--out",
                       str(tmp_path / "ranking.csv"), "--top", "3")
    assert done.returncode == 0, done.stderr
    written = pd.read_csv(tmp_path / "ranking.csv", keep_default_na=False)
    expected = label_issues(load(small_cache), probabilities=read_probability_file(load(small_cache),
                                                                                   tmp_path / "p.csv"))
    assert written["id"].tolist() == expected["id"].tolist() and set(written["shortcut_victim"]) == {""}
    assert "given out-of-sample" in done.stdout and "0 shortcut victims set apart" in done.stdout


# ----------------------------------------------------------------------------------------------------------
# Acceptance on the planted set (trains a model: about a minute on one core)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    from data import fashion_mnist
    from data.label_audit import AuditRecipe, build

    if not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
        pytest.skip(f"Fashion-MNIST is not installed in {fashion_mnist.DEBIAN_DIR}")
    return build(tmp_path_factory.mktemp("planted"), AuditRecipe(seed=0))


@pytest.mark.slow
def test_flips_rank_first_and_shortcut_victims_are_set_apart(planted: tuple[Path, pd.DataFrame]) -> None:
    from data.label_audit import measure, true_victims

    cache_dir, truth = planted
    frame = measure(cache_dir, truth).set_index("method")
    info = frame.attrs
    # Measured with torch.set_num_threads(1), normalized margin, victims apart: AP 0.924 (seed 0) and 0.911
    # (seed 2), 0 victims in the top 100 for both. Left in, the victims take 22 of the top 100 (both seeds)
    # and the AP is 0.869 / 0.797: the last assert shows the test could fail without setting them apart.
    assert frame.loc["normalized_margin", "ap_apart"] >= 0.8, frame
    assert frame.loc["normalized_margin", "victims_top100_apart"] <= 5, frame
    assert frame.loc["normalized_margin", "victims_top100_mixed"] >= 10, frame
    # The victims set apart are the planted ones: 91 of 91 (seed 0) and 82 of 82 (seed 2), none wrongly.
    assert info["victims_precision"] >= 0.95 and info["victims_recall"] >= 0.8, info
    assert true_victims(truth).sum() >= 50


@pytest.mark.slow
def test_the_command_marks_the_victims_and_the_page_shows_them_apart(planted: tuple[Path, pd.DataFrame],
                                                                     tmp_path: Path, monkeypatch) -> None:
    cache_dir, truth = planted
    done = run_command("--cache", str(cache_dir), "--out", str(tmp_path / "ranking.csv"))
    assert done.returncode == 0, done.stderr
    written = pd.read_csv(tmp_path / "ranking.csv", keep_default_na=False)
    victims = shortcut_victims(load(cache_dir))
    marked = written[written["shortcut_victim"] != ""]
    assert sorted(marked["id"]) == victims["id"].tolist() and (marked["rank"] == "").all()
    assert marked["shortcut_victim"].str.contains("verified shortcut").all()
    ranked = written[written["shortcut_victim"] == ""]
    assert ranked["rank"].astype(int).tolist() == list(range(1, len(ranked) + 1))
    assert f"{len(victims)} shortcut victims set apart" in done.stdout

    at = helpers.open_page(monkeypatch, cache_dir, "mistakes", {"mk_view": "label_errors"})
    assert not at.exception, [e.value for e in at.exception]
    assert any(h.value == f"Shortcut victims, set apart: {len(victims):,}" for h in at.subheader)
    ranking = [d.value for d in at.dataframe if "label_quality" in d.value.columns][0]
    apart = [d.value for d in at.dataframe if "finding" in d.value.columns][0]
    assert sorted(apart["id"]) == victims["id"].tolist() and not set(apart["id"]) & set(ranking["id"])
    assert len(ranking) + len(apart) == len(truth)
