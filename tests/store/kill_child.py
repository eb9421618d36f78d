"""The job of test_kill_resume.py, run in a subprocess that SIGKILLs itself at a set point.

    python tests/store/kill_child.py METHOD STORE LOG OUT   # DATATRACE_TEST_KILL=point:n

Kill points (``n`` counts from 1 within the process), taken by test-only hooks installed by
:func:`hooks` around the store and the K-FAC passes, never by timers:

- ``shard:n``: after the n-th shard is complete (file renamed, journal line fsynced).
- ``shard-write:n``: in the middle of writing the n-th shard's temporary file (half of it).
- ``journal:n``: after the n-th shard's file is renamed into place, before its journal line.
- ``kfac:n``: before the n-th batch of the K-FAC passes (covariances, then EK-FAC eigenvalues).
- ``array:n``: after the n-th array of fitted state (a K-FAC factor, rps's refit) is written.
- ``read:n``: at the n-th shard read of the scoring after ``fit`` (``topk`` streams shards).

Every completed shard and array is appended to LOG (fsynced) before any kill that follows it,
so LOG lists exactly what a killed run completed, and a resumed run's LOG what it recomputed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import datatrace.curvature.kfac_fit as kfac
import datatrace.methods.loop as loop
from datatrace import Task, make_attributor
from datatrace.store import Store
from tests.models import classification_data, mlp

N_TRAIN, N_QUERY, BATCH, ROWS = 23, 4, 5, 3  # shards of 3 rows cut batches of 5
SETTINGS: dict[str, dict[str, Any]] = {
    "grad-dot": {},
    "trak": {"proj_dim": 8},
    "if-ekfac": {"damping": 1e-2},
    "rps": {"max_iter": 50},
}


def _append(log: Path, line: str) -> None:
    with open(log, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def hooks(log: Path, kill: str = "") -> Iterator[dict[str, bool]]:
    """Inside: shards of ROWS rows, completions logged to ``log``, the ``kill`` point armed.

    Yields a dict whose ``"scoring"`` flag the caller sets once ``fit`` returned.
    """
    point, _, at = kill.partition(":")
    n = int(at or 0)
    counts = {"shard": 0, "shard-write": 0, "journal": 0, "kfac": 0, "array": 0, "read": 0}
    state = {"scoring": False}

    def hit(name: str) -> bool:
        counts[name] += 1
        return point == name and counts[name] == n

    write_shard, atomic_write, journal = Store.write_shard, Store._atomic_write, Store._journal
    write_array, read_shard, capture = Store.write_array, Store.read_shard, kfac._capture

    def logged_write_shard(self: Store, kind: str, index: int, *args: Any, **kw: Any) -> None:
        write_shard(self, kind, index, *args, **kw)
        _append(log, f"shard {kind} {index}")
        if hit("shard"):
            _die()

    def torn_atomic_write(self: Store, name: str, write: Any, size: int) -> None:
        if name.startswith("shard-") and hit("shard-write"):

            def half(f: Any) -> None:
                write(f)
                f.flush()
                f.truncate(size // 2)
                f.flush()
                os.fsync(f.fileno())
                _die()

            return atomic_write(self, name, half, size)
        return atomic_write(self, name, write, size)

    def unjournaled(self: Store, kind: str, index: int, entry: Any) -> None:
        if entry is not None and hit("journal"):
            _die()
        journal(self, kind, index, entry)

    def logged_write_array(self: Store, name: str, tensor: torch.Tensor) -> None:
        write_array(self, name, tensor)
        _append(log, f"array {name}")
        if hit("array"):
            _die()

    def killed_read(self: Store, *args: Any, **kw: Any) -> torch.Tensor:
        if state["scoring"] and hit("read"):
            _die()
        return read_shard(self, *args, **kw)

    def killed_capture(*args: Any, **kw: Any) -> Any:
        if hit("kfac"):
            _die()
        return capture(*args, **kw)

    patches = [
        (Store, "write_shard", logged_write_shard),
        (Store, "_atomic_write", torn_atomic_write),
        (Store, "_journal", unjournaled),
        (Store, "write_array", logged_write_array),
        (Store, "read_shard", killed_read),
        (kfac, "_capture", killed_capture),
        (loop, "rows_per_shard", lambda row_bytes, shard_bytes=None: ROWS),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same BLAS blocking in the child and the test process
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield state
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)
        torch.set_num_threads(threads)


def run(method: str, store: Path, log: Path, kill: str = "") -> dict[str, torch.Tensor]:
    """fit with a store, then attribute, self_attribute and a streaming topk."""
    train = classification_data(N_TRAIN)
    queries = classification_data(N_QUERY, seed=7)
    task = Task(mlp(), target="margin" if method == "trak" else "loss")
    with hooks(log, kill) as state:
        attr = make_attributor(method, task, store=store, batch_size=BATCH, **SETTINGS[method])
        attr.fit(train)
        state["scoring"] = True
        top = attr.topk(queries, 4)
        return {
            "scores": attr.attribute(queries).values,
            "self": attr.self_attribute(),
            "top_ids": top.proponent_ids,
            "top_values": top.proponent_values,
        }


if __name__ == "__main__":
    method, store, log, out = sys.argv[1:5]
    result = run(method, Path(store), Path(log), os.environ.get("DATATRACE_TEST_KILL", ""))
    torch.save(result, out)
