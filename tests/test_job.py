"""The offline job end to end: real images on disk, real tiny CNNs, the real FG-CAM engine, real subprocesses
(kill -9, torchrun with 2 CPU processes, a reader while the job writes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.__main__ import main
from analysis.cache import CacheError, load
from analysis.fgcam import FGCAM
from analysis.pipeline.models import load_model, weights_sha256
from analysis.pipeline.scores import all_scores, resize_maps, top_pixel_count
from analysis.pipeline.datasets import load_image, to_model_mode
from tests.helpers import (CLASS_NAMES, REPO_ROOT, TINY_MODEL_FILE, cell_majority, job_arguments, job_command,
                           make_image_folder, make_mask_folder, run_command, run_main, small_cache_arguments,
                           square_box)

TINY = f"{TINY_MODEL_FILE}:tiny_cnn"


def run_inprocess(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """The command in this process -> (exit code, stderr)."""
    code, _, err = run_main(capsys, *argv)
    return code, err


def explain_args(data: Path, out: Path, *extra: str, model: str = TINY) -> list[str]:
    return ["explain", "--data", str(data), "--model", model, "--out", str(out), "--device", "cpu",
            "--workers", "0", "--batch-size", "4", "--map-size", "10", "--descriptor-size", "2", "--quiet",
            "--no-cluster", *extra]   # the clustering is tested on the session cache (about 15 s a run here)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 4 RGB images of 20 x 20, with a mask folder next to them (images/../masks)."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "images", per_class=4, size=20)
    make_mask_folder(root / "images", root / "masks", size=20)
    return root / "images"


@pytest.fixture(scope="module")
def trained(small_cache: Path) -> list[str]:
    """--checkpoint of the tiny CNN trained for the session cache (an untrained one may give no positive
    relevance at all, and so NaN scores)."""
    return ["--checkpoint", str(small_cache.parent / "tiny_cnn.pth")]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **extra}


def assert_same_predictions(table, reference, margin: float = 1e-4) -> None:
    """Two caches of the same images made with other batch sizes predict the same class wherever the reference's
    two best probabilities are more than `margin` apart (a near-tie may fall either way when a batching changes
    the logits' last bits; such rows are left out, and they must be few)."""
    top = np.stack(reference["top5_probs"])
    decisive = top[:, 0] - top[:, 1] > margin
    assert decisive.sum() >= len(reference) - 2
    np.testing.assert_array_equal(table["pred"].to_numpy()[decisive], reference["pred"].to_numpy()[decisive])


def committed_shard_count(out: Path) -> int:
    shards = out / "shards"
    return sum(1 for p in shards.iterdir() if p.name.startswith("shard-")) if shards.is_dir() else 0


# ----------------------------------------------------------------------------------------------------------
# The session cache, checked against a direct computation
# ----------------------------------------------------------------------------------------------------------

def test_small_cache_matches_a_direct_computation(small_cache: Path) -> None:
    parent = small_cache.parent
    cache = load(small_cache)
    table = cache.table
    assert cache.complete and list(table["id"]) == list(range(24))
    assert table["path"].tolist()[:2] == ["cat/img_000.png", "cat/img_001.png"]
    assert cache.manifest["counts"] == {"images": 24, "explained": 24, "errors": 0,
                                        "correct": int(table["correct"].sum())}
    assert cache.manifest["class_names"] == list(CLASS_NAMES)
    for key in ("format_version", "created", "updated", "finished", "model", "dataset", "options", "class_names",
                "counts", "software"):
        assert key in cache.manifest
    assert cache.manifest["options"]["cam_layer"] == "features.3"
    # trained, with mislabelled images: 21 of 24 correct measured with FGCAM_TEST_SEED 0 and 2 (the 3 mislabelled)
    assert not (table["correct"]).all() and table["correct"].sum() >= 12
    assert [p.name for p in small_cache.glob("compact-*")] == ["compact-000001"]
    assert not list((small_cache / "shards").iterdir())

    loaded = load_model(TINY, checkpoint=parent / "tiny_cnn.pth")
    assert cache.manifest["model"]["weights_sha256"] == loaded.weights_sha256
    explainer = FGCAM(loaded.model)
    # The direct computation runs the job's own batches (--batch-size 8: ids 0-7, 8-15, 16-23): a top-k score or
    # an argmax can flip on a near-tie when another batching changes the last bits, identical batches cannot.
    batch_size = cache.manifest["options"]["batch_size"]
    assert batch_size == 8
    x = torch.stack([loaded.transform(to_model_mode(load_image(parent / "images" / path), 3)) for path in table.path])
    labels = torch.tensor(table.label.tolist())
    fg = np.stack([cell_majority(np.asarray(Image.open(parent / "masks" / path)) > 0, 16)
                   for path in table.path])
    logits, maps, true_maps, wrong, scores = [], [], [], [], {}
    for start in range(0, 24, batch_size):
        rows = slice(start, start + batch_size)
        result = explainer(x[rows])
        batch_maps = resize_maps(result.maps, 16)
        batch_wrong = result.classes != labels[rows]
        logits.append(result.logits)
        maps.append(batch_maps.numpy())
        wrong.append(batch_wrong.numpy())
        true_maps.append(resize_maps(explainer(x[rows][batch_wrong], classes=labels[rows][batch_wrong]).maps,
                                     16).numpy())
        for name, values in all_scores(batch_maps, torch.from_numpy(fg[rows]),
                                       torch.ones(batch_size, dtype=torch.bool)).items():
            scores.setdefault(name, []).append(values.numpy())
    probs = torch.softmax(torch.cat(logits), 1)
    maps, true_maps, wrong = np.concatenate(maps), np.concatenate(true_maps), np.concatenate(wrong)
    np.testing.assert_array_equal(table.pred, probs.argmax(1).numpy())
    np.testing.assert_allclose(table.confidence, probs.max(1).values.numpy(), rtol=1e-6)
    # Every class's probability, stored as float16 (11 significant bits) for the label-error ranking.
    np.testing.assert_allclose(cache.probabilities(table.id), probs.numpy(), rtol=2.0 ** -10, atol=1e-7)
    np.testing.assert_array_equal(np.stack(table.top5_classes), probs.topk(3).indices.numpy())
    np.testing.assert_allclose(cache.maps(table.id), maps, atol=float(np.abs(maps).max()) * 2e-3, rtol=0)
    ids = np.nonzero(wrong)[0]
    assert set(ids) >= {7, 15, 23}, "the mislabelled images must be misclassified"
    np.testing.assert_allclose(cache.maps(ids, "true"), true_maps, atol=float(np.abs(true_maps).max()) * 2e-3, rtol=0)
    assert not np.allclose(cache.maps(ids, "true"), cache.maps(ids, "pred"))

    # Foreground: the map cells the mask PNG covers at least half of; scores from the float32 maps.
    np.testing.assert_array_equal(cache.foreground(table.id), fg)
    for name, values in scores.items():
        np.testing.assert_allclose(table[name], np.concatenate(values), rtol=1e-6, atol=1e-7, err_msg=name)
    ids = [0, 7, 15, 23]
    desc = cache.descriptors(ids)
    assert desc.shape == (4, 16) and np.allclose(desc.sum(1), 1.0)
    assert cache.image_path(7) == (parent / "images" / table.path[7]).resolve()


# ----------------------------------------------------------------------------------------------------------
# Crash and resume, concurrent readers, ranks
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_every_image_once(small_cache: Path, tmp_path: Path) -> None:
    data = small_cache.parent / "images"
    out = tmp_path / "cache"
    checkpoint = ["--checkpoint", str(small_cache.parent / "tiny_cnn.pth")]
    command = job_command(data, out, "--batch-size", "2", "--map-size", "8", "--quiet", "--no-cluster",
                          *checkpoint)  # 12 shards
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(EXPLAIN_TEST_SLEEP="0.12"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed_shard_count(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the job ended before it could be killed: " + process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    committed = committed_shard_count(out)
    assert 3 <= committed < 12
    partial = load(out)
    assert not partial.complete
    ids = partial.ids
    assert len(ids) == 2 * committed  # whole shards only
    assert set(ids) == {i for s in ids // 2 for i in (2 * s, 2 * s + 1)}

    # run again at once (in this process: a resume needs no process of its own)
    code, _, err = run_command(*job_arguments(data, out, "--batch-size", "2", "--map-size", "8", "--no-cluster",
                                              *checkpoint))
    assert code == 0, err
    assert f"resuming: {committed} of 12 shards already committed" in err
    cache = load(out)
    assert cache.complete
    assert cache.table["id"].tolist() == list(range(24))  # every image exactly once, in order
    assert cache.manifest["counts"]["explained"] == 24
    assert not [p for p in out.rglob(".tmp-*")]
    # The resumed cache holds the same results as an uninterrupted run (the session cache, other map size).
    assert_same_predictions(cache.table, load(small_cache).table)


@pytest.mark.slow
def test_readers_see_only_committed_shards_while_the_job_writes(small_cache: Path, tmp_path: Path) -> None:
    data = small_cache.parent / "images"
    out = tmp_path / "cache"
    command = job_command(data, out, "--batch-size", "3", "--map-size", "8", "--quiet", "--no-cluster")  # 8 shards of 3
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(EXPLAIN_TEST_SLEEP="0.05"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sizes = set()
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if (out / "manifest.json").exists():
            cache = load(out)  # must never fail, whatever the job is doing
            ids = cache.ids
            assert len(set(ids)) == len(ids)
            for shard in set(ids // 3):  # a shard is visible whole or not at all
                assert {3 * shard, 3 * shard + 1, 3 * shard + 2} <= set(ids)
            if len(ids):
                maps = cache.maps(ids)
                assert np.isfinite(maps).all()
            if len(ids) < 24:
                assert not cache.complete
            sizes.add(len(ids))
        time.sleep(0.01)
    assert process.wait(timeout=60) == 0, process.stderr.read().decode()
    process.stderr.close()
    assert len(sizes - {0, 24}) >= 2, f"no intermediate state observed: {sorted(sizes)}"
    final = load(out)
    assert final.complete and final.table["id"].tolist() == list(range(24))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_share_the_dataset(small_cache: Path, tmp_path: Path) -> None:
    data = small_cache.parent / "images"
    out = tmp_path / "cache"
    # `explain ...` (no --quiet: rank lines)
    explain = job_command(data, out, "--batch-size", "2", "--shard-size", "4", "--map-size", "8", "--no-cluster",
                          "--checkpoint", str(small_cache.parent / "tiny_cnn.pth"))[3:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "analysis", *explain]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 6 shards of 4: rank 0 takes shards 0, 2, 4 and rank 1 shards 1, 3, 5.
    assert "rank 0: explained 12 images in 3 shards" in result.stderr
    assert "rank 1: explained 12 images in 3 shards" in result.stderr
    cache = load(out)
    assert cache.complete and cache.manifest["world_size"] == 2
    assert cache.table["id"].tolist() == list(range(24))
    assert_same_predictions(cache.table, load(small_cache).table)


# ----------------------------------------------------------------------------------------------------------
# Class order
# ----------------------------------------------------------------------------------------------------------

def test_a_model_trained_with_image_folder_on_numeric_folders_gets_its_classes(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """Folders 1, 2, 10: ImageFolder trains output 1 on folder "10"; the job must call output 1 "10" (a numeric
    sort would call it "2" and score every image of two classes as wrong)."""
    from torchvision.datasets import ImageFolder

    from tests.helpers import train_tiny_cnn

    data = tmp_path / "images"
    make_image_folder(data, classes=("1", "2", "10"), per_class=8)
    checkpoint = train_tiny_cnn(data, tmp_path / "tiny.pth", steps=80)
    out = tmp_path / "cache"
    code, err = run_inprocess(capsys, *explain_args(data, out, "--checkpoint", str(checkpoint)))
    assert code == 0, err
    cache = load(out)
    assert cache.manifest["class_names"] == ["1", "10", "2"]
    assert {name: i for i, name in enumerate(cache.manifest["class_names"])} == ImageFolder(str(data)).class_to_idx
    table = cache.table
    assert (table["label_name"] == table["path"].str.split("/").str[0]).all()
    # measured 1.0 with FGCAM_TEST_SEED 0 and 2, 1 and 2 threads
    assert table["correct"].mean() >= 0.9, table[["path", "label_name", "pred_name"]]


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_corrupt_files_are_recorded_and_odd_modes_explained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "images"
    make_image_folder(data, per_class=4, modes=("RGB", "L", "RGBA", "P", "I;16", "I"))
    (data / "cat" / "zero.png").write_bytes(b"")
    png = (data / "cat" / "img_000.png").read_bytes()
    (data / "dog" / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "fox" / "text.jpg").write_text("not a jpeg")
    code, err = run_inprocess(capsys, *explain_args(data, tmp_path / "cache"))
    assert code == 0, err
    cache = load(tmp_path / "cache")
    assert cache.complete
    errors = cache.errors.set_index("path")["reason"].to_dict()
    assert set(errors) == {"cat/zero.png", "dog/truncated.png", "fox/text.jpg"}
    assert errors["cat/zero.png"] == "unreadable image: zero-byte file"
    assert all(reason.startswith("unreadable image:") for reason in errors.values())
    explained = set(cache.table["path"])
    assert len(explained) == 12 and not explained & set(errors)
    assert {Path(p).suffix for p in explained} == {".png", ".tif"}
    assert np.isfinite(cache.maps(cache.ids)).all()
    assert cache.manifest["counts"] == {"images": 15, "explained": 12, "errors": 3,
                                        "correct": int(cache.table["correct"].sum())}
    # ids index the sorted list including the skipped files: no id is used twice or lost.
    assert sorted(list(cache.ids) + list(cache.errors["id"])) == list(range(15))


def test_a_shard_of_only_unreadable_images_with_masks_is_committed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   trained: list[str]) -> None:
    data = tmp_path / "images"
    make_image_folder(data, per_class=4)
    make_mask_folder(data, tmp_path / "masks")
    for path in sorted((data / "cat").iterdir()):   # ids 0-3: the whole first shard
        path.write_bytes(b"")
    code, err = run_inprocess(capsys, *explain_args(data, tmp_path / "cache", "--masks", str(tmp_path / "masks"),
                                                    "--shard-size", "4", *trained))
    assert code == 0, err
    cache = load(tmp_path / "cache")
    assert cache.complete and sorted(cache.errors["id"]) == [0, 1, 2, 3] and cache.ids.tolist() == list(range(4, 12))
    assert cache.foreground(cache.ids).shape == (8, 10, 10) and cache.probabilities().shape == (8, 3)


def test_mask_folder_with_a_wrong_size_and_a_missing_mask(images: Path, tmp_path: Path, trained: list[str],
                                                          capsys: pytest.CaptureFixture) -> None:
    masks = tmp_path / "masks"
    shutil.copytree(images.parent / "masks", masks)
    Image.new("L", (13, 9)).save(masks / "dog" / "img_002.png")
    (masks / "fox" / "img_001.png").unlink()
    code, err = run_inprocess(capsys, *explain_args(images, tmp_path / "cache", "--masks", str(masks), *trained))
    assert code == 0, err
    cache = load(tmp_path / "cache")
    assert cache.errors["path"].tolist() == ["dog/img_002.png"]
    assert "mask dog/img_002.png is 13x9, the image is 20x20" in cache.errors["reason"][0]
    table = cache.table.set_index("path")
    assert len(table) == 11
    row = table.loc["fox/img_001.png"]
    assert not row.has_foreground and np.isnan(row.background_share) and np.isnan(row.background_hotspot)
    assert not cache.foreground([int(row.id)]).any()
    others = table.drop(index="fox/img_001.png")
    assert others.has_foreground.all() and np.isfinite(others.background_share).all()
    # The stored foreground is the object square (see helpers.square_box) at the 10 x 10 map size.
    x0, y0, x1, y1 = square_box(0, 1, 20)
    expected = np.zeros((20, 20), bool)
    expected[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(cache.foreground([int(table.loc["cat/img_001.png"].id)])[0],
                                  cell_majority(expected, 10))


def test_boxes_file_and_manifest_boxes_give_the_mask_foreground(images: Path, tmp_path: Path, trained: list[str],
                                                                capsys: pytest.CaptureFixture) -> None:
    rows = ["path,x0,y0,x1,y1"]
    manifest = ["path,label,x0,y0,x1,y1"]
    for c, name in enumerate(CLASS_NAMES):
        for k in range(4):
            box = ",".join(map(str, square_box(c, k, 20)))
            rows.append(f"{name}/img_{k:03d}.png,{box}")
            manifest.append(f"{name}/img_{k:03d}.png,{name},{box}")
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    (images / "list.csv").write_text("\n".join(manifest) + "\n")  # at the top of the image tree
    full_size = ["--map-size", "20"]  # the 20 x 20 maps themselves: 20 top pixels for background_hotspot
    try:
        runs = {
            "masks": explain_args(images, tmp_path / "masks_cache", "--masks", str(images.parent / "masks"),
                                  *trained, *full_size),
            "boxes": explain_args(images, tmp_path / "boxes_cache", "--boxes", str(tmp_path / "boxes.csv"), *trained,
                                  *full_size),
            "csv": explain_args(images / "list.csv", tmp_path / "csv_cache", *trained, *full_size),
        }
        caches = {}
        for name, argv in runs.items():
            code, err = run_inprocess(capsys, *argv)
            assert code == 0, f"{name}: {err}"
            caches[name] = load(tmp_path / f"{name}_cache")
    finally:
        (images / "list.csv").unlink()
    reference = caches["masks"]
    for name in ("boxes", "csv"):
        cache = caches[name]
        assert cache.table["path"].tolist() == reference.table["path"].tolist()
        np.testing.assert_array_equal(cache.foreground(cache.ids), reference.foreground(reference.ids))
        np.testing.assert_allclose(cache.table["background_share"], reference.table["background_share"], rtol=1e-5)
        # A rank statistic: each cache ran its own job, and a near-tie at the top-20 boundary may fall either way
        # when two runs differ in the last bits; such a flip moves the score by one pixel of 20, nothing else can.
        np.testing.assert_allclose(cache.table["background_hotspot"], reference.table["background_hotspot"],
                                   rtol=0, atol=1 / top_pixel_count(20 * 20) + 1e-6)
    assert np.isfinite(reference.table["background_share"]).all()
    assert caches["csv"].manifest["dataset"]["kind"] == "csv"
    assert caches["boxes"].manifest["options"]["boxes"] == str((tmp_path / "boxes.csv").resolve())


# ----------------------------------------------------------------------------------------------------------
# Options: resume, mismatch, overwrite, limit
# ----------------------------------------------------------------------------------------------------------

def test_option_mismatch_is_refused_same_options_resume_overwrite_replaces(
        small_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    argv = small_cache_arguments(small_cache.parent)
    argv[argv.index("--out") + 1] = str(copy)
    before = (copy / "manifest.json").read_text()

    changed = list(argv)
    changed[changed.index("--map-size") + 1] = "32"
    code, err = run_inprocess(capsys, *changed, "--base", "layercam")
    assert code == 2
    assert err.count("\n") == 1 and "--map-size 16 -> 32" in err and "--base 'gradcam' -> 'layercam'" in err
    assert "use --overwrite" in err
    assert (copy / "manifest.json").read_text() == before

    # Same options (another batch size is fine): nothing left to do, nothing duplicated.
    same = list(argv)
    same[same.index("--batch-size") + 1] = "5"
    code, err = run_inprocess(capsys, *same)
    assert code == 0, err
    cache = load(copy)
    assert cache.table["id"].tolist() == list(range(24)) and cache.complete
    assert cache.manifest["created"] == json.loads(before)["created"]
    assert cache.manifest["options"]["shard_size"] == 8  # kept from the existing cache

    code, err = run_inprocess(capsys, *changed, "--overwrite", "--no-cluster")   # the clustering: ~15 s, not read
    assert code == 0, err
    cache = load(copy)
    assert cache.maps([0]).shape == (1, 32, 32) and cache.table["id"].tolist() == list(range(24))


def test_changed_dataset_is_refused_and_limit_is_evenly_spaced(images: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "images"
    shutil.copytree(images, data)
    out = tmp_path / "cache"
    code, err = run_inprocess(capsys, *explain_args(data, out, "--limit", "6"))
    assert code == 0, err
    cache = load(out)
    assert cache.table["path"].tolist() == [f"{c}/img_{k:03d}.png" for c in CLASS_NAMES for k in (0, 2)]
    assert cache.manifest["dataset"]["n_images"] == 6 and cache.manifest["dataset"]["n_listed"] == 12
    shutil.copy(data / "cat" / "img_000.png", data / "cat" / "img_100.png")
    code, err = run_inprocess(capsys, *explain_args(data, out, "--limit", "6"))
    assert code == 2 and "dataset files" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# Setup errors: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------

SETUP_ERRORS = [
    (["--model", "nope"], "expected torchvision:NAME"),
    (["--model", "torchvision:resnet999"], "torchvision has no model 'resnet999'"),
    (["--model", f"{TINY_MODEL_FILE}:missing"], "has no callable 'missing'"),
    (["--model", "no/such/file.py:build"], "no such file"),
    (["--model", "tests.tiny_models:not_a_model"], "returned str"),
    (["--model", "no_such_package.models:build"], "cannot import no_such_package.models"),
    (["--target-layer", "features.9"], "unknown layer 'features.9'"),
    (["--cam-layer", "nope"], "unknown layer 'nope'"),
    (["--data", "{tmp}/missing"], "no such file or directory"),
    (["--masks", "{tmp}/missing"], "--masks {tmp}/missing: no such file"),
    (["--model", f"{TINY_MODEL_FILE}:tiny_cnn_ten"], "the model has 10 outputs but the dataset has 3 classes"),
    (["--classes", "{tmp}/classes.txt"], "dataset labels not listed: fox"),
    (["--model", f"{TINY_MODEL_FILE}:tiny_cnn_random_transform", "--masks", "{masks}"],
     "foreground masks/boxes cannot be placed: the preprocessing is not a deterministic resize/crop"),
    (["--weights", "IMAGENET1K_V1"], "--weights applies to torchvision"),
    (["--model", "torchvision:resnet18", "--weights", "NOPE"], "not a weights name of torchvision resnet18"),
    (["--checkpoint", "{tmp}/wrong.pth"], "does not fit the model"),
    (["--base", "nope"], "invalid choice: 'nope'"),
    (["--batch-size", "0"], "expected a positive integer"),
    (["--out", "{tmp}/a_file"], "exists and is not a directory"),
    (["--out", "{tmp}/not_a_cache"], "holds no explanation cache"),
]


@pytest.mark.parametrize("extra, message", SETUP_ERRORS, ids=[m for _, m in SETUP_ERRORS])
def test_setup_errors_are_one_line_before_any_work(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   extra: list[str], message: str) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_a_cache").mkdir()
    (tmp_path / "not_a_cache" / "thesis.tex").write_text("precious")
    fill = {"tmp": str(tmp_path), "masks": str(images.parent / "masks")}
    extra = [e.format(**fill) for e in extra]
    out = tmp_path / "cache"
    argv = explain_args(images, out)
    for option in ("--model", "--data", "--out"):  # later values override: keep one of each
        if option in extra:
            at = argv.index(option)
            del argv[at:at + 2]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_inprocess(capsys, *argv, *extra)
    assert code == 2
    assert message.format(**fill) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "not_a_cache" / "thesis.tex").read_text() == "precious"


def test_setup_error_in_a_real_process_has_no_traceback(images: Path, tmp_path: Path) -> None:
    result = subprocess.run(job_command(images, tmp_path / "cache", "--target-layer", "nope"), cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown layer 'nope'") and result.stderr.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_cuda_requested_without_cuda(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = explain_args(images, tmp_path / "cache")
    argv[argv.index("--device") + 1] = "cuda"
    code, err = run_inprocess(capsys, *argv)
    assert code == 2 and "CUDA is not available here; use --device cpu" in err
    assert not (tmp_path / "cache").exists()


def test_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["explain", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--data", "--model", "--out", "--base", "--target-layer", "--cam-layer", "--denoise",
                   "--batch-size", "--device", "--workers", "--map-size", "--descriptor-size", "--masks",
                   "--boxes", "--classes", "--limit", "--overwrite", "--shard-size", "--weights", "--checkpoint",
                   "--num-classes", "--image-size", "--mean", "--std"):
        assert option in text
    assert "(default: 64)" in text and "(default: input)" in text and "(default: gradcam)" in text


# ----------------------------------------------------------------------------------------------------------
# Model specs
# ----------------------------------------------------------------------------------------------------------

def test_torchvision_model_with_a_wrapped_checkpoint(images: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=3)
    # A DDP-style checkpoint: {"state_dict": {"module.<name>": ...}}.
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "r18.pth")
    code, err = run_inprocess(capsys, *explain_args(
        images, tmp_path / "cache", "--limit", "3", "--image-size", "32", "--checkpoint", str(tmp_path / "r18.pth"),
        "--num-classes", "3", model="torchvision:resnet18"))
    assert code == 0, err
    cache = load(tmp_path / "cache")
    assert cache.manifest["model"]["weights_sha256"] == weights_sha256(model.eval())
    assert cache.manifest["options"]["cam_layer"] == "layer4.1"  # the engine's default: last block of layer4
    assert cache.manifest["options"]["preprocessing"] == "options"
    assert cache.maps(cache.ids).shape == (3, 10, 10) and len(cache.table) == 3


def test_the_weights_fingerprint_is_the_sha256_of_the_state_dicts_names_and_bytes() -> None:
    """Computed here independently (hashlib over each tensor's name, dtype, shape and bytes, in key order), for
    float, integer (a BatchNorm's counter) and bfloat16 tensors: caches fingerprinted before keep their value."""
    import hashlib

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    for candidate in (model, torch.nn.Sequential(torch.nn.Linear(3, 2)).to(torch.bfloat16)):
        digest = hashlib.sha256()
        for name in sorted(candidate.state_dict()):
            tensor = candidate.state_dict()[name]
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor   # numpy has no bfloat16
            digest.update(raw.numpy().tobytes())
        assert weights_sha256(candidate) == digest.hexdigest()
    before = weights_sha256(model)
    with torch.no_grad():
        model[2].bias[0] += 1e-3
    assert weights_sha256(model) != before


def test_gray_model_and_bare_model_with_image_size(images: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    code, err = run_inprocess(capsys, *explain_args(images, tmp_path / "gray",
                                                    model=f"{TINY_MODEL_FILE}:tiny_cnn_gray"))
    assert code == 0, err
    assert len(load(tmp_path / "gray").table) == 12
    code, err = run_inprocess(capsys, *explain_args(images, tmp_path / "bare", "--image-size", "12", "--mean", "0.5",
                                                    "--std", "0.25", model=f"{TINY_MODEL_FILE}:tiny_cnn_bare"))
    assert code == 0, err
    cache = load(tmp_path / "bare")
    assert cache.manifest["options"]["image_size"] == 12 and cache.manifest["options"]["mean"] == [0.5]
    assert len(cache.table) == 12


def test_load_errors_of_a_cache_directory(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not found"):
        load(tmp_path / "nothing")


def test_faithfulness_columns_match_a_direct_computation(images: Path, tmp_path: Path, trained: list[str],
                                                         capsys: pytest.CaptureFixture) -> None:
    from analysis.pipeline.faithfulness import faithfulness_scores
    out = tmp_path / "cache"
    code, err = run_inprocess(capsys, *explain_args(images, out, "--faithfulness", "4", *trained))
    assert code == 0, err
    cache = load(out)
    assert cache.manifest["options"]["faithfulness_steps"] == 4
    table = cache.table
    loaded = load_model(TINY, checkpoint=Path(trained[1]))
    explainer = FGCAM(loaded.model)
    x = torch.stack([loaded.transform(to_model_mode(load_image(images / path), 3)) for path in table.path])
    # The job's batches (--batch-size 4): the pixel order of a curve is a ranking of the map, which a near-tie
    # can flip when another batching changes the map's last bits; on identical batches it cannot.
    expected: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x), 4):
        result = explainer(x[start:start + 4])
        for name, values in faithfulness_scores(loaded.model, x[start:start + 4], result.maps, result.classes,
                                                steps=4).items():
            expected.setdefault(name, []).append(values)
    for name in ("deletion_auc", "insertion_auc"):
        np.testing.assert_allclose(table[name], np.concatenate(expected[name]), rtol=1e-5, atol=1e-7)
    # without the option the columns are NaN, and the option is part of the cache's identity
    assert not np.isnan(table['deletion_auc']).any()
    code, err = run_inprocess(capsys, *explain_args(images, out, *trained))
    assert code == 2 and "--faithfulness-steps 4 -> 0" in err
