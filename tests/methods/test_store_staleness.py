"""Reusing a store after a change: refused when results would change, allowed when not (issue 18).

Every case fits a store, changes one thing, and fits again on the same directory: a change
that alters results raises a ``StoreError`` naming what differs (``overwrite=True`` then
recomputes); one that does not (batch size, progress bar, threads) reuses the store and
gives the scores of a fresh fit. A changed training example is not refused: its shard's data
fingerprint no longer matches and that shard alone is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datatrace import Task, make_attributor
from datatrace.errors import DataError, StoreError
from datatrace.task import Checkpoint

N = 16


def model(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # activations have no weights: same seed, same weights
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 3)).double().eval()


def data(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def ce(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, labels, reduction="none")


def _other_ce() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def ce(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # same __name__
        return F.cross_entropy(outputs, labels, reduction="none", label_smoothing=0.2)

    return ce


def doubled_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (batch[0] * 2,), {}


BASE: dict[str, Any] = {
    "method": "grad-dot",
    "act": nn.ReLU,
    "seed": 0,
    "loss": ce,
    "target": "loss",
    "batch_to_inputs": None,
    "settings": {"batch_size": 4},
    "n": N,
    "members": None,
    "groups": None,
    "dtype": torch.float64,
}


def fit(tmp_path, overwrite: bool = False, labels: torch.Tensor | None = None, **change: Any):
    job = {**BASE, **change}
    m = model(job["act"], job["seed"]).to(job["dtype"])
    task = Task(m, loss=job["loss"], target=job["target"], batch_to_inputs=job["batch_to_inputs"])
    x, y = data(job["n"])
    train = (x.to(job["dtype"]), y if labels is None else labels)
    members = job["members"]
    if members == "two":
        members = [
            Checkpoint(m.state_dict()),
            Checkpoint(model(seed=5).to(job["dtype"]).state_dict()),
        ]
    attr = make_attributor(
        job["method"],
        task,
        store=tmp_path / "store",
        overwrite=overwrite,
        members=members,
        groups=job["groups"],
        **job["settings"],
    )
    queries = (data(3, seed=2)[0].to(job["dtype"]), data(3, seed=2)[1])
    return attr.fit(train).attribute(queries).values


REFUSED = [
    ("model weights", {"seed": 3}, "fingerprints.member0"),
    ("model dtype", {"dtype": torch.float32}, "fingerprints.member0"),
    ("fewer training examples (16 -> 12)", {"n": 12}, "fingerprints.n_train"),
    ("more training examples", {"n": 20}, "fingerprints.n_train"),
    ("forward function ReLU -> Tanh, same weights", {"act": nn.Tanh}, "probes.member0"),
    ("other custom loss, same __name__", {"loss": _other_ce()}, "probes.member0"),
    ("batch_to_inputs", {"batch_to_inputs": doubled_inputs}, "probes.member0"),
    ("target", {"target": "margin"}, "config.task.target"),
    ("method", {"method": "grad-cos"}, "config.method"),
    (
        "method config",
        {"settings": {"batch_size": 4, "engine": "functional"}},
        "config.config.engine",
    ),
    (
        "projection seed",
        {"settings": {"batch_size": 4, "projector": "gaussian", "proj_dim": 8, "seed": 1}},
        "config.config",
    ),
    ("feature dtype", {"settings": {"batch_size": 4, "feature_dtype": "float32"}}, "feature_dtype"),
    ("member list", {"members": "two"}, "fingerprints.member1"),
    ("grouping", {"groups": torch.arange(N) // 2}, "config.groups"),
]


@pytest.mark.parametrize(("case", "change", "key"), REFUSED, ids=[c[0] for c in REFUSED])
def test_change_that_alters_results_is_refused(tmp_path, case: str, change: dict, key: str) -> None:
    fit(tmp_path)
    with pytest.raises(StoreError, match="different job") as info:
        fit(tmp_path, **change)
    assert key in str(info.value)
    fresh = fit(tmp_path / "fresh", **change)
    again = fit(tmp_path, overwrite=True, **change)  # the advice works, and gives fresh results
    torch.testing.assert_close(again, fresh, rtol=1e-10, atol=1e-12)


ALLOWED = [
    ("batch size", {"settings": {"batch_size": 5}}),
    ("progress bar", {"settings": {"batch_size": 4, "progress": True}}),
    ("threads", {"threads": 1}),
]


@pytest.mark.parametrize(("case", "change"), ALLOWED, ids=[c[0] for c in ALLOWED])
def test_change_that_keeps_results_reuses_the_store(tmp_path, case: str, change: dict) -> None:
    first = fit(tmp_path)
    threads = torch.get_num_threads()
    change = dict(change)
    if "threads" in change:
        torch.set_num_threads(change.pop("threads"))
    try:
        again = fit(tmp_path, **change)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(again, first, rtol=1e-10, atol=1e-12)


def row_bytes(tmp_path) -> int:
    """Bytes per example of the default job's train features (from its one store shard)."""
    fit(tmp_path / "probe")
    (shard,) = (tmp_path / "probe" / "store").glob("shard-*.npy")
    array = np.load(shard, mmap_mode="r", allow_pickle=False)
    assert array.shape[0] == N
    return array[0].nbytes


def test_changed_training_example_recomputes_its_shard_only(tmp_path) -> None:
    # shards of 4 examples, batches of 3
    four = {"settings": {"batch_size": 3, "shard_bytes": 4 * row_bytes(tmp_path)}}
    fit(tmp_path, **four)
    labels = data()[1].clone()
    labels[5] = (labels[5] + 1) % 3  # one label in shard 1 (examples 4..7)
    store = tmp_path / "store"
    before = {f.name: f.stat().st_mtime_ns for f in store.glob("shard-*.npy")}
    assert len(before) == 4
    again = fit(tmp_path, labels=labels, **four)
    after = {f.name: f.stat().st_mtime_ns for f in store.glob("shard-*.npy")}
    assert [n for n in sorted(before) if before[n] != after[n]] == ["shard-train-m0-000001.npy"]
    torch.testing.assert_close(
        again, fit(tmp_path / "fresh", labels=labels), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_batch_size_change_rewrites_no_shard(tmp_path, rows) -> None:
    """Shards are sized by bytes, not batches (issue 21): a store written at batch size 4
    serves batch sizes 5 and 16 without recomputing (or rewriting) one shard."""
    shard_bytes = None if rows is None else rows * row_bytes(tmp_path)
    first = fit(tmp_path, settings={"batch_size": 4, "shard_bytes": shard_bytes})
    store = tmp_path / "store"
    before = {f.name: f.stat().st_mtime_ns for f in store.glob("shard-*.npy")}
    assert len(before) == {None: 1, 1: N, 3: 6}[rows]
    for batch_size in (5, 16):
        again = fit(tmp_path, settings={"batch_size": batch_size, "shard_bytes": shard_bytes})
        torch.testing.assert_close(again, first, rtol=1e-10, atol=1e-12)
    assert {f.name: f.stat().st_mtime_ns for f in store.glob("shard-*.npy")} == before


@pytest.mark.parametrize("method_id", ["trak", "if-ekfac", "logra"])
def test_code_and_size_changes_are_refused_for_stored_curvature_methods(
    tmp_path, method_id
) -> None:
    settings = {"batch_size": 4}
    if method_id == "trak":  # LoGra never read proj_dim (it takes proj_dim_in/_out): refused
        settings["proj_dim"] = 4
    job = {"method": method_id, "settings": settings, "loss": "cross_entropy"}
    fit(tmp_path, **job)
    for change, key in (({"act": nn.Tanh}, "probes"), ({"n": 12}, "n_train")):
        with pytest.raises(StoreError, match=key):
            fit(tmp_path, **job, **change)


def test_drop_last_loader_is_refused(tmp_path) -> None:
    x, y = data(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    attr = make_attributor("grad-dot", Task(model()))
    with pytest.raises(DataError, match=r"cover 8 of .* 10 examples \(drop_last=True\)"):
        attr.fit(loader)
    exact = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4, drop_last=True)
    assert attr.fit(exact).attribute((x[:2], y[:2])).values.shape == (2, 8)  # nothing dropped
