"""The writer lock: one job writes a cache at a time."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from analysis.cache.layout import CacheError, LOCK_NAME
from analysis.cache.files import now_iso


class CacheLocked(CacheError):
    """Another process holds the cache's writer lock (the message names it)."""


# The lock files this process holds, by (device, inode): a POSIX lock cannot refuse its own process, and closing
# any descriptor of a locked file (opening it again to read it, say) would drop the lock, so a second WriterLock
# on the same file in this process is refused here, before the file is opened. Each entry records its pid: a
# forked child inherits this dict but none of the locks.
_HELD: dict[tuple[int, int], tuple[int, dict]] = {}
_HELD_GUARD = threading.Lock()


class WriterLock:
    """The right to write one cache directory, held by one process at a time: a POSIX record lock
    (fcntl F_SETLK, through lockf) on DIR/.lock.

    A POSIX lock belongs to the process that took it alone: a forked child (a DataLoader worker) does not hold
    it, and the kernel drops it when that process ends, however it ends (kill -9 included). So a killed job
    never blocks the next one, even while its workers are still finishing, and there is no stale lock to clean
    up. (An flock was shared with every forked worker, which kept it for seconds after their parent was killed.)
    The file records who holds it (pid, host, start time) for the message a second job gets; a record naming a
    process of this host that has ended is said to be so, never called another job. The file is never deleted:
    deleting a lock file while another process waits on it would let two processes hold "the" lock on two
    different files. POSIX locks work across the hosts of an NFS mount.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise CacheLocked at once (never waits); creates the directory if needed."""
        if self._fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with _HELD_GUARD:
            mine = _HELD.get(_file_key(self.path))
            if mine is not None and mine[0] == os.getpid():  # refused before opening the file: see _HELD
                raise CacheLocked(self._refusal(mine[1]))
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            stat = os.fstat(fd)
            key = (stat.st_dev, stat.st_ino)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise CacheLocked(self._refusal(self._recorded_holder())) from None
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
            _HELD[key] = (os.getpid(), record)
            self._fd, self._key = fd, key

    def _recorded_holder(self) -> dict:
        """The holder's record in the lock file (written right after the lock is taken: waits a moment for it)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text(encoding="utf-8") or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                return info
            time.sleep(0.05)
        return {}

    def _refusal(self, info: dict) -> str:
        if not info:
            return (f"{self.root} is being written by another job (holder unknown); wait for it to finish (then run "
                    "this command again to resume), or use another --out")
        holder = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
        if info.get("host") == socket.gethostname() and not _running(info.get("pid")):
            return (f"{self.root} is locked, but not by the job its lock file names ({holder}), which has ended: "
                    "a process it left may still be finishing; run this command again in a few seconds, or use "
                    "another --out")
        return (f"{self.root} is being written by another job ({holder}); wait for it to finish (then run this "
                "command again to resume), or use another --out")

    def release(self) -> None:
        if self._fd is not None:
            with _HELD_GUARD:
                _HELD.pop(self._key, None)
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = self._key = None


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _running(pid: object) -> bool:
    """Whether process `pid` of this host exists (a zombie, ended but not yet reaped, counts as ended)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: kill(0) said it exists
