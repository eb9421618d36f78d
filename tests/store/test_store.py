"""Tests of the sharded store: round trips, atomicity, resume and refusal of stale stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from datatrace.errors import ConfigError, StoreError
from datatrace.store import Store, fingerprint_batch, fingerprint_tensors

CONFIG = {"proj_dim": 8, "damping": 1e-3, "layers": ("fc1", "fc2")}
FPS = {"model": "a" * 64, "train": "b" * 64}


def make_store(path: Path, **kwargs) -> Store:
    return Store(path, config=kwargs.pop("config", CONFIG), fingerprints=FPS, **kwargs)


def manifest(path: Path) -> dict:
    """The manifest on disk after reopening the store (which folds the journal into it)."""
    make_store(path)
    return json.loads((path / "manifest.json").read_text())


def sample(dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(3, 5) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, (3, 5))
    return torch.randn(3, 5, dtype=torch.float64).to(dtype)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(tmp_path: Path, dtype: torch.dtype, mmap: bool) -> None:
    store = make_store(tmp_path)
    x = sample(dtype)
    store.write_shard("features", 0, x)
    store.write_array("state", x.T)  # non-contiguous input
    for y in (store.read_shard("features", 0, mmap=mmap), store.read_array("state", mmap=mmap)):
        assert y.dtype == dtype
    assert torch.equal(store.read_shard("features", 0, mmap=mmap), x)
    assert torch.equal(make_store(tmp_path).read_array("state", mmap=mmap), x.T)
    assert manifest(tmp_path)["shards"]["features"]["0"]["dtype"] == str(dtype)[6:]


def test_scalar_and_empty_arrays_round_trip(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.write_array("scalar", torch.tensor(2.5))
    store.write_shard("features", 0, torch.zeros(0, 4))
    assert store.read_array("scalar").item() == 2.5
    assert store.read_shard("features", 0).shape == (0, 4)


def test_mmap_read_returns_values_and_never_writes_back(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    x = torch.arange(12.0).reshape(3, 4)
    store.write_shard("features", 2, x)
    y = store.read_shard("features", 2, mmap=True)
    assert torch.equal(y, x)
    y[0, 0] = 100.0  # copy-on-write: stays in memory
    assert torch.equal(store.read_shard("features", 2, mmap=False), x)


def test_crash_before_rename_leaves_no_shard(tmp_path: Path, monkeypatch) -> None:
    store = make_store(tmp_path)
    store.write_shard("features", 0, torch.ones(2, 2))
    real_replace = os.replace

    def crash_on_shard(src, dst):
        if Path(dst).name.startswith("shard-"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_shard)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard("features", 1, torch.ones(2, 2))
    monkeypatch.setattr(os, "replace", real_replace)

    assert "1" not in manifest(tmp_path)["shards"]["features"]
    assert not store.has_shard("features", 1)
    assert not list(tmp_path.glob(".tmp-*"))
    reopened = make_store(tmp_path)
    assert reopened.shard_indices("features") == [0]
    reopened.write_shard("features", 1, torch.zeros(2, 2))
    assert reopened.shard_indices("features") == [0, 1]


def test_crash_before_journal_append_does_not_count_the_shard(tmp_path: Path, monkeypatch) -> None:
    store = make_store(tmp_path)

    def killed(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(Store, "_journal", killed)
    with pytest.raises(OSError):
        store.write_shard("features", 0, torch.ones(2))
    monkeypatch.undo()
    assert (tmp_path / "shard-features-000000.npy").exists()  # renamed, but never recorded
    assert not store.has_shard("features", 0)
    assert not make_store(tmp_path).has_shard("features", 0)


def test_torn_journal_line_is_ignored_and_the_journal_is_compacted(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for i in range(3):
        store.write_shard("features", i, torch.full((2,), float(i)), data_fingerprint=f"b{i}")
    assert "features" not in json.loads((tmp_path / "manifest.json").read_text())["shards"]
    journal = tmp_path / "journal.jsonl"
    text = journal.read_bytes()
    journal.write_bytes(text[: len(text) - 20])  # the last append was killed mid-line
    reopened = make_store(tmp_path)
    assert reopened.shard_indices("features") == [0, 1]
    assert not journal.exists()  # folded into the manifest
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["shards"]["features"]) == [
        "0",
        "1",
    ]
    reopened.write_shard("features", 2, torch.full((2,), 2.0), data_fingerprint="b2")
    assert torch.equal(make_store(tmp_path).read_shard("features", 2), torch.full((2,), 2.0))


def test_replacing_a_shard_retracts_the_old_entry_before_the_file_changes(
    tmp_path: Path, monkeypatch
) -> None:
    store = make_store(tmp_path)
    store.write_shard("features", 0, torch.ones(2), data_fingerprint="old")
    real_replace = os.replace

    def crash_on_shard(src, dst):
        if Path(dst).name.startswith("shard-"):
            real_replace(src, dst)  # the new contents land, then the job dies
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_shard)
    with pytest.raises(OSError):
        store.write_shard("features", 0, torch.zeros(3), data_fingerprint="new")
    monkeypatch.undo()
    reopened = make_store(tmp_path)
    assert not reopened.has_shard("features", 0)  # neither stale "old" nor unrecorded "new"
    assert not reopened.has_shard("features", 0, data_fingerprint="old")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killed_write_leaves_temp_file_that_reopen_ignores_and_removes(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from datatrace.store import Store
        s = Store({str(tmp_path)!r}, config={{"proj_dim": 8}}, fingerprints={{}})
        s.write_shard("features", 0, torch.ones(3))
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        s.write_shard("features", 1, torch.ones(3))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert len(list(tmp_path.glob(".tmp-*"))) == 1
    store = Store(tmp_path, config={"proj_dim": 8}, fingerprints={})
    assert store.shard_indices("features") == [0]
    assert not list(tmp_path.glob(".tmp-*"))


def test_reopen_with_same_config_resumes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for i in (2, 0, 1):
        store.write_shard("features", i, torch.full((2,), float(i)), data_fingerprint=f"b{i}")
    store.write_array("kernel_inverse", torch.eye(3))
    # tuples and lists normalise to the same JSON
    again = make_store(tmp_path, config={**CONFIG, "layers": ["fc1", "fc2"]})
    assert again.shard_indices("features") == [0, 1, 2]
    assert [float(t[0]) for _, t in again.iter_shards("features")] == [0.0, 1.0, 2.0]
    assert again.has_shard("features", 1, data_fingerprint="b1")
    assert again.has_array("kernel_inverse") and not again.has_array("other")
    assert again.shard_indices("scores") == []
    assert again.nbytes() == sum(f.stat().st_size for f in tmp_path.glob("*.npy"))
    assert again.nbytes() > 3 * 2 * 4


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"config": {**CONFIG, "damping": 1e-2}}, "config.damping"),
        ({"config": {**CONFIG, "seed": 0}}, "config.seed"),
        ({"fingerprints": {**FPS, "model": "c" * 64}}, "fingerprints.model"),
    ],
)
def test_reopen_with_different_job_is_refused(tmp_path: Path, change: dict, key: str) -> None:
    make_store(tmp_path).write_shard("features", 0, torch.ones(2))
    kwargs = {"config": CONFIG, "fingerprints": FPS, **change}
    with pytest.raises(StoreError) as info:
        Store(tmp_path, **kwargs)
    message = str(info.value)
    assert key in message
    assert message.count(": stored ") == 1  # only the differing key is listed
    assert "Store.clear" in message and "overwrite=True" in message
    assert "c" * 64 not in message  # long values are shortened
    fresh = Store(tmp_path, overwrite=True, **kwargs)
    assert fresh.shard_indices("features") == []


def test_format_version_change_is_refused(tmp_path: Path) -> None:
    make_store(tmp_path)
    data = manifest(tmp_path)
    data["format_version"] = 0
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(StoreError, match="format_version"):
        make_store(tmp_path)


def test_corrupt_manifest_and_missing_store(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        make_store(tmp_path)
    with pytest.raises(StoreError, match="create=True"):
        make_store(tmp_path / "absent", create=False)


def test_stale_data_fingerprint_is_not_complete(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    store.write_shard("features", 0, torch.ones(4, 2), data_fingerprint=fingerprint_batch(batch))
    assert store.has_shard("features", 0, data_fingerprint=fingerprint_batch(batch))
    changed = (batch[0], torch.tensor([0, 1, 1, 1]))
    assert not store.has_shard("features", 0, data_fingerprint=fingerprint_batch(changed))
    store.write_shard("features", 0, torch.zeros(4, 2), data_fingerprint=fingerprint_batch(changed))
    assert store.has_shard("features", 0, data_fingerprint=fingerprint_batch(changed))
    assert torch.equal(store.read_shard("features", 0), torch.zeros(4, 2))


def test_has_shard_false_when_file_is_gone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.write_shard("features", 0, torch.ones(2))
    (tmp_path / "shard-features-000000.npy").unlink()
    assert not store.has_shard("features", 0)


def test_fingerprints_are_stable_and_sensitive() -> None:
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    y = torch.arange(5)
    base = fingerprint_tensors([x, y])
    assert base == fingerprint_tensors([x.clone(), y.clone()])
    assert len(base) == 64
    x2 = x.clone()
    x2[3, 1] += 1
    assert fingerprint_tensors([x2, y]) != base
    assert fingerprint_tensors([x.float(), y]) != base  # dtype counts
    assert fingerprint_tensors([x.reshape(4, 5), y]) != base  # shape counts
    assert fingerprint_tensors({"w": x}) != fingerprint_tensors({"v": x})  # names count
    assert fingerprint_tensors([x.T.contiguous().T, y]) == base  # memory layout does not


def test_dict_batch_fingerprint_ignores_key_order() -> None:
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    a = fingerprint_batch({"input_ids": ids, "attention_mask": mask})
    b = fingerprint_batch({"attention_mask": mask, "input_ids": ids})
    assert a == b
    assert a != fingerprint_batch({"input_ids": ids, "attention_mask": ~mask})
    assert fingerprint_batch((ids, mask)) != fingerprint_batch((mask, ids))


UNPICKLED: list[str] = []


class Payload:
    """Records being unpickled, as a malicious payload would run code."""

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append("ran")


def test_planted_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    payload = Payload()
    payload.x = 1  # a non-empty state, so that unpickling calls __setstate__
    planted = np.array([payload, None], dtype=object)
    for mmap in (True, False):
        store = make_store(tmp_path)
        store.write_shard("features", 0, torch.ones(2))
        store.write_array("state", torch.ones(2))
        for name in ("shard-features-000000.npy", "array-state.npy"):
            np.save(tmp_path / name, planted, allow_pickle=True)
        with pytest.raises(StoreError, match="corrupt"):
            store.read_shard("features", 0, mmap=mmap)
        with pytest.raises(StoreError, match="corrupt"):
            store.read_array("state", mmap=mmap)
        # marked incomplete: the next run recomputes them
        assert not store.has_shard("features", 0) and not store.has_array("state")
    assert UNPICKLED == []


def test_invalid_arguments_name_the_fix(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(ConfigError, match="complex64"):
        store.write_shard("features", 0, torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ConfigError, match="invalid shard kind"):
        store.write_shard("a/b", 0, torch.ones(2))
    with pytest.raises(ConfigError, match="index"):
        store.write_shard("features", -1, torch.ones(2))
    with pytest.raises(ConfigError, match="JSON"):
        make_store(tmp_path / "other", config={"fn": print})
    with pytest.raises(StoreError, match="complete: \\[\\]"):
        store.read_shard("features", 0)


def test_clear_removes_only_store_files(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.write_shard("features", 0, torch.ones(2))
    (tmp_path / "notes.txt").write_text("keep me")
    Store.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert make_store(tmp_path).shard_indices("features") == []


def test_cached_fits_once_then_reads_every_array(tmp_path: Path) -> None:
    calls: list[int] = []

    def fit() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"b": torch.full((2,), 2.0), "a": torch.eye(3, dtype=torch.float64)}

    first = make_store(tmp_path).cached("m0-", ["a", "b"], fit)
    assert list(first) == ["a", "b"] and len(calls) == 1  # in the declared order
    again = make_store(tmp_path).cached("m0-", ["a", "b"], fit)
    assert len(calls) == 1  # read back, not fitted
    assert all(torch.equal(first[n], again[n]) and first[n].dtype == again[n].dtype for n in "ab")
    assert sorted(manifest(tmp_path)["arrays"]) == ["m0-a", "m0-b"]  # the names keep the prefix
    # another prefix (other data, another member) is other state
    make_store(tmp_path).cached("m1-", ["a", "b"], fit)
    assert len(calls) == 2


def test_cached_fits_again_when_an_array_is_missing(tmp_path: Path) -> None:
    """A run killed between two array writes left one: the state is fitted whole again."""
    make_store(tmp_path).write_array("m0-a", torch.zeros(3))
    got = make_store(tmp_path).cached(
        "m0-", ["a", "b"], lambda: {"a": torch.ones(3), "b": torch.ones(1)}
    )
    assert torch.equal(got["a"], torch.ones(3))
    assert torch.equal(make_store(tmp_path).read_array("m0-a"), torch.ones(3))


def test_cached_refuses_undeclared_names_and_writes_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(StoreError, match=r"returned \['a', 'c'\], but \['a', 'b'\] were declared"):
        store.cached("m0-", ["a", "b"], lambda: {"a": torch.ones(1), "c": torch.ones(1)})
    assert manifest(tmp_path)["arrays"] == {}


def test_cached_on_a_shard_writing_rank_keeps_its_fit_in_memory(tmp_path: Path) -> None:
    make_store(tmp_path)  # rank 0 made it
    other = make_store(tmp_path, create=False, rank=1)
    got = other.cached("m0-", ["a"], lambda: {"a": torch.ones(2)})
    assert torch.equal(got["a"], torch.ones(2))
    assert manifest(tmp_path)["arrays"] == {}  # rank 0 owns the arrays
