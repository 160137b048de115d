"""A resume right after `kill -9` (issue 24, item 3): the job's DataLoader workers outlive their killed parent
for a few seconds, and must not keep the cache's writer lock while they do; a lock file naming a dead process
is never reported as "another job". Real jobs in real processes, as in tests/test_job_guards.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.cache import LOCK_NAME, CacheLocked, WriterLock, load
from tests.helpers import REPO_ROOT, job_command, make_image_folder


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **extra}


def committed_shards(out: Path) -> int:
    shards = out / "shards"
    return sum(p.name.startswith("shard-") for p in shards.iterdir()) if shards.is_dir() else 0


def living_children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc): the job's DataLoader workers while it runs."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return children


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_rerun_right_after_kill_9_of_a_job_with_workers_resumes_and_completes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", per_class=8, size=20)  # 24 images, 12 shards of 2
    out = tmp_path / "cache"
    options = ("--batch-size", "2", "--map-size", "8", "--descriptor-size", "2", "--no-cluster")
    # Each of the 2 workers loads 2 batches, then stalls in its transform (as on a slow disk): the job commits
    # 4 shards and waits for the 5th. Killed then, it leaves its workers stalled, and they outlive the rerun.
    job = subprocess.Popen(job_command(tmp_path / "images", out, *options, "--quiet", "--workers", "2"),
                           cwd=REPO_ROOT, env=subprocess_env(EXPLAIN_TEST_STALL_AFTER="4",
                                                             EXPLAIN_TEST_SHARDS=str(out / "shards")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while committed_shards(out) < 4 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = living_children(job.pid)
        assert job.poll() is None, "the job ended before it could be killed: " + job.stderr.read()
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        assert committed_shards(out) == 4
        assert len(workers) == 2 and all(alive(pid) for pid in workers), workers

        rerun = subprocess.run(job_command(tmp_path / "images", out, *options, "--workers", "2"), cwd=REPO_ROOT,
                               env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert "resuming: 4 of 12 shards already committed" in rerun.stderr, rerun.stderr
        cache = load(out)
        assert cache.complete
        assert cache.table["id"].tolist() == list(range(24))  # every image exactly once
        assert cache.manifest["counts"]["explained"] == 24
        # The killed job's workers were alive all along: they hold no lock (before, they held it until they ended).
        assert all(alive(pid) for pid in workers), workers
    finally:
        job.kill()
        job.wait()
        job.stderr.close()
        for pid in workers:  # the stalled orphans this test made
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


HOLDER = ("import os, sys, time\nfrom analysis.cache import WriterLock\nWriterLock(sys.argv[1]).acquire()\n"
          "child = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
          "print(child, flush=True)\ntime.sleep(600)\n")


def test_a_child_forked_by_the_holder_does_not_keep_the_lock_once_the_holder_is_killed(tmp_path: Path) -> None:
    """A process takes the lock and forks a child (as the DataLoader forks its workers), then is killed: the
    lock is free at once, while the child still runs."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO_ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(CacheLocked, match=rf"another job \(pid {holder.pid} on {socket.gethostname()}, "):
            WriterLock(tmp_path).acquire()
        holder.kill()
        holder.wait()
        assert alive(child)
        lock = WriterLock(tmp_path)
        lock.acquire()
        assert lock.held and alive(child)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        os.kill(child, signal.SIGKILL)


def test_a_held_lock_whose_named_owner_is_dead_is_not_reported_as_another_job(tmp_path: Path) -> None:
    """The lock file names a process that has ended while the lock is held (by a process that did not record
    itself): the refusal says so and names no dead job as the writer."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    record = json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00"})
    script = ("import sys, time\nfrom pathlib import Path\nfrom analysis.cache import WriterLock\n"
              "WriterLock(sys.argv[1]).acquire()\n"
              "import os\nfd = os.open(Path(sys.argv[1], '.lock'), os.O_WRONLY)\n"  # kept open: closing drops the lock
              "os.ftruncate(fd, 0)\nos.write(fd, sys.argv[2].encode())\nprint('held', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), record], cwd=REPO_ROOT,
                              env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLocked) as refused:
            WriterLock(tmp_path).acquire()
        message = str(refused.value)
        assert "another job" not in message and f"pid {dead_pid} on {socket.gethostname()}" in message, message
        assert "has ended" in message and message.count("\n") == 0, message
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
