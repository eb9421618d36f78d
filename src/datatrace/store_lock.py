"""The writer lock of a store directory: one process writes a store at a time (DESIGN.md §5).

An exclusive OS file lock (``flock`` through the :mod:`filelock` package) on ``writer.lock``
in the store directory. The operating system releases it when its process ends, however it
ends (``SIGKILL`` included), so a killed job never blocks the next one; no marker file has to
be cleaned up. The holder also writes ``writer.json`` (pid, host, time) so that a refused
writer can name it; that file is informative only and is never trusted for exclusion.

The lock is per process: every :class:`~datatrace.store.Store` of one process on one
directory shares it (reentrant, counted), as do the ranks > 0 of a distributed job, which
never take it (rank 0 holds it for the job).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["HOLDER", "LOCK", "WriterLock"]

LOCK = "writer.lock"
HOLDER = "writer.json"

_LOCKS: dict[str, FileLock] = {}  # one per lock file and process: filelock counts re-entries
_GUARD = threading.Lock()


def _file_lock(path: Path) -> FileLock:
    key = os.path.realpath(path)
    with _GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            try:  # filelock >= 3.21: never fall back to a marker file a crash would leave
                lock = FileLock(key, timeout=0, thread_local=False, fallback_to_soft=False)
            except TypeError:  # older filelock: flock only, no fallback to turn off
                lock = FileLock(key, timeout=0, thread_local=False)
            _LOCKS[key] = lock
        return lock


class WriterLock:
    """This process's hold on the writer lock of one store directory.

    Example:
        >>> import tempfile
        >>> lock = WriterLock(Path(tempfile.mkdtemp()))
        >>> lock.acquire(), lock.held
        (True, True)
        >>> lock.release()
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.held = False
        self.reason = ""  # why the last acquire failed

    def acquire(self) -> bool:
        """Take the lock without waiting; False (and :attr:`reason`) when another process has it."""
        if self.held:
            return True
        lock = _file_lock(self.root / LOCK)
        first = not lock.is_locked
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.reason = self.holder()
            return False
        except OSError as exc:  # e.g. a read-only directory: this process cannot write anyway
            self.reason = f"cannot create {self.root / LOCK} ({exc.strerror or exc})"
            return False
        self.held = True
        if first:
            self._write_holder()
        return True

    def release(self) -> None:
        """Give the hold back (the OS lock goes when this process's last hold does)."""
        if self.held:
            self.held = False
            _file_lock(self.root / LOCK).release()

    def holder(self) -> str:
        """Who holds the lock, as far as ``writer.json`` says."""
        try:
            info = json.loads((self.root / HOLDER).read_text())
            return f"pid {int(info['pid'])} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def _write_holder(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        with contextlib.suppress(OSError):  # informative only: a torn read says "unknown"
            (self.root / HOLDER).write_text(json.dumps(info))
