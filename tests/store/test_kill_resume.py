"""Kill and resume (issue 18, deliverable 1): a ``fit`` SIGKILLed anywhere resumes to the
result of an uninterrupted run, bit for bit, without recomputing a completed shard.

Each case runs :mod:`tests.store.kill_child` in a subprocess that SIGKILLs itself at a
deterministic point (a test-only hook counting shard writes, K-FAC batches, array writes or
shard reads; see that module), then resumes the job in this process on the same store and
compares with an uninterrupted run (``torch.equal``). The shards the killed run completed
are read from its log and from the store's manifest and journal (they must agree); the
resumed run must write none of them again and leave their files untouched (mtimes).

Shards have 3 rows and batches 5 examples, so shard boundaries cut batches. Fitted state
(the K-FAC covariance and eigenvalue passes, then its arrays; rps's refit, done before its
shards) is resumable as a whole: a run killed inside the passes, or between two arrays,
fits it again (K-FAC from the stored shards). No scoring call (``attribute``, ``topk``, ``self_attribute``) writes to the store; a
kill during the streaming ``topk`` is tested to leave it whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.store.kill_child import BATCH, N_TRAIN, ROWS, run

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("kill_child.py")
SHARDS = -(-N_TRAIN // ROWS)  # 8
BATCHES = -(-N_TRAIN // BATCH)  # 5: the covariance pass has batches 1-5, eigenvalues 6-10

# (method, kill point, what the point is)
CASES = [
    ("grad-dot", "shard:2", "featurization, between shards"),
    ("grad-dot", "shard-write:4", "featurization, mid-shard-write (torn temporary file)"),
    ("grad-dot", "journal:5", "featurization, shard renamed but not journaled"),
    ("grad-dot", "read:2", "streaming topk reading shards"),
    ("trak", "shard:6", "featurization, between shards (margins recorded)"),
    ("if-ekfac", "shard:3", "featurization, between shards (factored rows)"),
    ("if-ekfac", f"kfac:{2}", "K-FAC covariance pass"),
    ("if-ekfac", f"kfac:{BATCHES + 3}", "EK-FAC eigenvalue pass"),
    ("if-ekfac", "array:3", "between curvature arrays"),
    ("rps", "shard:4", "featurization, between shards (rows of the refit)"),
    ("rps", "array:2", "between refit arrays, before featurization"),
]

_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def reference(method: str, tmp: Path) -> dict[str, torch.Tensor]:
    """An uninterrupted run on a fresh store (once per method)."""
    if method not in _REFERENCE:
        _REFERENCE[method] = run(method, tmp / f"ref-{method}", tmp / f"ref-{method}.log")
    return _REFERENCE[method]


def logged_shards(log: Path) -> set[int]:
    if not log.exists():
        return set()
    lines = [line.split() for line in log.read_text().splitlines()]
    return {int(parts[2]) for parts in lines if parts[0] == "shard"}


def stored_shards(store: Path) -> set[int]:
    """Complete shards by the store's own record: the manifest, then the journal's lines."""
    manifest = json.loads((store / "manifest.json").read_text())
    done = {int(i) for i in manifest["shards"].get("train-m0", {})}
    journal = store / "journal.jsonl"
    for line in journal.read_text().splitlines() if journal.exists() else []:
        record = json.loads(line)
        if record["kind"] == "train-m0":
            (done.add if record["entry"] else done.discard)(record["index"])
    return done


@pytest.mark.parametrize(("method", "kill", "what"), CASES, ids=[c[1] + "-" + c[0] for c in CASES])
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, method, kill, what) -> None:
    store, killed_log = tmp_path / "store", tmp_path / "killed.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "DATATRACE_TEST_KILL": kill,
    }
    args = [sys.executable, str(CHILD), method, str(store), str(killed_log), str(tmp_path / "x")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"{what}: not killed ({proc.stderr[-2000:]})"
    assert not (tmp_path / "x").exists()

    completed = logged_shards(killed_log)
    assert stored_shards(store) == completed  # the store lists exactly the completed shards
    if kill.startswith(("shard:", "shard-write", "journal")):
        assert 0 < len(completed) < SHARDS
    elif method == "rps" and kill.startswith("array"):  # rps refits before featurizing
        assert completed == set()
    else:  # killed after featurization
        assert completed == set(range(SHARDS))
    mtimes = {i: (store / f"shard-train-m0-{i:06d}.npy").stat().st_mtime_ns for i in completed}

    resumed_log = tmp_path / "resumed.log"
    resumed = run(method, store, resumed_log)
    recomputed = logged_shards(resumed_log)
    assert recomputed.isdisjoint(completed), f"completed shards recomputed: {recomputed}"
    assert recomputed | completed == set(range(SHARDS))
    for i, t in mtimes.items():
        assert (store / f"shard-train-m0-{i:06d}.npy").stat().st_mtime_ns == t
    assert not list(store.glob(".tmp-*")), "the resumed writer removes partial writes"

    expected = reference(method, tmp_path)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), f"{what}: {key} differs after resume"
