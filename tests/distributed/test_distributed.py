"""Two gloo processes give the single-process results (DESIGN.md §6), to rtol 1e-10 in float64."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from datatrace import Task, distributed, make_attributor
from datatrace.data import iter_batch_range, iter_batches, num_batches
from datatrace.errors import ConfigError, StoreError
from datatrace.store import Store, fingerprint_batch
from tests.distributed import run_torchrun, scenarios
from tests.models import mlp

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario once in 2 spawned gloo processes and once in this process."""
    tmp = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: same BLAS blocking
    try:
        # a store one process wrote, then lost its last 3 shards (killed): 2 ranks resume it
        scenarios.store_scores(tmp / "partial")
    finally:
        torch.set_num_threads(threads)
    for index in (3, 4, 5):
        (tmp / "partial" / f"shard-train-m0-{index:06d}.npy").unlink()
    kept = {f: f.stat().st_mtime_ns for f in (tmp / "partial").glob("shard-*.npy")}
    mp.spawn(
        scenarios.spawned_worker,
        args=(WORLD, str(tmp / "init"), str(tmp)),
        nprocs=WORLD,
        join=True,
    )
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items()), "complete shards reused"
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    torch.set_num_threads(1)
    try:
        single = scenarios.methods(store=None)
    finally:
        torch.set_num_threads(threads)
    return tmp, ranks, single


@pytest.mark.parametrize("method_id", ["trak", "if-ekfac", "grad-dot", "if-kfac-factored"])
@pytest.mark.parametrize("what", ["scores", "unit_ids", "self", "top_ids", "top_values"])
def test_every_rank_returns_the_single_process_result(runs, method_id, what):
    _, ranks, single = runs
    key = f"{method_id}/{what}"
    for r, result in enumerate(ranks):
        assert _close(result[key], single[key]), f"rank {r}: {key}"
    if what == "scores":
        assert single[key].shape == (scenarios.N_QUERY, scenarios.N_TRAIN)


def test_kfac_factors_and_eigenvalues_equal_single_process(runs):
    _, ranks, single = runs
    # each rank ran its own slice of the batches (two passes: factors, eigenvalues)
    work = [int(result["work/kfac"]) for result in ranks]
    assert work == [2 * 12, 2 * 9] and sum(work) == int(single["work/kfac"])
    # eigenvectors are compared through the scores (their signs are arbitrary)
    keys = [k for k in single if k.startswith("kfac/") and k.endswith(("factor", "eigenvalues"))]
    assert len(keys) == 3 * 2  # two layers
    for result in ranks:
        for key in keys:
            assert _close(result[key], single[key]), key


def test_recompute_scores_each_ranks_slice_of_the_training_batches(runs):
    _, ranks, single = runs
    # 6 batches (4, 4, 4 | 4, 4, 1 examples): each rank recomputes its 3, plus the 5 queries
    # and the input check's one forward pass on the first query batch (4 examples)
    check = min(scenarios.BATCH, scenarios.N_QUERY)
    work = [int(result["work/recompute"]) for result in ranks]
    assert work == [check + scenarios.N_QUERY + 12, check + scenarios.N_QUERY + 9]
    assert int(single["work/recompute"]) == check + scenarios.N_QUERY + scenarios.N_TRAIN


@pytest.mark.parametrize("case", ["if-kfac-one-batch", "grad-dot-groups", "trak-members"])
def test_idle_rank_groups_and_members(runs, case):
    _, ranks, single = runs
    for result in ranks:
        assert _close(result[f"{case}/scores"], single[f"{case}/scores"])


def test_store_written_by_two_ranks_resumes_in_one_process(runs):
    tmp, ranks, single = runs
    path = tmp / "store"
    manifest = json.loads((path / "manifest.json").read_text())
    n_batches = -(-scenarios.N_TRAIN // scenarios.BATCH)
    assert sorted(int(i) for i in manifest["shards"]["train-m0"]) == list(range(n_batches))
    assert not list(path.glob("journal*")), "rank 0 folds every rank's journal"
    shards = sorted(path.glob("shard-*.npy"))
    mtimes = [f.stat().st_mtime_ns for f in shards]
    scores = scenarios.store_scores(path)  # one process, world size 1: nothing recomputed
    assert [f.stat().st_mtime_ns for f in shards] == mtimes
    assert _close(scores, single["trak/scores"])
    for result in ranks:
        assert _close(result["store/scores"], single["trak/scores"])


def test_store_written_by_one_process_resumes_on_two_ranks(runs):
    tmp, ranks, single = runs
    # rank 0's slice (batches 0-2) was complete, rank 1 recomputed 3-5 (the fixture checks
    # that the complete shards were not rewritten)
    manifest = json.loads((tmp / "partial" / "manifest.json").read_text())
    assert sorted(int(i) for i in manifest["shards"]["train-m0"]) == list(range(6))
    for result in ranks:
        assert _close(result["partial/scores"], single["trak/scores"])


def test_every_rank_refuses_different_queries_and_a_stale_store(runs):
    tmp = runs[0]
    for r in range(WORLD):
        refused = json.loads((tmp / f"refusals{r}.json").read_text())
        assert "queries" in refused and "differ between ranks" in refused["queries"]
        assert "proj_dim" in refused["store"]
    assert "rank 0 failed" in json.loads((tmp / "refusals1.json").read_text())["store"]


def test_torchrun_two_processes_equal_single_process(tmp_path):
    out = tmp_path / "scores.pt"
    proc = run_torchrun(
        WORLD,
        str(Path(__file__).with_name("torchrun_script.py")),
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["world_size"] == WORLD
    train, queries = scenarios.data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        attr = make_attributor("if-ekfac", Task(mlp()), batch_size=scenarios.BATCH, damping=1e-2)
        expected = attr.fit(train).attribute(queries).values
    finally:
        torch.set_num_threads(threads)
    assert _close(got["scores"], expected)


# ------------------------------------------------------------------ single-process helpers
def test_split_range_is_contiguous_and_balanced():
    for n in range(0, 9):
        for parts in range(1, 5):
            slices = [distributed.split_range(n, parts, i) for i in range(parts)]
            assert slices[0][0] == 0 and slices[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
            sizes = [hi - lo for lo, hi in slices]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ConfigError, match="parts"):
        distributed.split_range(4, 2, 2)


def test_helpers_are_the_identity_without_a_process_group():
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(t) is t
    assert distributed.all_reduce_sum([t])[0] is t
    assert distributed.all_gather_object("x") == ["x"]
    distributed.check_same(1, "x", "fix")


def test_a_shard_writer_rank_never_touches_the_manifest(tmp_path):
    owner = Store(tmp_path, config={"a": 1}, fingerprints={"m": "0"})
    writer = Store(tmp_path, config={"a": 1}, fingerprints={"m": "0"}, rank=1)
    writer.write_shard("f", 1, torch.ones(2, 3), "b1")
    owner.write_shard("f", 0, torch.zeros(2, 3), "b0")
    assert (tmp_path / "journal-rank1.jsonl").exists()
    with pytest.raises(StoreError, match="rank 0"):
        writer.write_array("x", torch.ones(1))
    owner.merge_journals()
    writer.reload()
    assert owner.shard_indices("f") == writer.shard_indices("f") == [0, 1]
    assert not list(tmp_path.glob("journal*"))
    with pytest.raises(StoreError, match="no store"):
        Store(tmp_path / "missing", config={}, fingerprints={}, rank=1)


def test_a_killed_distributed_job_resumes_from_every_journal(tmp_path):
    Store(tmp_path, config={}, fingerprints={})
    writer = Store(tmp_path, config={}, fingerprints={}, rank=3)
    writer.write_shard("f", 5, torch.ones(1), "b5")  # killed before rank 0 merged
    reopened = Store(tmp_path, config={}, fingerprints={})
    assert reopened.has_shard("f", 5, "b5")
    assert not list(tmp_path.glob("journal*"))


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "dataset", "loader"])
def test_a_batch_range_is_that_slice_of_the_batches(kind):
    x, y = torch.arange(22.0).reshape(11, 2), torch.arange(11)
    data = {
        "tensor": x,
        "tuple": (x, y),
        "dict": {"x": x, "y": y},
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=3),
    }[kind]
    everything = list(iter_batches(data, 3))
    assert num_batches(data, 3) == len(everything) == 4
    for lo, hi in [(0, 4), (1, 3), (3, 4), (2, 2)]:
        got = list(iter_batch_range(data, 3, lo, hi))
        assert [offset for offset, _ in got] == [3 * b for b in range(lo, hi)]
        for (_, batch), expected in zip(got, everything[lo:hi]):
            assert fingerprint_batch(batch) == fingerprint_batch(expected)
