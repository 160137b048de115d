"""The writer lock: one job writes a cache at a time."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from analysis.cache.layout import CacheError, LOCK_NAME
from analysis.cache.files import now_iso


class CacheLocked(CacheError):
    """Another process holds the cache's writer lock (the message names it)."""


class WriterLock:
    """The right to write one cache directory, held by one process at a time: an flock(2) on DIR/.lock.

    The kernel drops an flock when its process ends, however it ends (kill -9 included), so a dead job never
    blocks the next one and there is no stale lock to clean up. The file records who holds it (pid, host, start
    time) for the message a second job gets. It is never deleted: deleting a lock file while another process
    waits on it would let two processes hold "the" lock on two different files. (flock works across the hosts
    of an NFS v4 mount on Linux, where it is emulated with POSIX locks.)
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise CacheLocked at once (never waits); creates the directory if needed."""
        if self._fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CacheLocked(f"{self.root} is being written by another job ({self.holder()}); wait for it to "
                              "finish (then run this command again to resume), or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}).encode())
        os.fsync(fd)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as the lock file says (it is written right after the lock is taken)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text(encoding="utf-8") or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
            time.sleep(0.05)  # taken a moment ago, its holder not written yet
        return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
