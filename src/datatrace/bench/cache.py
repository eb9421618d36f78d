"""Cached, resumable, parallel LDS ground truth for registered settings (DESIGN.md §5, §7).

Retraining a setting on ``m`` random subsets with ``seeds`` seeds each is the expensive part
of a benchmark. It runs once: results go to a :class:`~datatrace.store.Store` whose config is
the setting's JSON plus the protocol (``m``, ``alpha``, ``seeds``, ``subset_seed``) and whose
fingerprint is the setting's recipe hash, one shard per subset. A second run reuses it, a
changed recipe is refused with a message saying what differs, and a killed run resumes from
its last complete subset. Retrainings run in worker processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datatrace.bench.groundtruth import SubsetGroundTruth, sample_subsets
from datatrace.bench.settings import Setting
from datatrace.errors import ConfigError
from datatrace.store import Store

__all__ = ["GroundTruthSpec", "default_cache_dir", "lds_ground_truth"]


def default_cache_dir() -> Path:
    """``$DATATRACE_CACHE`` or ``~/.cache/datatrace``."""
    return Path(os.environ.get("DATATRACE_CACHE", Path.home() / ".cache" / "datatrace"))


@dataclass(frozen=True)
class GroundTruthSpec:
    """The LDS protocol: ``m`` subsets of fraction ``alpha``, ``seeds`` retrainings each.

    Example:
        >>> GroundTruthSpec(m=50, alpha=0.5, seeds=2).key()[:4].isalnum()
        True
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


def _init_worker() -> None:
    torch.set_num_threads(1)  # one thread per process: the pool already uses the cores


def _retrain(setting: Setting, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Worker: train on ``indices`` with ``seed``; return every query's target ("all" split).

    The setting travels pickled (its fields only), so user-registered settings work in worker
    processes as long as their class is importable there.
    """
    model = setting.train(indices, seed=seed)
    return setting.measure(model, "all").detach().to(torch.float64)


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
        progress: show a progress bar.

    Returns:
        A :class:`SubsetGroundTruth` whose targets cover ``setting.data.queries("all")``.
    """
    spec = spec or GroundTruthSpec()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1; got {workers!r}.")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"{setting.name}-{setting.recipe_hash()}-lds-{spec.key()}"
    config = {"setting": setting.to_json(), "spec": spec.__dict__}
    store = Store(path, config=config, fingerprints={"recipe": setting.recipe_hash()})
    subsets = sample_subsets(setting.n_train, spec.m, spec.alpha, spec.subset_seed)
    jobs = [
        (j, s, spec.subset_seed * spec.m * spec.seeds + j * spec.seeds + s)
        for j in range(spec.m)
        for s in range(spec.seeds)
        if not store.has_shard(f"seed{s}", j)
    ]
    bar = tqdm(
        total=len(jobs), desc=f"{setting.name}: ground truth", disable=not progress or not jobs
    )
    if workers == 1 or len(jobs) <= 1:
        for j, s, seed in jobs:
            store.write_shard(
                f"seed{s}", j, _retrain(setting, subsets[j].nonzero().squeeze(1), seed)
            )
            bar.update()
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker
        ) as pool:
            futures = {
                pool.submit(_retrain, setting, subsets[j].nonzero().squeeze(1), seed): (j, s)
                for j, s, seed in jobs
            }
            for future in futures:  # written in submission order as each completes
                j, s = futures[future]
                store.write_shard(f"seed{s}", j, future.result())
                bar.update()
    bar.close()
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
