"""Sharded on-disk arrays with a manifest: nothing lost, nothing stale (DESIGN.md §5).

A store is one directory::

    <path>/
        manifest.json              format_version, config, fingerprints, shards, arrays
        journal.jsonl              shards completed since the manifest was last rewritten
        journal-rank<r>.jsonl      the same, of rank r > 0 of a distributed job
        shard-<kind>-<index>.npy   one block of a streamed quantity (e.g. train features)
        array-<name>.npy           fitted state (e.g. a kernel inverse)
        .tmp-*                     a write in progress; removed when the store is next opened

Every file is written under a temporary name in the same directory, flushed, fsynced and
renamed with ``os.replace``. A completed shard is then recorded by appending one fsynced JSON
line to the journal (constant cost per shard; rewriting the manifest for every shard made a
long job quadratic), and the store folds the journal into the manifest, atomically, when it is
opened and on :meth:`Store.compact`. A shard counts as complete only once the manifest or a
whole journal line lists it (a torn last line from a killed write is ignored and the shard is
recomputed), so a killed job resumes from its last complete shard and never reads half a file. Reopening a store under a different
``format_version``, ``config`` or ``fingerprints`` raises ``StoreError`` naming what differs.

Arrays are NumPy ``.npy`` files loaded with ``allow_pickle=False``; bfloat16 is stored as its
16-bit pattern and the dtype is taken from the manifest.

One job writes to a store at a time. Within a distributed job (:mod:`datatrace.distributed`)
rank 0 owns the manifest and the arrays; a store opened with ``rank=r > 0`` writes shards only
(each rank its own shard indices), each recorded in that rank's own journal, so no two
processes ever append to or replace the same file. After a barrier rank 0 folds every journal
into the manifest (:meth:`Store.merge_journals`) and the others re-read it
(:meth:`Store.reload`). Shard indices are global, so a store written by any number of ranks
has one layout and resumes under any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch

from datatrace.errors import ConfigError, DataError, StoreError

__all__ = ["FORMAT_VERSION", "Store", "fingerprint_batch", "fingerprint_tensors"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
_RANK_JOURNAL = re.compile(r"^journal-rank[0-9]+\.jsonl$")
_TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_OWNED = re.compile(r"^(shard|array)-[A-Za-z0-9_.-]+\.npy$")
# torch dtype name -> (torch dtype, dtype of the .npy file holding it)
_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.int16),  # NumPy has no bfloat16: keep the bit pattern
    "int64": (torch.int64, torch.int64),
    "int32": (torch.int32, torch.int32),
    "bool": (torch.bool, torch.bool),
}


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> str:
    """SHA-256 hex digest of the names, dtypes, shapes and bytes of ``tensors``.

    A mapping (e.g. ``model.state_dict()``) is hashed in sorted key order; a sequence in its
    own order. Any dtype works, bfloat16 included, on any device.
    """
    if isinstance(tensors, Mapping):
        items = [(str(k), tensors[k]) for k in sorted(tensors, key=str)]
        tag = b"mapping"
    else:
        items = [(str(i), t) for i, t in enumerate(tensors)]
        tag = b"sequence"
    h = hashlib.sha256(tag)
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"cannot fingerprint entry {name!r} of type {type(t).__name__}; every entry must be "
                "a torch.Tensor (convert labels/ids with torch.as_tensor first)."
            )
        t = t.detach().to("cpu").contiguous()
        header = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|"
        h.update(len(header).to_bytes(8, "little") + header.encode())
        # Reinterpret as raw bytes: works for bfloat16, which .numpy() refuses.
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint_batch(batch: Any) -> str:
    """Fingerprint of a batch: a tensor, a tuple/list of tensors or a dict (key order ignored)."""
    if isinstance(batch, torch.Tensor):
        return fingerprint_tensors([batch])
    if isinstance(batch, Mapping):
        return fingerprint_tensors({str(k): v for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return fingerprint_tensors(list(batch))
    raise DataError(
        f"cannot fingerprint a batch of type {type(batch).__name__}; pass a tensor, a tuple/list "
        "of tensors or a dict of tensors."
    )


def _json_normalise(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the store {what} must be JSON-serialisable ({exc}); convert dataclasses with "
            "dataclasses.asdict, enums to their .value and tensors to lists."
        ) from exc


_MISSING = object()


def _short(value: Any, limit: int = 48) -> str:
    text = "<missing>" if value is _MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys at which two JSON values differ, with both values (shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, _MISSING), new.get(key, _MISSING), f"{prefix}.{key}")
        return out
    if old is _MISSING or new is _MISSING or json.dumps(old) != json.dumps(new):
        return [f"{prefix}: stored {_short(old)}, given {_short(new)}"]
    return []


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid {what} name {name!r}; use letters, digits, '_', '-' and '.', starting with "
            "a letter or digit (e.g. 'features' or 'member_0'); it becomes part of a file name."
        )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # makes the rename durable; not possible on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Store:
    """A directory of array shards plus a manifest that says which are complete and for what.

    Args:
        path: the store directory; created (with parents) when missing and ``create`` is true.
        config: JSON-serialisable settings that produced the arrays (a method's settings).
        fingerprints: hashes of what the arrays depend on, e.g. ``{"model": ..., "train": ...}``
            from :func:`fingerprint_tensors` / :func:`fingerprint_batch`.
        create: if false, a directory without a manifest raises ``StoreError``.
        overwrite: if true, a store written for another config, fingerprint or format version
            (or a corrupt one) is cleared instead of refused.
        rank: 0 (default) owns the manifest: it folds leftover journals, removes partial
            writes and writes arrays. ``rank > 0`` (a distributed job's other ranks, opened
            after rank 0) only writes shards, journaled to ``journal-rank<rank>.jsonl``; it
            needs the manifest to exist.

    Raises:
        StoreError: the existing store was written for a different job, or is corrupt.

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> s = Store(d, config={"proj_dim": 8}, fingerprints={"model": "abc"})
        >>> s.write_shard("features", 0, torch.ones(2, 8), data_fingerprint="b0")
        >>> s = Store(d, config={"proj_dim": 8}, fingerprints={"model": "abc"})  # resume
        >>> s.shard_indices("features"), s.has_shard("features", 0, data_fingerprint="b1")
        ([0], False)
        >>> s.read_shard("features", 0).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: Mapping[str, Any],
        fingerprints: Mapping[str, str],
        create: bool = True,
        overwrite: bool = False,
        rank: int = 0,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank must be an integer >= 0; got {rank!r}.")
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a dict of settings; got {type(config).__name__}.")
        if not isinstance(fingerprints, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()
        ):
            raise ConfigError(
                f"fingerprints must map names to hex strings, e.g. {{'model': '3fa2...'}}; got "
                f"{fingerprints!r:.80}."
            )
        self.path = Path(path)
        wanted = {
            "format_version": FORMAT_VERSION,
            "config": _json_normalise(dict(config), "config"),
            "fingerprints": dict(fingerprints),
        }
        self.rank = rank
        self._journal_name = JOURNAL if rank == 0 else f"journal-rank{rank}.jsonl"
        self._wanted = wanted
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists() and (not create or rank > 0):
            raise StoreError(
                f"no store at {self.path} (no {MANIFEST}); pass create=True to make one"
                + ("." if rank == 0 else f" (rank {rank} opens a store after rank 0 made it).")
            )
        if rank > 0:  # a shard writer: rank 0 has checked, cleaned and folded the store
            self._manifest = self._load_manifest(wanted)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(_TMP_PREFIX + "*"):  # a write killed before its rename
            leftover.unlink(missing_ok=True)
        if manifest_path.exists():
            try:
                self._manifest = self._load_manifest(wanted)
                self._replay_journal()
                return
            except StoreError:
                if not overwrite:
                    raise
                Store.clear(self.path)
                self.path.mkdir(parents=True, exist_ok=True)
        for old in self._journals():  # they belong to no manifest any more
            old.unlink(missing_ok=True)
        self._manifest = {**wanted, "shards": {}, "arrays": {}}
        self._write_manifest(self._manifest)

    @staticmethod
    def clear(path: str | os.PathLike[str]) -> None:
        """Delete a store's manifest, shards, arrays and temporary files (other files are kept)."""
        root = Path(path)
        if not root.is_dir():
            return
        for f in root.iterdir():
            if f.is_file() and (
                f.name in (MANIFEST, JOURNAL)
                or _RANK_JOURNAL.match(f.name)
                or f.name.startswith(_TMP_PREFIX)
                or _OWNED.match(f.name)
            ):
                f.unlink()
        if not any(root.iterdir()):
            root.rmdir()

    @property
    def config(self) -> dict[str, Any]:
        """The (JSON-normalised) settings this store was written for."""
        return json.loads(json.dumps(self._manifest["config"]))

    @property
    def fingerprints(self) -> dict[str, str]:
        """The fingerprints this store was written for."""
        return dict(self._manifest["fingerprints"])

    def write_shard(
        self, kind: str, index: int, array: torch.Tensor, data_fingerprint: str = ""
    ) -> None:
        """Atomically write shard ``index`` of ``kind`` (replacing any earlier version).

        ``data_fingerprint`` identifies the inputs of this shard (e.g. the train batch), so that
        :meth:`has_shard` can tell a stale shard from a finished one.
        """
        _check_name(kind, "shard kind")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(f"shard index must be an int >= 0; got {index!r}.")
        if str(index) in self._manifest["shards"].get(kind, {}):
            # Retract the old entry first: a job killed while replacing the file must not leave
            # the new contents listed under the old shape and data fingerprint.
            self._journal(kind, index, None)
        entry = self._write_file(f"shard-{kind}-{index:06d}.npy", array)
        entry.update(index=index, data_fingerprint=str(data_fingerprint))
        self._journal(kind, index, entry)

    def _journal(self, kind: str, index: int, entry: dict[str, Any] | None) -> None:
        line = json.dumps({"kind": kind, "index": index, "entry": entry}, sort_keys=True)
        with open(self.path / self._journal_name, "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        shards = self._manifest["shards"].setdefault(kind, {})  # only once it is on disk
        if entry is None:
            shards.pop(str(index), None)
        else:
            shards[str(index)] = entry

    def compact(self) -> None:
        """Fold the journal of completed shards into the manifest (atomic; also done on open)."""
        self._check_owner("compact the manifest")
        self._write_manifest(json.loads(json.dumps(self._manifest)))
        (self.path / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(self.path)

    def merge_journals(self) -> None:
        """Rank 0: fold every rank's journal into the manifest (call after a barrier).

        Records are applied journal by journal; ranks write disjoint shard indices, so the
        order between journals does not matter. Folded journals are deleted once the
        manifest that holds them is on disk.
        """
        self._check_owner("merge journals")
        self._replay_journal()

    def reload(self) -> None:
        """Re-read the manifest from disk (ranks > 0, after rank 0 merged the journals).

        Raises:
            StoreError: the manifest no longer matches this store's config or fingerprints.
        """
        self._manifest = self._load_manifest(self._wanted)

    def _check_owner(self, what: str) -> None:
        if self.rank != 0:
            raise StoreError(
                f"store {self.path} was opened with rank={self.rank}, which only writes shards; "
                f"rank 0 owns the manifest and must {what}."
            )

    def _journals(self) -> list[Path]:
        """This store's journal files: rank 0's first, then the other ranks' by name."""
        ranks = sorted(f for f in self.path.iterdir() if _RANK_JOURNAL.match(f.name))
        return [self.path / JOURNAL, *ranks]

    def has_shard(self, kind: str, index: int, data_fingerprint: str | None = None) -> bool:
        """Whether shard ``index`` is complete (and, if given, was made from ``data_fingerprint``)."""
        entry = self._manifest["shards"].get(kind, {}).get(str(index))
        if entry is None or not (self.path / entry["file"]).is_file():
            return False
        return data_fingerprint is None or entry["data_fingerprint"] == data_fingerprint

    def read_shard(self, kind: str, index: int, mmap: bool = True) -> torch.Tensor:
        """Load shard ``index`` of ``kind`` in its recorded dtype.

        With ``mmap=True`` the tensor is backed by the file through a copy-on-write memory map:
        pages are read lazily, and in-place changes stay in memory and never reach the file.
        Call ``.clone()`` for an independent tensor.
        """
        entry = self._manifest["shards"].get(kind, {}).get(str(index))
        if entry is None:
            raise StoreError(
                f"store {self.path} has no complete shard {kind!r} #{index}; complete: "
                f"{self.shard_indices(kind)}. Write it with write_shard first."
            )
        return self._read_file(entry, mmap)

    def shard_indices(self, kind: str) -> list[int]:
        """Sorted indices of the complete shards of ``kind``."""
        return sorted(int(i) for i in self._manifest["shards"].get(kind, {}))

    def iter_shards(self, kind: str, mmap: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(index, tensor)`` for every complete shard of ``kind``, in index order."""
        for index in self.shard_indices(kind):
            yield index, self.read_shard(kind, index, mmap=mmap)

    def write_array(self, name: str, tensor: torch.Tensor) -> None:
        """Atomically write the named array of fitted state (replacing any earlier version)."""
        _check_name(name, "array")
        self._check_owner("write arrays")
        entry = self._write_file(f"array-{name}.npy", tensor)
        manifest = json.loads(json.dumps(self._manifest))
        manifest["arrays"][name] = entry
        self._write_manifest(manifest)

    def has_array(self, name: str) -> bool:
        """Whether the named array is complete."""
        entry = self._manifest["arrays"].get(name)
        return entry is not None and (self.path / entry["file"]).is_file()

    def read_array(self, name: str, mmap: bool = True) -> torch.Tensor:
        """Load the named array in its recorded dtype (``mmap`` as in :meth:`read_shard`)."""
        entry = self._manifest["arrays"].get(name)
        if entry is None:
            raise StoreError(
                f"store {self.path} has no array {name!r}; it has {sorted(self._manifest['arrays'])}."
                " Write it with write_array first."
            )
        return self._read_file(entry, mmap)

    def nbytes(self) -> int:
        """Total size in bytes of the complete shard and array files."""
        entries = [*self._manifest["arrays"].values()]
        entries += [e for kind in self._manifest["shards"].values() for e in kind.values()]
        files = [self.path / e["file"] for e in entries]
        return sum(f.stat().st_size for f in files if f.is_file())

    def __repr__(self) -> str:
        kinds = {k: len(v) for k, v in self._manifest["shards"].items()}
        return (
            f"Store({str(self.path)!r}, shards={kinds}, arrays={sorted(self._manifest['arrays'])})"
        )

    # -- implementation ------------------------------------------------------------------------

    def _load_manifest(self, wanted: dict[str, Any]) -> dict[str, Any]:
        fix = (
            f"use another directory, delete it with Store.clear({str(self.path)!r}), or pass "
            "overwrite=True to start over."
        )
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            if not isinstance(manifest, dict):
                raise ValueError(f"top level is a {type(manifest).__name__}, not an object")
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"the manifest of store {self.path} is unreadable ({exc}); {fix}"
            ) from exc
        stored = {k: manifest.get(k, _MISSING) for k in wanted}
        diffs = [d for k in wanted for d in _diff(stored[k], wanted[k], k)]
        if diffs:
            raise StoreError(
                f"store {self.path} was written for a different job and its arrays would be "
                f"stale: {'; '.join(diffs)}. To continue, {fix}"
            )
        if not all(isinstance(manifest.get(k), dict) for k in ("shards", "arrays")):
            raise StoreError(f"the manifest of store {self.path} lacks 'shards'/'arrays'; {fix}")
        return manifest

    def _replay_journal(self) -> None:
        journals = [j for j in self._journals() if j.exists()]
        if not journals:
            return
        for journal in journals:
            for raw in journal.read_bytes().split(b"\n"):
                try:
                    record = json.loads(raw)
                    kind, index, entry = record["kind"], int(record["index"]), record["entry"]
                except (ValueError, KeyError, TypeError):
                    continue  # empty or torn line: that shard is not complete and is recomputed
                shards = self._manifest["shards"].setdefault(kind, {})
                if entry is None:
                    shards.pop(str(index), None)
                else:
                    shards[str(index)] = entry
        self.compact()  # removes rank 0's journal; the manifest now holds the others too
        for journal in journals:
            journal.unlink(missing_ok=True)
        _fsync_dir(self.path)

    def _atomic_write(self, name: str, write: Callable[[IO[bytes]], object]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self._atomic_write(MANIFEST, lambda f: f.write(text))
        self._manifest = manifest  # only once it is on disk

    def _write_file(self, name: str, tensor: torch.Tensor) -> dict[str, Any]:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ConfigError(f"the store holds dense torch tensors; got {type(tensor).__name__}.")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ConfigError(
                f"cannot store dtype {tensor.dtype}; supported: {sorted(_DTYPES)}. Cast with .to()."
            )
        t = tensor.detach().to("cpu").contiguous().view(_DTYPES[dtype][1])
        array = t.numpy()
        self._atomic_write(name, lambda f: np.save(f, array, allow_pickle=False))
        return {"file": name, "shape": list(tensor.shape), "dtype": dtype}

    def _read_file(self, entry: dict[str, Any], mmap: bool) -> torch.Tensor:
        file = self.path / entry["file"]
        torch_dtype, storage = _DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        # An empty array has nothing to map; never unpickle.
        mode: Literal["c"] | None = "c" if mmap and int(np.prod(shape)) > 0 else None
        try:
            array = np.load(file, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot load {file} ({exc}); the store is corrupt or was tampered with. Delete it "
                "with Store.clear(path) and recompute."
            ) from exc
        expected = torch.empty(0, dtype=storage).numpy().dtype
        if not isinstance(array, np.ndarray) or array.dtype != expected or array.shape != shape:
            got = getattr(array, "dtype", type(array).__name__), getattr(array, "shape", None)
            raise StoreError(
                f"{file} holds dtype/shape {got} but the manifest records {expected}/{shape}; the "
                "store is corrupt. Delete it with Store.clear(path) and recompute."
            )
        return torch.from_numpy(array).view(torch_dtype)  # mode 'c' keeps it writable
