"""Damaged stores: every corruption is a StoreError naming the file, or a shard recomputed.

Integrity (checksums, sizes, shapes, dtypes), path traversal, ownership of deleted files and a
full disk (issue 18).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import datatrace.store as store_module
from datatrace.errors import StoreError
from datatrace.store import Store

CONFIG = {"proj_dim": 8}
FPS = {"model": "a" * 64}
SHARD0 = "shard-features-000000.npy"


def make_store(path: Path, **kwargs) -> Store:
    return Store(path, config=kwargs.pop("config", CONFIG), fingerprints=FPS, **kwargs)


def written(path: Path) -> Store:
    """A store with two float shards of the same shape and one array, manifest compacted."""
    store = make_store(path)
    store.write_shard("features", 0, torch.arange(12.0).reshape(3, 4), data_fingerprint="b0")
    store.write_shard("features", 1, -torch.arange(12.0).reshape(3, 4), data_fingerprint="b1")
    store.write_array("inverse", torch.eye(4, dtype=torch.float64))
    store.compact()
    return store


def edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((path / "manifest.json").read_text())
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x10
    file.write_bytes(bytes(data))


def plant_nan(file: Path) -> None:
    values = np.load(file)
    values[1, 2] = np.nan
    np.save(file, values, allow_pickle=False)  # same size, same header: only the data differ


# (name, damage to the files of a written store, whether has_shard still says complete)
FILE_DAMAGE: list[tuple[str, Callable[[Path], None], bool]] = [
    ("truncated", lambda p: (p / SHARD0).write_bytes((p / SHARD0).read_bytes()[:-7]), False),
    ("zero-byte", lambda p: (p / SHARD0).write_bytes(b""), False),
    ("missing", lambda p: (p / SHARD0).unlink(), False),
    ("directory", lambda p: ((p / SHARD0).unlink(), (p / SHARD0).mkdir()), False),
    ("bit flip", lambda p: flip_last_byte(p / SHARD0), True),
    ("NaN planted", lambda p: plant_nan(p / SHARD0), True),
    (
        "swapped for another shard of the same shape",
        lambda p: (p / SHARD0).write_bytes((p / "shard-features-000001.npy").read_bytes()),
        True,
    ),
    (
        "header garbage",
        lambda p: (p / SHARD0).write_bytes(b"x" * (p / SHARD0).stat().st_size),
        True,
    ),
]


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(
    ("name", "damage", "looks_complete"), FILE_DAMAGE, ids=[c[0] for c in FILE_DAMAGE]
)
def test_damaged_shard_is_refused_naming_the_file_and_then_recomputed(
    tmp_path: Path, name: str, damage: Callable[[Path], None], looks_complete: bool, mmap: bool
) -> None:
    written(tmp_path)
    damage(tmp_path)
    store = make_store(tmp_path)
    # the featurization loop skips only complete shards: damaged sizes are recomputed at once
    assert store.has_shard("features", 0, "b0") is looks_complete
    with pytest.raises(StoreError, match=f"{SHARD0}.*(corrupt|damaged)") as info:
        store.read_shard("features", 0, mmap=mmap)
    assert "run again to recompute it" in str(info.value)
    assert not store.has_shard("features", 0)  # marked incomplete, on disk too
    assert not make_store(tmp_path).has_shard("features", 0)
    assert torch.equal(store.read_shard("features", 1), -torch.arange(12.0).reshape(3, 4))
    if (tmp_path / SHARD0).is_dir():
        (tmp_path / SHARD0).rmdir()
    store.write_shard("features", 0, torch.ones(3, 4), data_fingerprint="b0")  # recompute
    assert torch.equal(make_store(tmp_path).read_shard("features", 0), torch.ones(3, 4))


@pytest.mark.parametrize("mmap", [True, False])
def test_damaged_array_is_refused_and_marked_incomplete(tmp_path: Path, mmap: bool) -> None:
    written(tmp_path)
    flip_last_byte(tmp_path / "array-inverse.npy")
    store = make_store(tmp_path)
    assert store.has_array("inverse")  # same size: only the checksum tells
    with pytest.raises(StoreError, match=r"array-inverse\.npy.*checksum"):
        store.read_array("inverse", mmap=mmap)
    assert not store.has_array("inverse") and not make_store(tmp_path).has_array("inverse")


def test_reader_reports_damage_without_writing(tmp_path: Path) -> None:
    written(tmp_path)
    flip_last_byte(tmp_path / SHARD0)
    store = make_store(tmp_path)
    store.close()  # a reader now: it reports the damage but changes nothing
    with pytest.raises(StoreError, match=r"Store\.clear"):
        store.read_shard("features", 0)


def _set(path: list, value) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


MANIFEST_DAMAGE = [
    ("entry is a string", _set(["shards", "features", "0"], "x"), "must be an object"),
    ("unknown dtype", _set(["shards", "features", "0", "dtype"], "float99"), "float99"),
    ("shape not a list", _set(["shards", "features", "0", "shape"], "3x4"), "shape"),
    ("negative size", _set(["shards", "features", "0", "shape"], [-3, 4]), "shape"),
    ("no checksum", _set(["shards", "features", "0", "checksum"], None), "checksum"),
    ("index not a number", _set(["shards", "features", "zero"], {}), "not a number"),
    ("kind with a slash", _set(["shards", "../x"], {}), "malformed shard kind"),
    ("arrays not an object", _set(["arrays"], []), "not a datatrace store manifest"),
    ("traversal ..", _set(["shards", "features", "0", "file"], "../secret.npy"), "secret"),
    ("absolute path", _set(["arrays", "inverse", "file"], "/etc/passwd"), "passwd"),
    (
        "another shard's file",
        _set(["shards", "features", "0", "file"], "shard-features-000001.npy"),
        "expected",
    ),
    ("extra entry", _set(["shards", "features", "2"], {"file": "array-inverse.npy"}), "expected"),
]


@pytest.mark.parametrize(
    ("name", "change", "words"), MANIFEST_DAMAGE, ids=[c[0] for c in MANIFEST_DAMAGE]
)
def test_malformed_manifest_entry_is_refused_naming_the_manifest(
    tmp_path: Path, name: str, change: Callable[[dict], None], words: str
) -> None:
    written(tmp_path)
    edit_manifest(tmp_path, change)
    with pytest.raises(StoreError, match="manifest") as info:
        make_store(tmp_path)
    assert words in str(info.value)
    if "not a datatrace" not in str(info.value):
        assert "overwrite=True" in str(info.value)
        assert make_store(tmp_path, overwrite=True).shard_indices("features") == []


@pytest.mark.parametrize(
    "text", ["", "{not json", '{"format_version": 2, "config": {', "[]", "null"]
)
def test_invalid_or_half_written_manifest_is_refused(tmp_path: Path, text: str) -> None:
    written(tmp_path)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match=r"manifest\.json"):
        make_store(tmp_path)


def test_symlinked_shard_is_never_followed(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    written(store_dir)
    outside = tmp_path / "secret.npy"
    np.save(outside, np.arange(12.0, dtype=np.float32).reshape(3, 4))
    (store_dir / SHARD0).unlink()
    (store_dir / SHARD0).symlink_to(outside)
    store = make_store(store_dir)
    assert not store.has_shard("features", 0)
    with pytest.raises(StoreError, match="corrupt"):
        store.read_shard("features", 0)
    assert outside.exists()


MALFORMED_LINES = [
    b"not json",
    b'"a string"',
    b'{"kind": "features", "index": 2}',
    b'{"kind": "features", "index": "2", "entry": {}}',
    b'{"kind": "features", "index": 2, "entry": "x"}',
    b'{"kind": "../x", "index": 2, "entry": null}',
    b'{"kind": "features", "index": 2, "entry": {"file": "../../etc/passwd", "shape": [1],'
    b' "dtype": "float32", "nbytes": 1, "checksum": "x"}}',
    b'{"kind": "features", "index": 2, "entry": {"file": "shard-features-000002.npy",'
    b' "shape": [1], "dtype": "float99", "nbytes": 1, "checksum": "x"}}',
]


@pytest.mark.parametrize("line", MALFORMED_LINES)
def test_malformed_journal_line_counts_as_not_written(tmp_path: Path, line: bytes) -> None:
    store = make_store(tmp_path)
    store.write_shard("features", 0, torch.ones(2))
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(line + b"\n")
    reopened = make_store(tmp_path)
    assert reopened.shard_indices("features") == [0]
    assert not (tmp_path / "journal.jsonl").exists()  # folded


def test_temporaries_of_others_are_kept_and_own_leftovers_removed(tmp_path: Path) -> None:
    written(tmp_path)
    (tmp_path / ".tmp-dir").mkdir()  # a leftover temporary directory
    (tmp_path / ".tmp-dir" / "x").write_text("x")
    (tmp_path / ".tmp-notes.txt").write_text("a user's file")
    (tmp_path / ".tmp-datatrace-abcd1234.part").write_bytes(b"half a shard")
    (tmp_path / ".tmp-abcd1234.part").write_bytes(b"half a shard, version 1")
    store = make_store(tmp_path)
    assert store.shard_indices("features") == [0, 1]
    names = {p.name for p in tmp_path.iterdir()}
    assert {".tmp-dir", ".tmp-notes.txt"} <= names
    assert not names & {".tmp-datatrace-abcd1234.part", ".tmp-abcd1234.part"}


def test_clear_and_overwrite_delete_only_what_the_store_wrote(tmp_path: Path) -> None:
    written(tmp_path)
    mine = {
        "notes.txt": b"keep me",
        "array-mine.npy": b"a user's file in the store's naming scheme",
        "shard-other-000003.npy": b"so is this one",
        "journal.txt": b"keep",
    }
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    make_store(tmp_path, config={"proj_dim": 16}, overwrite=True)  # a stale store, cleared
    assert {n: (tmp_path / n).read_bytes() for n in mine} == mine
    assert not (tmp_path / SHARD0).exists() and not (tmp_path / "array-inverse.npy").exists()
    Store.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine)


def test_a_users_manifest_is_never_deleted(tmp_path: Path) -> None:
    theirs = json.dumps({"name": "my project", "files": ["a.csv"]})
    (tmp_path / "manifest.json").write_text(theirs)
    for attempt in (
        lambda: make_store(tmp_path),
        lambda: make_store(tmp_path, overwrite=True),
        lambda: Store.clear(tmp_path),
    ):
        with pytest.raises(StoreError, match="not a datatrace store manifest"):
            attempt()
    assert (tmp_path / "manifest.json").read_text() == theirs


def test_a_users_journal_is_not_appended_to(tmp_path: Path) -> None:
    (tmp_path / "journal.jsonl").write_text('{"event": "mine"}\n')
    with pytest.raises(StoreError, match="not a datatrace journal"):
        make_store(tmp_path)
    assert (tmp_path / "journal.jsonl").read_text() == '{"event": "mine"}\n'


@pytest.mark.parametrize("where", ["file", "journal", "manifest"])
def test_full_disk_is_a_store_error_naming_the_store_and_the_bytes(
    tmp_path: Path, monkeypatch, where: str
) -> None:
    store = make_store(tmp_path)
    store.write_shard("features", 0, torch.ones(4, 4))
    real_fsync = os.fsync
    temporaries = {"n": 0}
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to tell the files apart")

    def full(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if ".tmp-datatrace-" in path:
            temporaries["n"] += 1
        hit = {
            "file": ".tmp-datatrace-" in path,
            "journal": path.endswith("journal.jsonl"),
            "manifest": temporaries["n"] == 2,  # write_array: the array, then the manifest
        }[where]
        if hit:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", full)
    with pytest.raises(StoreError, match="no space left") as info:
        if where == "manifest":
            store.write_array("inverse", torch.eye(2))
        else:
            store.write_shard("features", 1, torch.ones(4, 4))
    message = str(info.value)
    assert str(tmp_path) in message and "bytes" in message
    if where == "file":
        assert f"{128 + 64:,} bytes" in message  # header + 16 float32
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*"))
    reopened = make_store(tmp_path)
    # nothing lost; the journal case wrote its line before fsync failed: complete and intact
    assert reopened.shard_indices("features") == ([0, 1] if where == "journal" else [0])
    assert all(torch.equal(t, torch.ones(4, 4)) for _, t in reopened.iter_shards("features"))
    reopened.write_shard("features", 1, torch.ones(4, 4))  # resumes once space is freed
    assert reopened.shard_indices("features") == [0, 1]


def test_version_1_store_is_upgraded_with_checksums(tmp_path: Path) -> None:
    written(tmp_path)

    def to_v1(data: dict) -> None:
        data["format_version"] = 1
        del data["probes"]
        for entry in [*data["shards"]["features"].values(), *data["arrays"].values()]:
            del entry["nbytes"], entry["checksum"]

    edit_manifest(tmp_path, to_v1)
    store = make_store(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 2
    assert torch.equal(store.read_array("inverse"), torch.eye(4, dtype=torch.float64))
    flip_last_byte(tmp_path / SHARD0)
    with pytest.raises(StoreError, match="checksum"):
        make_store(tmp_path).read_shard("features", 0)
