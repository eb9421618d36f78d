"""Cached, resumable, parallel LDS ground truth for registered settings (DESIGN.md §5, §7).

Retraining a setting on ``m`` random subsets with ``seeds`` seeds each is the expensive part
of a benchmark. It runs once (or not at all where the package ships it,
:mod:`datatrace.bench.shipped`): results go to a :class:`~datatrace.store.Store` whose config is
the setting's JSON plus the protocol (``m``, ``alpha``, ``seeds``, ``subset_seed``) and whose
fingerprint is the setting's recipe hash, one shard per subset. A second run reuses it, a
changed recipe is refused with a message saying what differs, and a killed run resumes from
its last complete subset. Retrainings run in worker processes.

Under ``torchrun`` (an initialised process group of several processes, DESIGN.md §6) every
rank calls the builder with the same arguments: the store is opened by rank 0 first (the
others join it as shard writers, :func:`datatrace.distributed.open_store`), the missing
retrainings are cut into contiguous slices, one per rank, and each rank writes its finished
shards with its own journal. After a barrier rank 0 folds the journals into the manifest and
every rank reads the complete result from the store, which therefore must be on a file system
every rank sees. Shards are indexed by job, so the store is the one a single process writes
and resumes under any number of processes. ``workers`` is per rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from datatrace import distributed
from datatrace._progress import progress_bar
from datatrace.bench.groundtruth import LeaveOneOut, SubsetGroundTruth, sample_subsets
from datatrace.bench.settings import Setting
from datatrace.errors import ConfigError
from datatrace.store import Store

__all__ = [
    "GroundTruthSpec",
    "LOOSpec",
    "default_cache_dir",
    "lds_ground_truth",
    "loo_ground_truth",
]


def default_cache_dir() -> Path:
    """``$DATATRACE_CACHE`` or ``~/.cache/datatrace``."""
    return Path(os.environ.get("DATATRACE_CACHE", Path.home() / ".cache" / "datatrace"))


@dataclass(frozen=True)
class GroundTruthSpec:
    """The LDS protocol: ``m`` subsets of fraction ``alpha``, ``seeds`` retrainings each.

    Example:
        >>> GroundTruthSpec(m=50, alpha=0.5, seeds=2).key()
        'm50-a0.5-s2-r0'
    """

    m: int = 50
    alpha: float = 0.5
    seeds: int = 2
    subset_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 2:
            raise ConfigError(f"m (number of LDS subsets) must be an int >= 2; got {self.m!r}.")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ConfigError(
                f"alpha must lie strictly between 0 and 1 (default 0.5); got {self.alpha!r}."
            )
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(
                f"seeds (retrainings per subset) must be an int >= 1; got {self.seeds!r}."
            )

    def key(self) -> str:
        return f"m{self.m}-a{self.alpha:g}-s{self.seeds}-r{self.subset_seed}"


@dataclass(frozen=True)
class LOOSpec:
    """Leave-one-out protocol: ``n_points`` training units drawn by ``seed``, training seed 0.

    ``n_points`` larger than the training set means every unit.

    Example:
        >>> LOOSpec(n_points=30).key()
        'n30-r0'
    """

    n_points: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            isinstance(self.n_points, bool)
            or not isinstance(self.n_points, int)
            or self.n_points < 2
        ):
            raise ConfigError(
                f"n_points (leave-one-out retrainings) must be an int >= 2; got {self.n_points!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"the leave-one-out seed must be an int >= 0; got {self.seed!r}.")

    def key(self) -> str:
        return f"n{self.n_points}-r{self.seed}"

    def indices(self, n_train: int) -> torch.Tensor:
        """The units left out, ascending: the first ``n_points`` of a seeded permutation.

        Every unit when ``n_train <= n_points``.
        """
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.seed))
        return perm[: self.n_points].sort().values


def _init_worker() -> None:
    torch.set_num_threads(1)  # one thread per process: the pool already uses the cores


def _retrain(setting: Setting, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Worker: train on ``indices`` with ``seed``; return every query's target ("all" split).

    The setting travels pickled (its fields only), so user-registered settings work in worker
    processes as long as their class is importable there.
    """
    model = setting.train(indices, seed=seed)
    return setting.measure(model, "all").detach().to(torch.float64)


def _check_workers(workers: Any) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1; got {workers!r}.")


Work = Callable[[Setting, torch.Tensor, int], torch.Tensor]


def _run_jobs(
    setting: Setting,
    store: Store,
    jobs: list[tuple[str, int, torch.Tensor, int]],
    workers: int,
    desc: str,
    progress: bool,
    work: Work | None = None,
) -> None:
    """Run ``work(setting, indices, seed)`` (default: :func:`_retrain`) for each ``(kind,
    index, indices, seed)`` job and write each result as a shard. ``work`` must be a
    module-level function (it is pickled to the worker processes)."""
    work = work or _retrain  # looked up at call time (tests count the retrainings)
    bar = progress_bar(desc=desc, enabled=progress and bool(jobs), total=len(jobs))
    if workers == 1 or len(jobs) <= 1:
        for kind, index, indices, seed in jobs:
            store.write_shard(kind, index, work(setting, indices, seed))
            bar.update()
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker
        ) as pool:
            futures = {
                pool.submit(work, setting, indices, seed): (kind, index)
                for kind, index, indices, seed in jobs
            }
            for future in futures:  # written in submission order as each completes
                kind, index = futures[future]
                store.write_shard(kind, index, future.result())
                bar.update()
    bar.close()


def _check_same_job(config: dict[str, Any]) -> None:
    distributed.check_same(
        config,
        "the ground-truth settings and protocols",
        "every rank must build the ground truth of the same setting under the same protocol.",
    )


def _run_split(
    setting: Setting,
    store: Store,
    jobs: list[tuple[str, int, torch.Tensor, int]],
    workers: int,
    desc: str,
    progress: bool,
    work: Work | None = None,
) -> None:
    """Run this rank's contiguous slice of ``jobs``; afterwards every rank's store has them all.

    Every rank must pass the same ``jobs`` (they do when their stores list the same shards).
    A failure on one rank is raised on every rank; the shards finished before it stay
    complete (in the failing rank's journal, folded when the store is next opened).
    """
    lo, hi = distributed.local_range(len(jobs))
    me, world = distributed.rank(), distributed.world_size()
    if world > 1:
        desc = f"{desc} [rank {me}/{world}: {hi - lo} of {len(jobs)} jobs]"
    distributed.run_collectively(
        lambda: _run_jobs(setting, store, jobs[lo:hi], workers, desc, progress and me == 0, work)
    )
    distributed.sync_store(store)


def _store_path(root: Path, setting: Setting, spec: GroundTruthSpec) -> Path:
    return root / f"{setting.name}-{setting.recipe_hash()}-lds-{spec.key()}"


def lds_ground_truth(
    setting: Setting,
    spec: GroundTruthSpec | None = None,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> SubsetGroundTruth:
    """Targets of every query (val then test) after retraining on random subsets; cached.

    Args:
        setting: a registered setting.
        spec: the protocol (default ``GroundTruthSpec()``).
        cache_dir: where stores live (default :func:`default_cache_dir`).
        workers: retraining processes (each uses one thread); 1 runs in this process.
            Under ``torchrun``, per rank.
        progress: show a progress bar (rank 0's only under ``torchrun``).

    Returns:
        A :class:`SubsetGroundTruth` whose targets cover ``setting.data.queries("all")``,
        on every rank under ``torchrun``.
    """
    spec = spec or GroundTruthSpec()
    _check_workers(workers)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    config = {"setting": setting.to_json(), "spec": spec.__dict__}
    _check_same_job(config)
    store = distributed.open_store(
        _store_path(root, setting, spec),
        config=config,
        fingerprints={"recipe": setting.recipe_hash()},
    )
    if not all(store.has_shard(f"seed{s}", j) for j in range(spec.m) for s in range(spec.seeds)):
        from datatrace.bench.shipped import _seed_store, load_shipped, shipped_file

        shipped = shipped_file(setting, spec)
        if shipped is not None:  # ground truth that ships with the package: no retraining
            first = distributed.rank() == 0  # rank 0 writes it; the others then reload
            distributed.run_collectively(
                lambda: _seed_store(store, load_shipped(setting, spec, shipped)) if first else None
            )
            distributed.sync_store(store)
    subsets = sample_subsets(setting.n_train, spec.m, spec.alpha, spec.subset_seed)
    jobs = [
        (j, s, spec.subset_seed * spec.m * spec.seeds + j * spec.seeds + s)
        for j in range(spec.m)
        for s in range(spec.seeds)
        if not store.has_shard(f"seed{s}", j)
    ]
    _run_split(
        setting,
        store,
        [(f"seed{s}", j, subsets[j].nonzero().squeeze(1), seed) for j, s, seed in jobs],
        workers,
        f"{setting.name}: ground truth",
        progress,
    )
    per_seed = torch.stack(
        [
            torch.stack([store.read_shard(f"seed{s}", j, mmap=False) for s in range(spec.seeds)])
            for j in range(spec.m)
        ]
    )
    seeds = torch.tensor(
        [
            [spec.subset_seed * spec.m * spec.seeds + j * spec.seeds + s for s in range(spec.seeds)]
            for j in range(spec.m)
        ]
    )
    return SubsetGroundTruth(subsets, per_seed.mean(1), per_seed, seeds)


def loo_ground_truth(
    setting: Setting,
    spec: LOOSpec | None = None,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> LeaveOneOut:
    """Leave-one-out effects on every query (val then test) of a sample of units; cached.

    Meaningful for convex settings trained to their optimum (``setting.convex``), where the
    retrained model does not depend on the seed. Every model, the full one included, trains
    with seed 0; ``effects[k, q] = full[q] - target_q(trained without indices[k])``.
    Cached like :func:`lds_ground_truth` (one shard per retraining, resumable).

    Args:
        setting: a registered setting.
        spec: which units to leave out (default ``LOOSpec()``: 100 units, seed 0).
        cache_dir: where stores live (default :func:`default_cache_dir`).
        workers: retraining processes (each uses one thread); 1 runs in this process.
            Under ``torchrun``, per rank.
        progress: show a progress bar (rank 0's only under ``torchrun``).

    Returns:
        A :class:`~datatrace.bench.groundtruth.LeaveOneOut` over ``setting.data.queries("all")``,
        on every rank under ``torchrun``.
    """
    spec = spec or LOOSpec()
    _check_workers(workers)
    n = setting.n_train
    indices = spec.indices(n)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"{setting.name}-{setting.recipe_hash()}-loo-{spec.key()}"
    config = {"setting": setting.to_json(), "spec": spec.__dict__}
    _check_same_job(config)
    store = distributed.open_store(
        path, config=config, fingerprints={"recipe": setting.recipe_hash()}
    )
    everything = torch.arange(n)
    jobs = [] if store.has_shard("full", 0) else [("full", 0, everything, 0)]
    for k, i in enumerate(indices.tolist()):
        if not store.has_shard("loo", k):
            kept = torch.cat([everything[:i], everything[i + 1 :]])
            jobs.append(("loo", k, kept, 0))
    _run_split(setting, store, jobs, workers, f"{setting.name}: leave-one-out", progress)
    full = store.read_shard("full", 0, mmap=False)
    without = torch.stack([store.read_shard("loo", k, mmap=False) for k in range(len(indices))])
    return LeaveOneOut(effects=full - without, full=full, indices=indices)
