"""Ground-truth retraining split over 2 gloo processes equals one process (DESIGN.md §6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import datatrace.bench.cache as cache
from datatrace.bench.cache import lds_ground_truth, loo_ground_truth
from datatrace.cli import main
from tests.distributed import groundtruth_scenarios as gs
from tests.distributed import run_torchrun

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _kill_after(monkeypatch: pytest.MonkeyPatch, finished: int) -> None:
    """Make ``cache._retrain`` raise KeyboardInterrupt once ``finished`` jobs completed."""
    real, state = cache._retrain, {"n": 0}

    def dying(*args):
        state["n"] += 1
        if state["n"] > finished:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache, "_retrain", dying)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario in 2 spawned gloo processes, and the in-memory ones in this process."""
    tmp = tmp_path_factory.mktemp("gt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        with pytest.MonkeyPatch.context() as mp_:  # a single process killed after 1 of 4 jobs
            _kill_after(mp_, 1)
            with pytest.raises(KeyboardInterrupt):
                lds_ground_truth(
                    gs.Blobs(), gs.RESUMED_SPEC, cache_dir=tmp / "cache", workers=1, progress=False
                )
        mp.spawn(
            gs.spawned_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True
        )
        single = gs.in_memory()
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return tmp, ranks, single


@pytest.mark.parametrize(
    "key", ["subsets", "per_seed", "targets", "train_seeds", "effects", "full"]
)
def test_every_rank_returns_the_single_process_ground_truth(runs, key):
    _, ranks, single = runs
    for r, result in enumerate(ranks):
        assert torch.equal(result[key], single[key]), f"rank {r}: {key}"
    assert single["per_seed"].shape == (gs.M, gs.SEEDS, gs.N_QUERY)
    assert single["effects"].shape == (len(gs.LOO_INDICES), gs.N_QUERY)


def test_each_rank_retrains_only_its_contiguous_slice(runs):
    _, ranks, single = runs
    # one process: subset j, seed s trains with seed j * SEEDS + s, in that order
    assert [seed for _, seed in single["subset_calls"]] == list(range(gs.M * gs.SEEDS))
    assert [seed for _, seed in ranks[0]["subset_calls"]] == [0, 1, 2, 3, 4]
    assert [seed for _, seed in ranks[1]["subset_calls"]] == [5, 6, 7, 8]
    assert ranks[0]["subset_calls"] + ranks[1]["subset_calls"] == single["subset_calls"]
    # leave-one-out: the full model, then one job per left-out unit
    left_out = [sorted(set(range(gs.N_TRAIN)) - set(indices)) for indices, _ in single["loo_calls"]]
    assert left_out == [[], *([i] for i in gs.LOO_INDICES)]
    assert ranks[0]["loo_calls"] == single["loo_calls"][:3]
    assert ranks[1]["loo_calls"] == single["loo_calls"][3:]


def test_cached_builders_split_the_jobs_and_resume(runs):
    _, ranks, _ = runs
    n = gs.Blobs().n_train
    # LDS: m=3 x seeds=2 -> training seeds 0..5, three per rank
    assert [seed for _, seed in ranks[0]["lds_seen"]] == [0, 1, 2]
    assert [seed for _, seed in ranks[1]["lds_seen"]] == [3, 4, 5]
    # LOO: the full model and 4 left-out units -> 3 + 2
    assert [size for size, _ in ranks[0]["loo_seen"]] == [n, n - 1, n - 1]
    assert [size for size, _ in ranks[1]["loo_seen"]] == [n - 1, n - 1]
    # a store one process left after 1 of 4 jobs: the 3 missing ones are split 2 + 1
    assert [seed for _, seed in ranks[0]["resumed_seen"]] == [5, 6]
    assert [seed for _, seed in ranks[1]["resumed_seen"]] == [7]
    for key in ("lds", "loo_effects", "loo_full", "resumed"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_a_cache_two_ranks_wrote_reads_back_in_one_process(runs, tmp_path, monkeypatch):
    tmp, ranks, _ = runs
    stores = sorted((tmp / "cache").iterdir())
    assert len(stores) == 3
    for store in stores:
        assert not list(store.glob("journal*")), "rank 0 folds every rank's journal"
        assert json.loads((store / "manifest.json").read_text())["shards"]
    _kill_after(monkeypatch, 0)  # reading back must not retrain anything
    lds = lds_ground_truth(gs.Blobs(), gs.LDS_SPEC, cache_dir=tmp / "cache", progress=False)
    loo = loo_ground_truth(gs.Blobs(), gs.LOO_SPEC, cache_dir=tmp / "cache", progress=False)
    resumed = lds_ground_truth(gs.Blobs(), gs.RESUMED_SPEC, cache_dir=tmp / "cache", progress=False)
    assert torch.equal(lds.per_seed, ranks[0]["lds"])
    assert torch.equal(loo.effects, ranks[0]["loo_effects"])
    assert torch.equal(resumed.per_seed, ranks[0]["resumed"])
    # and it is what one process retraining from scratch gets
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    assert torch.equal(
        lds_ground_truth(gs.Blobs(), gs.LDS_SPEC, cache_dir=fresh, progress=False).per_seed,
        lds.per_seed,
    )
    assert torch.equal(
        lds_ground_truth(gs.Blobs(), gs.RESUMED_SPEC, cache_dir=fresh, progress=False).per_seed,
        resumed.per_seed,
    )


def test_a_failure_or_different_arguments_are_raised_on_every_rank(runs):
    _, ranks, _ = runs
    assert ranks[1]["failure"] == "recipe diverged"
    assert ranks[0]["failure"] == "rank 1 failed: DataError: recipe diverged"
    for result in ranks:
        assert "arguments of subset_ground_truth differ between ranks" in result["arguments"]


def test_cli_groundtruth_under_torchrun(tmp_path, monkeypatch):
    proc = run_torchrun(
        WORLD,
        "-m",
        "tests.distributed.groundtruth_scenarios",
        "groundtruth",
        "--setting=test-blobs",
        "--subsets=3",  # torchrun would take --m for --module / --master-addr ...
        "--seeds=2",
        "--workers=1",
        f"--cache={tmp_path}",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "noise ceiling" in line]
    assert len(lines) == 1 and lines[0].startswith("test-blobs: 3 subsets x 2 seeds"), proc.stdout
    _kill_after(monkeypatch, 0)  # one process reads it back without retraining
    gt = lds_ground_truth(gs.Blobs(), gs.LDS_SPEC, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fresh = lds_ground_truth(
            gs.Blobs(), gs.LDS_SPEC, cache_dir=tmp_path / "fresh", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gt.per_seed, fresh.per_seed)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_cli_bench_refuses_several_processes(rank, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert main(["bench", "--setting", "test-blobs"]) == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert "torchrun started 2" in err and "groundtruth" in err
    else:
        assert err == ""  # only rank 0 reports


def test_cli_rejects_a_malformed_torchrun_environment(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    assert main(["groundtruth", "--setting", "test-blobs"]) == 2
    assert "0 <= RANK < WORLD_SIZE" in capsys.readouterr().err
