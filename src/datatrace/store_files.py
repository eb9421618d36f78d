"""The files of a store (:mod:`datatrace.store`): atomic writes, checksums, and ``.npy`` arrays
read back only after their size, header and checksum agree with the manifest.

Every file is written under a temporary name in the store directory, flushed, fsynced and
renamed with ``os.replace``; the directory is then fsynced so that the rename is durable.
Arrays are NumPy ``.npy`` files, never unpickled; bfloat16 is stored as its 16-bit pattern.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import xxhash

from datatrace._io import atomic_write, fsync_dir
from datatrace.errors import ConfigError, StoreError
from datatrace.store_lock import HOLDER, LOCK
from datatrace.store_manifest import _DTYPES, FORMAT_VERSION, owned_files

_TMP_PREFIX = ".tmp-datatrace-"
# this module's temporaries (mkstemp adds 8 characters of [a-z0-9_]); version 1 wrote ".tmp-"
_TMP = re.compile(r"^\.tmp-(datatrace-)?[a-z0-9_]{8}\.part$")
_CHUNK = 1 << 22


def _checksum(chunks: Sequence[bytes | bytearray | memoryview] | Iterator[bytes]) -> str:
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return "xxh3_128:" + h.hexdigest()


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(_CHUNK):
        yield chunk


def remove_temporaries(root: Path) -> None:
    """Delete the temporaries of writes killed before their rename."""
    for f in root.iterdir():
        if _TMP.match(f.name) and f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)


@contextlib.contextmanager
def no_space(root: Path, name: str, size: int) -> Iterator[None]:
    """Inside: a full disk (or quota) while writing ``name`` becomes a ``StoreError``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            free = f"{shutil.disk_usage(root).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise StoreError(
            f"no space left for store {root}: writing {name} needs {size:,} bytes "
            f"({free}). Free space or point store= at another disk, then run again: "
            "completed shards are kept and not recomputed."
        ) from exc


def write_file(root: Path, name: str, write: Callable[[IO[bytes]], object], size: int) -> None:
    """Write ``root / name`` atomically (:func:`datatrace._io.atomic_write`) under a name the
    store recognises as its temporary; a full disk becomes a ``StoreError``."""
    with no_space(root, name, size):
        atomic_write(root / name, write, prefix=_TMP_PREFIX, suffix=".part")


def encode_npy(tensor: torch.Tensor) -> tuple[bytes, memoryview, dict[str, Any]]:
    """The ``.npy`` header and data of ``tensor``, and its entry (without the file name)."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise ConfigError(f"the store holds dense torch tensors; got {type(tensor).__name__}.")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ConfigError(
            f"cannot store dtype {tensor.dtype}; supported: {sorted(_DTYPES)}. Cast with .to()."
        )
    t = tensor.detach().to("cpu").contiguous().view(_DTYPES[dtype][1])
    array = t.numpy()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head = header.getvalue()
    data = memoryview(array.reshape(-1).view(np.uint8).data)
    entry = {
        "shape": list(tensor.shape),
        "dtype": dtype,
        "nbytes": len(head) + array.nbytes,
        "checksum": _checksum([head, data]),
    }
    return head, data, entry


def open_file(root: Path, name: str) -> io.BufferedReader:
    """``name`` in the store, read-only, refusing symlinks and anything but a file."""
    fd = os.open(root / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file")
    return f


def file_intact(root: Path, entry: dict[str, Any]) -> bool:
    """Whether the entry's file is a regular file of the recorded size (no read)."""
    try:
        st = os.lstat(root / entry["file"])
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == entry["nbytes"]


def read_npy(
    root: Path, entry: dict[str, Any], mmap: bool, corrupt: Callable[..., StoreError]
) -> torch.Tensor:
    """The entry's array in its recorded dtype, once size, header and checksum agree.

    ``corrupt(reason, exc=None)`` builds the error raised for a damaged file.
    """
    torch_dtype, storage = _DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    expected = torch.empty(0, dtype=storage).numpy().dtype
    try:
        f = open_file(root, entry["file"])
    except OSError as exc:
        raise corrupt(f"cannot open it: {exc.strerror or exc}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != entry["nbytes"]:
            raise corrupt(f"{size} bytes, the manifest records {entry['nbytes']}")
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            got_shape, fortran, got_dtype = read_header(f)
        except (OSError, ValueError, SyntaxError, TypeError) as exc:
            raise corrupt(f"no valid .npy header: {exc}") from exc
        if got_dtype != expected or tuple(got_shape) != shape or fortran:
            raise corrupt(
                f"it holds dtype/shape {got_dtype}/{tuple(got_shape)}, the manifest records "
                f"{expected}/{shape}"
            )
        offset = f.tell()
        if mmap and size > offset:
            f.seek(0)
            head = f.read(offset)
            array: np.ndarray = np.memmap(f, dtype=expected, mode="c", offset=offset, shape=shape)
            # hashed through the map: no copy, and the pages are then cached for the caller
            body = memoryview(array.reshape(-1).view(np.uint8).data)
            if _checksum([head, body]) != entry["checksum"]:
                raise corrupt("checksum mismatch")
        else:
            f.seek(0)
            buf = bytearray(size)
            if f.readinto(buf) != size or _checksum([buf]) != entry["checksum"]:
                raise corrupt("checksum mismatch")
            array = np.frombuffer(buf, dtype=expected, offset=offset).reshape(shape)
    return torch.from_numpy(array).view(torch_dtype)  # mode 'c' keeps it writable


def upgrade_entries(root: Path, manifest: dict[str, Any]) -> None:
    """Version 1 entries get their size and checksum from their files (trusted once);
    entries whose file is gone are dropped (recomputed)."""
    manifest["format_version"] = FORMAT_VERSION
    for shards in [*manifest["shards"].values(), manifest["arrays"]]:
        for key, entry in list(shards.items()):
            try:
                with open_file(root, entry["file"]) as f:
                    entry["nbytes"] = os.fstat(f.fileno()).st_size
                    entry["checksum"] = _checksum(_file_chunks(f))
            except OSError:
                del shards[key]


def delete_owned(root: Path, keep_lock: bool) -> None:
    """Delete what a store at ``root`` wrote (:func:`owned_files`), its temporaries and lock
    files (the lock itself last, unless ``keep_lock``); other files are kept."""
    for name in owned_files(root):
        (root / name).unlink(missing_ok=True)
    remove_temporaries(root)
    (root / HOLDER).unlink(missing_ok=True)
    if not keep_lock:
        (root / LOCK).unlink(missing_ok=True)  # last, while held
    fsync_dir(root)
