"""Ground-truth retraining run twice: in 2 gloo processes and in one (DESIGN.md §6).

A tiny deterministic recipe (float64 logistic regression, a fixed number of full-batch
gradient steps from a seeded initialisation) and the cached builders on the ``test-blobs``
setting. Job counts are odd where possible, so the ranks get unequal slices. Every call of
the recipe is recorded, so the tests can check that each rank ran only its slice.

Run as a module, it is the ``datatrace`` command with ``test-blobs`` registered (the test
launches it with ``torchrun -m``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import datatrace.bench.cache as cache
from datatrace.bench.cache import GroundTruthSpec, LOOSpec, lds_ground_truth, loo_ground_truth
from datatrace.bench.groundtruth import leave_one_out, subset_ground_truth
from datatrace.errors import DataError
from tests.bench.test_cache import Blobs  # registers "test-blobs"

N_TRAIN, N_QUERY, DIM, STEPS = 13, 5, 3, 40
M, SEEDS = 3, 3  # 9 subset retrainings: 5 + 4 on 2 ranks
LOO_INDICES = [0, 4, 7, 12]  # 1 + 4 retrainings: 3 + 2
LDS_SPEC = GroundTruthSpec(m=3, seeds=2)  # 6 jobs: 3 + 3
LOO_SPEC = LOOSpec(n_points=4)  # 5 jobs: 3 + 2
RESUMED_SPEC = GroundTruthSpec(m=4, seeds=1, subset_seed=1)  # the test kills it after 2 jobs

CALLS: list[tuple[tuple[int, ...], int]] = []  # (training indices, seed) of every retraining


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN + N_QUERY, DIM, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) > 0).to(torch.float64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def train_fn(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Logistic regression weights after ``STEPS`` full-batch steps (deterministic per job)."""
    CALLS.append((tuple(indices.tolist()), seed))
    x, y, _, _ = _data()
    w = 0.1 * torch.randn(DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xs, ys = x[indices], y[indices]
    for _ in range(STEPS):
        w = w - 0.5 * xs.T @ (torch.sigmoid(xs @ w) - ys) / len(indices)
    return w


def measure_fn(w: torch.Tensor) -> torch.Tensor:
    """Each query's margin (improvement orientation)."""
    _, _, xq, yq = _data()
    return (2 * yq - 1) * (xq @ w)


def in_memory() -> dict[str, Any]:
    """:func:`subset_ground_truth` and :func:`leave_one_out`, with the jobs each ran."""
    out: dict[str, Any] = {}
    CALLS.clear()
    gt = subset_ground_truth(train_fn, measure_fn, N_TRAIN, m=M, seeds=SEEDS, progress=False)
    out.update(subsets=gt.subsets, per_seed=gt.per_seed, targets=gt.targets)
    out.update(train_seeds=gt.train_seeds, subset_calls=list(CALLS))
    CALLS.clear()
    loo = leave_one_out(train_fn, measure_fn, N_TRAIN, LOO_INDICES, seed=5, progress=False)
    out.update(effects=loo.effects, full=loo.full, loo_calls=list(CALLS))
    return out


def cached(cache_dir: Path) -> dict[str, Any]:
    """The cached LDS and LOO builders on ``test-blobs``, with the retrainings each ran."""
    seen: list[tuple[int, int]] = []  # (number of training examples, seed)
    real = cache._retrain

    def counted(setting: Any, indices: torch.Tensor, seed: int) -> torch.Tensor:
        seen.append((len(indices), seed))
        return real(setting, indices, seed)

    cache._retrain = counted  # type: ignore[assignment]
    try:
        lds = lds_ground_truth(Blobs(), LDS_SPEC, cache_dir=cache_dir, workers=1, progress=False)
        lds_seen = list(seen)
        seen.clear()
        loo = loo_ground_truth(Blobs(), LOO_SPEC, cache_dir=cache_dir, workers=1, progress=False)
        loo_seen = list(seen)
        seen.clear()
        resumed = lds_ground_truth(
            Blobs(), RESUMED_SPEC, cache_dir=cache_dir, workers=1, progress=False
        )
        resumed_seen = list(seen)
    finally:
        cache._retrain = real  # type: ignore[assignment]
    return {
        "lds": lds.per_seed,
        "lds_seen": lds_seen,
        "loo_effects": loo.effects,
        "loo_full": loo.full,
        "loo_seen": loo_seen,
        "resumed": resumed.per_seed,
        "resumed_seen": resumed_seen,
    }


def refusals() -> dict[str, str]:
    """A failure on rank 1 only, and ranks that disagree on the arguments."""
    out: dict[str, str] = {}

    def failing(indices: torch.Tensor, seed: int) -> torch.Tensor:
        if seed == M * SEEDS - 1:  # the last job: rank 1's slice
            raise DataError("recipe diverged")
        return train_fn(indices, seed)

    try:
        subset_ground_truth(failing, measure_fn, N_TRAIN, m=M, seeds=SEEDS, progress=False)
    except DataError as exc:
        out["failure"] = str(exc)
    try:
        m = M + dist.get_rank()
        subset_ground_truth(train_fn, measure_fn, N_TRAIN, m=m, seeds=1, progress=False)
    except DataError as exc:
        out["arguments"] = str(exc)
    return out


def spawned_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` target: every scenario on a gloo group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {**in_memory(), **cached(Path(out_dir) / "cache"), **refusals()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The results are saved and the group is gone: leave without the interpreter's teardown,
    # where torch/gloo's C++ threads now and then abort the process ("terminate called without
    # an active exception", SIGABRT after both ranks had written their results; about 1 run in
    # 10 here). The parent checks the saved results, not this process's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    from datatrace.cli import main

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main())
