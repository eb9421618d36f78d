"""Sharded on-disk arrays with a manifest: nothing lost, nothing stale (DESIGN.md §5).

A store is one directory of ``.npy`` shards and arrays, a manifest and journals (layout
in docs/store.md, "On disk").

Every file is written under a temporary name in the same directory, flushed, fsynced and
renamed with ``os.replace``. A completed shard is then recorded by appending one fsynced JSON
line to the journal (constant cost per shard; rewriting the manifest for every shard made a
long job quadratic), and the store folds the journal into the manifest, atomically, when it is
opened and on :meth:`Store.compact`. A shard counts as complete only once the manifest or a
whole journal line lists it (a torn or malformed line is ignored and the shard is
recomputed), so a killed job resumes from its last complete shard and never reads half a
file. Reopening a store under a different ``format_version``, ``config``, ``fingerprints``
or ``probes`` raises ``StoreError`` naming what differs.

Integrity (checksums), ownership (what ``clear`` deletes), the array format and
concurrency (the writer lock, distributed ranks): docs/store.md, "On disk".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from datatrace._checks import check_int
from datatrace._io import fsync_dir
from datatrace.errors import ConfigError, StoreError
from datatrace.fingerprints import RowsFingerprint, fingerprint_batch, fingerprint_tensors
from datatrace.store_files import (
    delete_owned,
    encode_npy,
    file_intact,
    no_space,
    read_npy,
    remove_temporaries,
    upgrade_entries,
    write_file,
)
from datatrace.store_lock import WriterLock
from datatrace.store_manifest import (
    _DTYPES,
    FORMAT_VERSION,
    JOURNAL,
    MANIFEST,
    _array_file,
    _check_name,
    _is_our_journal,
    _json_normalise,
    _shard_file,
    apply_journal,
    check_entries,
    job_differences,
    journal_files,
    read_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "SHARD_BYTES",
    "RowsFingerprint",
    "Store",
    "fingerprint_batch",
    "fingerprint_tensors",
    "rows_per_shard",
]

# Target size of one shard of train features (the loop packs rows until it is reached; the
# rule behind 64 MiB is in docs/store.md). Override per attributor (``shard_bytes=``) or here.
SHARD_BYTES = 64 * 2**20


def rows_per_shard(row_bytes: int, shard_bytes: int | None = None) -> int:
    """Rows of ``row_bytes`` each that fill one shard of ``shard_bytes`` (default
    :data:`SHARD_BYTES`, read at call time); at least 1.

    Example:
        >>> rows_per_shard(4 * 2048, shard_bytes=2**20)
        128
    """
    target = SHARD_BYTES if shard_bytes is None else shard_bytes
    return max(1, int(target) // max(1, int(row_bytes)))


class Store:
    """A directory of array shards plus a manifest that says which are complete and for what.

    Args:
        path: the store directory; created (with parents) when missing and ``create`` is true.
        config: JSON-serialisable settings that produced the arrays (a method's settings).
        fingerprints: hashes of what the arrays depend on, e.g. ``{"model": ..., "train": ...}``
            from :func:`fingerprint_tensors` / :func:`fingerprint_batch`.
        create: if false, a directory without a manifest raises ``StoreError``.
        overwrite: if true, a store written for another config, fingerprint, probe or format
            version (or a corrupt one) is cleared instead of refused.
        rank: 0 (default) owns the manifest: it takes the writer lock, folds leftover
            journals, removes its own partial writes and writes arrays. ``rank > 0`` (a
            distributed job's other ranks, opened after rank 0) only writes shards, journaled
            to ``journal-rank<rank>.jsonl``; it needs the manifest to exist.
        probes: named vectors of numbers that identify code rather than data (e.g. a model's
            per-example losses on a few fixed examples, which change when the forward function
            or the loss does while the weights stay the same); compared with relative
            tolerance ``probe_rtol``, as stored values may come from another device. Only
            names present on both sides are compared: name a probe after its inputs, so that
            one over other inputs replaces the stored one (a writer records the given set).
        probe_rtol: the tolerance of ``probes``.

    Raises:
        StoreError: the existing store was written for a different job, is corrupt, is not a
            datatrace store, or is being created by another process.

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
        >>> s.close()  # give the writer lock back (reads go on)
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
        probes: Mapping[str, Sequence[float]] | None = None,
        probe_rtol: float = 1e-4,
    ) -> None:
        self._lock: WriterLock | None = None  # set first: __del__ reads it
        check_int("rank", rank, 0)
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
        wanted: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "config": _json_normalise(dict(config), "config"),
            "fingerprints": dict(fingerprints),
        }
        self._probes = {str(k): [float(x) for x in v] for k, v in (probes or {}).items()}
        self._probe_rtol = float(probe_rtol)
        self.rank = rank
        self._journal_name = JOURNAL if rank == 0 else f"journal-rank{rank}.jsonl"
        self._wanted = wanted
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists() and (not create or rank > 0):
            raise StoreError(
                f"no store at {self.path} (no {MANIFEST}); pass create=True to make one"
                + ("." if rank == 0 else f" (rank {rank} opens a store after rank 0 made it).")
            )
        if rank > 0:  # a shard writer: rank 0 holds the lock, has checked, cleaned and folded
            self._manifest = self._load_manifest()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path)
        if not self._lock.acquire():
            self._open_as_reader(overwrite)
            return
        try:
            self._open_as_writer(overwrite)
        except BaseException:
            self.close()  # a refused store must not keep other processes out
            raise

    def _open_as_writer(self, overwrite: bool) -> None:
        manifest_path, wanted = self.path / MANIFEST, self._wanted
        remove_temporaries(self.path)
        if manifest_path.exists():
            try:
                self._manifest = self._load_manifest()
                self._replay_journal()
                if self._probes and self._manifest["probes"] != self._probes:
                    # probes over other inputs (named after them) replace the stored ones
                    self._write_manifest({**self._manifest, "probes": self._probes})
                return
            except StoreError:
                if not overwrite:
                    raise
                delete_owned(self.path, keep_lock=True)
                self.path.mkdir(parents=True, exist_ok=True)
        for old in self._journals():  # ours, but they belong to no manifest any more
            if old.exists():
                if not _is_our_journal(old):
                    raise StoreError(
                        f"{old} is not a datatrace journal; a store would append to it. Move "
                        "it away or give the store another directory."
                    )
                old.unlink()
        self._manifest = {**wanted, "probes": self._probes, "shards": {}, "arrays": {}}
        self._write_manifest(self._manifest)

    def _open_as_reader(self, overwrite: bool) -> None:
        """Another process writes this store: read its last complete state, write nothing."""
        assert self._lock is not None
        busy = f"store {self.path} is being written by another process ({self._lock.reason})"
        if not (self.path / MANIFEST).exists():
            raise StoreError(f"{busy}; wait for it to finish, or use another directory.")
        try:
            self._manifest = self._load_manifest()
        except StoreError as exc:
            if overwrite:
                raise StoreError(f"{busy}, so overwrite=True cannot clear it now ({exc})") from exc
            raise
        self._replay_journal(persist=False)

    def close(self) -> None:
        """Give the writer lock back; reading goes on, and a later write takes it again."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    @staticmethod
    def clear(path: str | os.PathLike[str]) -> None:
        """Delete what a store wrote: the files its manifest and journals list, its journals,
        temporaries, lock files and manifest. Other files are kept.

        Raises:
            StoreError: another process is writing the store, or ``manifest.json`` is not a
                datatrace manifest (it is not deleted).
        """
        root = Path(path)
        if not root.is_dir():
            return
        lock = WriterLock(root)
        if not lock.acquire():
            raise StoreError(
                f"cannot clear store {root}: another process is writing it ({lock.reason}); "
                "wait for it to finish."
            )
        try:
            delete_owned(root, keep_lock=False)
        finally:
            lock.release()
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()

    @property
    def config(self) -> dict[str, Any]:
        """The (JSON-normalised) settings this store was written for."""
        return json.loads(json.dumps(self._manifest["config"]))

    @property
    def fingerprints(self) -> dict[str, str]:
        """The fingerprints this store was written for."""
        return dict(self._manifest["fingerprints"])

    @property
    def writing(self) -> bool:
        """Whether this store holds the writer lock (ranks > 0 write under rank 0's)."""
        return self.rank > 0 or (self._lock is not None and self._lock.held)

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
        self._require_writer(f"write shard {kind!r} #{index}")
        if str(index) in self._manifest["shards"].get(kind, {}):
            # Retract the old entry first: a job killed while replacing the file must not leave
            # the new contents listed under the old shape and data fingerprint.
            self._journal(kind, index, None)
        entry = self._write_file(_shard_file(kind, index), array)
        entry.update(index=index, data_fingerprint=str(data_fingerprint))
        self._journal(kind, index, entry)

    def _journal(self, kind: str, index: int, entry: dict[str, Any] | None) -> None:
        line = json.dumps({"kind": kind, "index": index, "entry": entry}, sort_keys=True)
        with (
            no_space(self.path, self._journal_name, len(line) + 1),
            open(self.path / self._journal_name, "ab") as f,
        ):
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
        self._require_writer("compact the manifest")
        self._write_manifest(json.loads(json.dumps(self._manifest)))
        (self.path / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.path)

    def merge_journals(self) -> None:
        """Rank 0: fold every rank's journal into the manifest (call after a barrier).

        Records are applied journal by journal; ranks write disjoint shard indices, so the
        order between journals does not matter. Folded journals are deleted once the
        manifest that holds them is on disk.
        """
        self._check_owner("merge journals")
        self._require_writer("merge journals")
        self._replay_journal()

    def reload(self) -> None:
        """Re-read the manifest from disk (ranks > 0, after rank 0 merged the journals).

        Raises:
            StoreError: the manifest no longer matches this store's config or fingerprints.
        """
        self._manifest = self._load_manifest()

    def _check_owner(self, what: str) -> None:
        if self.rank != 0:
            raise StoreError(
                f"store {self.path} was opened with rank={self.rank}, which only writes shards; "
                f"rank 0 owns the manifest and must {what}."
            )

    def _require_writer(self, what: str) -> None:
        """Take the writer lock if this store does not hold it (re-reading the store then)."""
        if self.writing:
            return
        assert self._lock is not None
        if not self._lock.acquire():
            raise StoreError(
                f"cannot {what}: store {self.path} is being written by another process "
                f"({self._lock.reason}), and a second writer is refused. Wait for it to finish "
                "(this store resumes from its complete shards), or use another directory."
            )
        remove_temporaries(self.path)
        self._manifest = self._load_manifest()  # the other writer may have changed it
        self._replay_journal()

    def _journals(self) -> list[Path]:
        """This store's journal files: rank 0's first, then the other ranks' by name."""
        return journal_files(self.path)

    def has_shard(self, kind: str, index: int, data_fingerprint: str | None = None) -> bool:
        """Whether shard ``index`` is complete (and, if given, was made from ``data_fingerprint``).

        A shard whose file is missing, not a regular file, or not of the recorded size is not
        complete (the featurization loop recomputes it); its checksum is verified on read.
        """
        entry = self._manifest["shards"].get(kind, {}).get(str(index))
        if entry is None or not file_intact(self.path, entry):
            return False
        return data_fingerprint is None or entry["data_fingerprint"] == data_fingerprint

    def read_shard(self, kind: str, index: int, mmap: bool = True) -> torch.Tensor:
        """Load shard ``index`` of ``kind`` in its recorded dtype, its checksum verified.

        With ``mmap=True`` the tensor is backed by the file through a copy-on-write memory map:
        pages are read lazily, and in-place changes stay in memory and never reach the file.
        Call ``.clone()`` for an independent tensor.

        Raises:
            StoreError: no such complete shard, or its file is damaged (it is then marked
                incomplete, so that the next run recomputes it).
        """
        entry = self._shard_entry(kind, index)
        return self._read_file(entry, mmap, lambda: self._journal(kind, index, None))

    def _shard_entry(self, kind: str, index: int) -> dict[str, Any]:
        entry = self._manifest["shards"].get(kind, {}).get(str(index))
        if entry is None:
            raise StoreError(
                f"store {self.path} has no complete shard {kind!r} #{index}; complete: "
                f"{self.shard_indices(kind)}. Write it with write_shard first."
            )
        return entry

    def shard_indices(self, kind: str) -> list[int]:
        """Sorted indices of the complete shards of ``kind``."""
        return sorted(int(i) for i in self._manifest["shards"].get(kind, {}))

    def row_bytes(self, kind: str) -> int | None:
        """Bytes per row (leading index) of the complete shards of ``kind``, from the manifest
        (no read); None when it has none."""
        for entry in self._manifest["shards"].get(kind, {}).values():
            itemsize = torch.empty(0, dtype=_DTYPES[entry["dtype"]][0]).element_size()
            return math.prod(entry["shape"][1:]) * itemsize
        return None

    def shard_rows(self, kind: str, index: int) -> int:
        """Leading size of complete shard ``index`` of ``kind``, from the manifest (no read)."""
        entry = self._shard_entry(kind, index)
        return int(entry["shape"][0]) if entry["shape"] else 1

    def iter_shards(self, kind: str, mmap: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(index, tensor)`` for every complete shard of ``kind``, in index order."""
        for index in self.shard_indices(kind):
            yield index, self.read_shard(kind, index, mmap=mmap)

    def write_array(self, name: str, tensor: torch.Tensor) -> None:
        """Atomically write the named array of fitted state (replacing any earlier version)."""
        _check_name(name, "array")
        self._check_owner("write arrays")
        self._require_writer(f"write array {name!r}")
        entry = self._write_file(_array_file(name), tensor)
        manifest = json.loads(json.dumps(self._manifest))
        manifest["arrays"][name] = entry
        self._write_manifest(manifest)

    def has_array(self, name: str) -> bool:
        """Whether the named array is complete (present, of the recorded size)."""
        entry = self._manifest["arrays"].get(name)
        return entry is not None and file_intact(self.path, entry)

    def read_array(self, name: str, mmap: bool = True) -> torch.Tensor:
        """Load the named array in its recorded dtype (``mmap`` and checks as in
        :meth:`read_shard`)."""
        entry = self._manifest["arrays"].get(name)
        if entry is None:
            raise StoreError(
                f"store {self.path} has no array {name!r}; it has {sorted(self._manifest['arrays'])}."
                " Write it with write_array first."
            )

        def retract() -> None:
            manifest = json.loads(json.dumps(self._manifest))
            del manifest["arrays"][name]
            self._write_manifest(manifest)

        return self._read_file(entry, mmap, retract)

    def cached(
        self,
        prefix: str,
        names: Sequence[str],
        fit: Callable[[], Mapping[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Fitted arrays ``prefix + name`` for every name: read when all are complete, else
        ``fit()`` (written here, then returned).

        One call for every piece of fitted state a method keeps (curvature factors, a refit
        layer): a run killed between two writes finds some arrays missing and fits again.
        Only rank 0 writes (it owns the arrays, :class:`Store`); the other ranks of a
        distributed job fit the same arrays and keep them in memory. Reads are not memory
        mapped (fitted state is small and used whole).

        Args:
            prefix: what keys this state: the method, member and data it was fitted on
                (e.g. ``"kfac-v2-m0-3fa2...-"``); part of every array's name.
            names: the arrays ``fit`` returns, in the order they are written.
            fit: computes ``{name: tensor}`` for exactly ``names``.

        Returns:
            ``{name: tensor}`` in the order of ``names``: the stored arrays (on the CPU, in
            their recorded dtype) or ``fit``'s own tensors.

        Raises:
            StoreError: ``fit`` returned other names, or a stored array is corrupt (it is then
                marked incomplete, so the next run fits again).

        Example:
            >>> import tempfile, torch
            >>> s = Store(tempfile.mkdtemp(), config={}, fingerprints={})
            >>> fit = lambda: {"inverse": torch.eye(2)}
            >>> s.cached("m0-", ["inverse"], fit)["inverse"].shape  # fitted, written
            torch.Size([2, 2])
            >>> s.cached("m0-", ["inverse"], lambda: {})["inverse"].shape  # read back
            torch.Size([2, 2])
        """
        names = list(names)
        if names and all(self.has_array(prefix + n) for n in names):
            return {n: self.read_array(prefix + n, mmap=False) for n in names}
        arrays = dict(fit())
        if sorted(arrays) != sorted(names):
            raise StoreError(
                f"the fit of store arrays {prefix!r}* returned {sorted(arrays)}, but "
                f"{sorted(names)} were declared; return exactly the declared names."
            )
        if self.rank == 0:  # rank 0 owns the arrays
            for n in names:
                self.write_array(prefix + n, arrays[n])
        return {n: arrays[n] for n in names}

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

    def _fix(self) -> str:
        return (
            f"use another directory, delete it with Store.clear({str(self.path)!r}), or pass "
            "overwrite=True to start over."
        )

    def _load_manifest(self) -> dict[str, Any]:
        """The manifest on disk, checked against this job and entry by entry."""
        wanted, fix, file = self._wanted, self._fix(), self.path / MANIFEST
        manifest = read_manifest(file, fix)
        legacy = manifest["format_version"] == 1  # no checksums yet: upgraded below
        diffs = job_differences(manifest, wanted, self._probes, self._probe_rtol)
        if diffs:
            raise StoreError(
                f"store {self.path} was written for a different job and its arrays would be "
                f"stale: {'; '.join(diffs)}. To continue, {fix}"
            )
        check_entries(manifest, file, fix, legacy)
        if legacy:
            self._upgrade(manifest)
        manifest.setdefault("probes", {})
        return manifest

    def _upgrade(self, manifest: dict[str, Any]) -> None:
        """Version 1 entries get their size and checksum from their files (trusted once);
        entries whose file is gone are dropped (recomputed)."""
        upgrade_entries(self.path, manifest)
        if self.writing and self.rank == 0:
            self._write_manifest(manifest)

    def _replay_journal(self, persist: bool = True) -> None:
        journals = [j for j in self._journals() if j.exists()]
        if not journals:
            return
        for journal in journals:
            apply_journal(self._manifest, journal)
        if not persist:  # a reader: the writer folds them
            return
        self.compact()  # removes rank 0's journal; the manifest now holds the others too
        for journal in journals:
            journal.unlink(missing_ok=True)
        fsync_dir(self.path)

    def _atomic_write(self, name: str, write: Callable[[IO[bytes]], object], size: int) -> None:
        write_file(self.path, name, write, size)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self._atomic_write(MANIFEST, lambda f: f.write(text), len(text))
        self._manifest = manifest  # only once it is on disk

    def _write_file(self, name: str, tensor: torch.Tensor) -> dict[str, Any]:
        head, data, entry = encode_npy(tensor)

        def write(f: IO[bytes]) -> None:
            f.write(head)
            f.write(data)

        self._atomic_write(name, write, entry["nbytes"])
        return {"file": name, **entry}

    def _read_file(
        self, entry: dict[str, Any], mmap: bool, retract: Callable[[], None]
    ) -> torch.Tensor:
        file = self.path / entry["file"]

        def corrupt(reason: str, exc: BaseException | None = None) -> StoreError:
            fix = "Delete it with Store.clear(path) and recompute."
            if self.writing:
                retract()
                fix = "It is now marked incomplete: run again to recompute it (the rest is kept)."
            return StoreError(
                f"{file} is corrupt ({reason}): damaged or tampered with, its data is not used. "
                + fix
            )

        return read_npy(self.path, entry, mmap, corrupt)
