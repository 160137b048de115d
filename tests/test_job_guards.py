"""What keeps a cache right when users do what users do: two jobs on one --out (real processes), shards left
without a manifest, a transform edited between a killed run and its resume, a damaged shard, a read-only
--out, files in another encoding, a garbage checkpoint. Real jobs on real files, as in tests/test_job.py."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.cache import load
from tests.helpers import (REPO_ROOT, TINY_MODEL_FILE, job_arguments, job_command, make_image_folder,
                           run_command, run_main)

TINY = f"{TINY_MODEL_FILE}:tiny_cnn"


def explain_args(data: Path, out: Path, *extra: str, model: str = TINY) -> list[str]:
    return ["explain", "--data", str(data), "--model", model, "--out", str(out), "--device", "cpu",
            "--workers", "0", "--batch-size", "4", "--map-size", "10", "--descriptor-size", "2", "--quiet",
            "--no-cluster", *extra]   # the clustering is tested on the session cache (about 15 s a run here)


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    make_image_folder(root / "images", per_class=4, size=20)
    return root / "images"


JOB_OPTIONS = ("--batch-size", "2", "--map-size", "8", "--quiet", "--no-cluster")   # every job of this file


def run_job(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
            model: str = TINY) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(data, out, *JOB_OPTIONS, *extra, model=model),
                          cwd=REPO_ROOT, env=subprocess_env(**(env or {})), capture_output=True, text=True,
                          timeout=300)


def run_job_here(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """run_job in this process: for the runs that need no process of their own (3-5 s of imports less)."""
    arguments = job_arguments(data, out, *JOB_OPTIONS, *extra, model=TINY)
    code, out_text, err = run_command(*arguments)
    return subprocess.CompletedProcess(arguments, code, out_text, err)


def killed_half_way(data: Path, out: Path, *extra: str, model: str = TINY) -> int:
    """A real job that kills itself (SIGKILL) after about half of the 12 images; returns its committed shards."""
    result = run_job(data, out, *extra, model=model,
                     env={"EXPLAIN_TEST_DIE_AFTER": "5", "EXPLAIN_TEST_SHARDS": str(out / "shards")})
    assert result.returncode == -signal.SIGKILL, result.stderr
    committed = sorted(p.name for p in (out / "shards").iterdir() if p.name.startswith("shard-"))
    assert 0 < len(committed) < 6, committed
    return len(committed)


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and "Traceback" not in text


# ----------------------------------------------------------------------------------------------------------
# One writer per cache
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_job_on_a_cache_being_written_is_refused_and_a_killed_one_blocks_nothing(
        images: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    # Job A: Grad-CAM, slowed down to 3 s per image, so that it is surely still running while B starts.
    first = subprocess.Popen(job_command(images, out, "--batch-size", "2", "--map-size", "8", "--quiet"),
                             cwd=REPO_ROOT, env=subprocess_env(EXPLAIN_TEST_SLEEP="3"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        manifest_a = json.loads((out / "manifest.json").read_text())
        holder = f"pid {first.pid} on {socket.gethostname()}, started "
        # B with the same options, then B with another CAM and --overwrite: both refused, naming A.
        for extra in ([], ["--base", "layercam", "--overwrite"]):
            second = run_job_here(images, out, *extra)   # B: another process than A
            assert second.returncode == 2, second.stderr
            assert one_line(second.stderr) and "is being written by another job" in second.stderr, second.stderr
            assert holder in second.stderr, second.stderr
            assert first.poll() is None, "job A must outlive the test of B"
        assert json.loads((out / "manifest.json").read_text())["options"] == manifest_a["options"]
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock with it
        first.wait()
        first.stderr.close()
    # The killed job's lock died with it: the next job resumes at once, with A's options.
    resumed = run_job_here(images, out)
    assert resumed.returncode == 0, resumed.stderr
    cache = load(out)
    assert cache.complete and cache.manifest["options"]["base"] == "gradcam"
    assert cache.table["id"].tolist() == list(range(12))


@pytest.mark.slow
def test_torchrun_ranks_agree_when_the_cache_is_taken(images: Path, tmp_path: Path) -> None:
    """Another process holds --out: rank 0 is refused the lock and no rank starts (one message, from rank 0);
    nothing is written. (tests/test_job.py runs torchrun on a free --out: rank 1 writes under rank 0's lock.)"""
    from analysis.cache import LOCK_NAME
    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom analysis.cache import WriterLock\n"
                               "WriterLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n",
                               str(out)], cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        explain = job_arguments(images, out, "--batch-size", "2", "--map-size", "8")
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "analysis", *explain], cwd=REPO_ROOT, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        refusals = [line for line in result.stderr.splitlines() if line.startswith("error: --out")]
        assert len(refusals) == 1 and f"being written by another job (pid {holder.pid} on" in refusals[0], \
            result.stderr[-3000:]
        # The ranks ended through the one-line error path (exit code 2, not an exception's 1); the traceback
        # in torchrun's output is its launcher's, which reports any non-zero rank that way. Whichever rank exits
        # first, torchrun may stop the other with SIGTERM (-15) before it exits by itself: both are fine.
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
        assert "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_the_lock_is_refused_in_the_same_process_too_and_released(tmp_path: Path) -> None:
    from analysis.cache import WriterLock

    first, second = WriterLock(tmp_path), WriterLock(tmp_path)
    first.acquire()
    with pytest.raises(Exception, match=rf"being written by another job \(pid {os.getpid()} on "):
        second.acquire()
    first.release()
    second.acquire()
    assert second.held
    second.release()


def test_shards_without_a_manifest_are_refused_and_overwrite_removes_them(small_cache: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from tests.helpers import small_cache_arguments

    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    (copy / "manifest.json").unlink()  # e.g. copied without it, or written by something else
    argv = small_cache_arguments(small_cache.parent)
    argv[argv.index("--out") + 1] = str(copy)
    argv[argv.index("--map-size") + 1] = "8"
    before = sorted(p.name for p in copy.rglob("*"))
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and one_line(err), err
    assert "holds explanation shards but no manifest.json" in err and "--overwrite" in err
    assert sorted(p.name for p in copy.rglob("*")) == before
    code, _, err = run_main(capsys, *argv, "--overwrite", "--no-cluster")   # the clustering: ~15 s, not read
    assert code == 0, err
    cache = load(copy)
    assert cache.map_size == 8 and cache.table["id"].tolist() == list(range(24)) and cache.complete


# ----------------------------------------------------------------------------------------------------------
# The preprocessing is part of the cache's identity
# ----------------------------------------------------------------------------------------------------------

MODEL_FILE = '''
from torchvision import transforms as T
from tests.tiny_models import SlowToTensor, _model

def build():
    return _model(), T.Compose([T.Resize((20, 20)), SlowToTensor(), {last}])
'''


@pytest.mark.slow
@pytest.mark.parametrize("edit, named", [
    ("T.Normalize([0.4] * 3, [0.5] * 3)", "Normalize(mean=[0.5, 0.5, 0.5]"),   # the description changes
    ("T.Lambda(lambda x: x * 3 - 1)", "same description"),                      # only the output changes
], ids=["description", "code"])
def test_a_resume_with_an_edited_transform_is_refused(images: Path, tmp_path: Path, edit: str, named: str) -> None:
    model_file = tmp_path / "model.py"
    original = {"description": "T.Normalize([0.5] * 3, [0.5] * 3)", "code": "T.Lambda(lambda x: x * 2 - 1)"}
    last = original["code"] if "Lambda" in edit else original["description"]
    model_file.write_text(MODEL_FILE.format(last=last))
    spec = f"{model_file}:build"
    out = tmp_path / "cache"
    committed = killed_half_way(images, out, model=spec)
    stamp = (out / "manifest.json").read_text()

    model_file.write_text(MODEL_FILE.format(last=edit))
    refused = run_job(images, out, model=spec)
    assert refused.returncode == 2 and one_line(refused.stderr), refused.stderr
    assert "different options (preprocessing" in refused.stderr and named in refused.stderr, refused.stderr
    assert (out / "manifest.json").read_text() == stamp
    assert json.loads(stamp)["model"]["preprocessing"]["description"].startswith("Compose( Resize(size=(20, 20)")
    assert len(list((out / "shards").glob("shard-*"))) == committed

    model_file.write_text(MODEL_FILE.format(last=last))  # the transform it was made with: the resume goes on
    resumed = run_job(images, out, model=spec)
    assert resumed.returncode == 0, resumed.stderr
    assert load(out).table["id"].tolist() == list(range(12))


# ----------------------------------------------------------------------------------------------------------
# Damaged committed parts
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_damaged_shard_is_moved_aside_and_redone_at_the_start(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    committed = killed_half_way(images, out)
    damaged = sorted((out / "shards").glob("shard-*"))[0]
    maps = damaged / "maps_pred.npy"
    maps.write_bytes(maps.read_bytes()[:100])  # truncated, as a broken copy leaves it
    resumed = run_job_here(images, out)
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{damaged.name} of the cache cannot be read" in warnings[0], resumed.stderr
    moved = list((out / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(damaged.name) and str(moved[0]) in warnings[0]
    assert (moved[0] / "maps_pred.npy").stat().st_size == 100  # kept as found
    cache = load(out)
    assert cache.complete and cache.table["id"].tolist() == list(range(12))
    assert np.isfinite(cache.maps(cache.ids)).all()
    assert committed >= 1


@pytest.mark.slow
def test_a_damaged_compaction_is_moved_aside_and_its_images_redone(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    assert run_job_here(images, out).returncode == 0
    compaction = next(out.glob("compact-*"))
    (compaction / "table.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    resumed = run_job_here(images, out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: {compaction.name} of the cache cannot be read" in resumed.stderr
    cache = load(out)
    assert cache.complete and cache.table["id"].tolist() == list(range(12))


# ----------------------------------------------------------------------------------------------------------
# One-line errors before any work
# ----------------------------------------------------------------------------------------------------------

LATIN1 = "path,label\ncat/img_000.png,chat noir café\n".encode("latin-1")


@pytest.mark.parametrize("option, make, message", [
    ("--data", lambda tmp: (tmp / "list.csv", LATIN1), "not UTF-8 text (byte 0xe9 on line 2)"),
    ("--classes", lambda tmp: (tmp / "classes.txt", "cat\ndog\nrenard\n".encode("utf-16")),
     "not UTF-8 text (byte 0xff on line 1)"),
    ("--boxes", lambda tmp: (tmp / "boxes.csv", "path,x0,y0,x1,y1\n# Zürich\n".encode("latin-1")),
     "not UTF-8 text (byte 0xfc on line 2)"),
    ("--data", lambda tmp: (tmp / "list.csv", b"path,label,label\ncat/img_000.png,cat,dog\n"),
     "column(s) label appear more than once in the header"),
    ("--boxes", lambda tmp: (tmp / "boxes.csv", b"path,x0,y0,x1,y1,x0\n"), "column(s) x0 appear more than once"),
    ("--checkpoint", lambda tmp: (tmp / "garbage.pth", bytes(range(256)) * 4),
     "not a state dict torch can read (not a torch.save file, or damaged)"),
    ("--checkpoint", lambda tmp: (tmp / "text.pth", b"hello, I am not a checkpoint\n"),
     "not a state dict torch can read"),
    ("--checkpoint", lambda tmp: (tmp / "empty.pth", b""), "empty or truncated, not a state dict"),
    ("--checkpoint", lambda tmp: (tmp / "pickled.pth", pickle.dumps({"note": "x"}, protocol=4)),
     "not a state dict torch can read"),
], ids=["csv-latin1", "classes-utf16", "boxes-latin1", "csv-duplicate-column", "boxes-duplicate-column",
        "checkpoint-garbage", "checkpoint-text", "checkpoint-empty", "checkpoint-plain-pickle"])
def test_bad_files_are_one_line_errors_before_any_work(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       option: str, make, message: str) -> None:
    path, content = make(tmp_path)
    path.write_bytes(content)
    argv = explain_args(images, tmp_path / "cache")
    if option == "--data":
        at = argv.index("--data")
        argv[at + 1] = str(path)
    else:
        argv += [option, str(path)]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and one_line(err), err
    assert message in err, err
    assert "weights_only" not in err and "arbitrary code" not in err  # never torch's advice to unpickle
    assert not (tmp_path / "cache").exists()


def test_a_whole_pickled_model_as_checkpoint_is_told_apart(images: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from tests.tiny_models import tiny_cnn

    torch.save(tiny_cnn()[0], tmp_path / "whole_model.pth")  # torch.save(model): pickled classes, not a state dict
    code, _, err = run_main(capsys, *explain_args(images, tmp_path / "cache", "--checkpoint",
                                                  str(tmp_path / "whole_model.pth")))
    assert code == 2 and one_line(err), err
    assert "holds pickled Python objects besides tensors (a whole model?), not a state dict" in err
    assert "weights_only" not in err


def _make_read_only(folder: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: an immutable folder refuses root too
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
    else:
        folder.chmod(0o555)


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    else:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["out", "parent"])
def test_a_read_only_out_fails_before_the_model_loads(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      where: str) -> None:
    """--out that exists read-only, or a new --out inside a read-only folder: one line, and the model is never
    built (its callable writes a marker file when called)."""
    marker = tmp_path / "model_was_built"
    model_file = tmp_path / "model.py"
    model_file.write_text("from pathlib import Path\nfrom tests.tiny_models import tiny_cnn\n\n"
                          f"def build():\n    Path({str(marker)!r}).touch()\n    return tiny_cnn()\n")
    folder = tmp_path / "locked"
    folder.mkdir()
    out = folder if where == "out" else folder / "new" / "cache"
    _make_read_only(folder)
    try:
        code, _, err = run_main(capsys, *explain_args(images, out, model=f"{model_file}:build"))
    finally:
        _make_writable(folder)
    assert code == 2 and one_line(err), err
    assert f"--out {out}: cannot write in {folder}" in err and "choose a writable --out" in err
    assert not marker.exists()
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# --overwrite removes what was derived from the old cache
# ----------------------------------------------------------------------------------------------------------

def test_overwrite_removes_the_old_caches_derived_results(small_cache: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from analysis.cache import DASHBOARD_DIR
    from analysis.cache.identity import cache_state
    from tests.helpers import small_cache_arguments

    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    code, _, err = run_main(capsys, "compare-methods", "--cache", str(copy), "--sample", "3", "--steps", "2",
                            "--device", "cpu", "--quiet")
    assert code == 0, err
    old = load(copy)
    # What older versions saved in CACHE/dashboard/ (the Clusters page's own clusterings) goes too.
    (copy / DASHBOARD_DIR).mkdir()
    (copy / DASHBOARD_DIR / "clustering-0123456789abcdef.parquet").write_bytes(b"an older version's result")
    assert list((copy / "trust").iterdir()) and list((copy / "dashboard").iterdir())
    assert list((copy / "analysis").iterdir())  # the offline clustering the job ran when it finished
    argv = small_cache_arguments(small_cache.parent)
    argv[argv.index("--out") + 1] = str(copy)
    argv[argv.index("--map-size") + 1] = "8"
    code, _, err = run_main(capsys, *argv, "--overwrite", "--no-cluster")
    assert code == 0, err
    assert not (copy / "trust").exists() and not (copy / "dashboard").exists() and not (copy / "analysis").exists()
    new = load(copy)
    assert new.map_size == 8 and new.identity != old.identity
    assert cache_state(new) != cache_state(old)  # a saved clustering is never taken for the new one
