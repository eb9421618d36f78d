"""Atomic file writes: a file is either its old self or completely the new one, never half.

The bytes go to a temporary file beside the target, are flushed and fsynced, and the
temporary is renamed over the target with ``os.replace``; the directory is then fsynced so
that the rename survives a crash. A write that fails removes its temporary.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make renames in directory ``path`` durable (a no-op where that is not possible)."""
    try:  # not possible on Windows
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], object], *, prefix: str = ".tmp-", suffix: str = ""
) -> None:
    """Write ``path`` through ``write(file)``, atomically (module docstring).

    ``prefix`` and ``suffix`` name the temporary (``tempfile.mkstemp`` adds 8 characters), so
    that the owner of a directory can recognise and remove temporaries of killed writes.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
