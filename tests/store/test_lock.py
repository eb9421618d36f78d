"""Two processes on one store: the second writer is refused, readers read, a killed writer's
lock does not outlive it (issue 18)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from datatrace import Task, make_attributor
from datatrace.errors import StoreError
from datatrace.store import Store
from tests.models import classification_data, mlp

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time, torch
from datatrace.store import Store
s = Store(sys.argv[1], config={"proj_dim": 8}, fingerprints={})
s.write_shard("features", 0, torch.ones(3))
print("holding", flush=True)
time.sleep(120)
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, env=env(), text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding"
    return proc


def open_store(path: Path) -> Store:
    return Store(path, config={"proj_dim": 8}, fingerprints={})


def test_second_writer_is_refused_naming_the_holder_and_readers_read(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        reader = open_store(tmp_path)  # opens as a reader: no error yet
        assert not reader.writing
        assert torch.equal(reader.read_shard("features", 0), torch.ones(3))
        with pytest.raises(StoreError, match=f"pid {holder.pid}.*second writer is refused"):
            reader.write_shard("features", 1, torch.ones(3))
        with pytest.raises(StoreError, match=f"pid {holder.pid}"):
            reader.write_array("x", torch.ones(3))
        with pytest.raises(StoreError, match="another process is writing"):
            Store.clear(tmp_path)
        with pytest.raises(StoreError, match="overwrite=True cannot clear it now"):
            Store(tmp_path, config={"proj_dim": 16}, fingerprints={}, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (SIGKILL): its OS lock went with it, and this process takes over
    reader.write_shard("features", 1, torch.full((3,), 2.0))
    assert reader.writing
    assert open_store(tmp_path).shard_indices("features") == [0, 1]


def test_lock_of_a_killed_process_does_not_block_the_next_run(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys, torch
        from datatrace.store import Store
        s = Store(sys.argv[1], config={"proj_dim": 8}, fingerprints={})
        s.write_shard("features", 0, torch.ones(3))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, env=env(), timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / "writer.lock").exists()  # the file stays; the OS lock did not
    store = open_store(tmp_path)
    assert store.writing
    store.write_shard("features", 1, torch.ones(3))
    assert store.shard_indices("features") == [0, 1]


def test_fit_while_another_process_writes(tmp_path: Path) -> None:
    """A complete store is read while another process holds the lock; an incomplete one is
    refused at its first write, and resumes once the holder is gone."""
    task = Task(mlp())
    train, queries = classification_data(12), classification_data(3, seed=2)
    store = tmp_path / "store"
    ref = make_attributor("grad-dot", task, batch_size=4, store=store).fit(train)
    expected = ref.attribute(queries).values
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from datatrace.store_lock import WriterLock; from pathlib import "
            "Path; WriterLock(Path(sys.argv[1])).acquire(); print('holding', flush=True); "
            "time.sleep(120)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        env=env(),
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        again = make_attributor("grad-dot", task, batch_size=4, store=store).fit(train)
        torch.testing.assert_close(again.attribute(queries).values, expected, rtol=0, atol=0)
        (store / "shard-train-m0-000000.npy").unlink()  # incomplete: fit must write
        with pytest.raises(StoreError, match="second writer is refused"):
            make_attributor("grad-dot", task, batch_size=4, store=store).fit(train)
    finally:
        holder.kill()
        holder.wait()
    resumed = make_attributor("grad-dot", task, batch_size=4, store=store).fit(train)
    torch.testing.assert_close(resumed.attribute(queries).values, expected, rtol=0, atol=0)
