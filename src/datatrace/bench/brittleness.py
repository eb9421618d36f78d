"""Removal ground truth (brittleness): retrain without each query's top-k proponents; cached.

For a test query the model predicts correctly and a budget ``k``, remove the ``k`` training
units a method ranks as the query's strongest proponents, retrain (seed 0) and check whether
the prediction flips (Ilyas et al., 2022; Park et al., 2023, §5). On a correctly predicted
query a flip is exactly a margin that drops to 0 or below, so each retraining is measured
with the setting's margin target and stored like the other ground truth: one shard per
removed set, keyed by a hash of the set, under the setting's recipe hash. Two methods that
pick the same set share the retraining, and a second run retrains nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch

from datatrace.bench.cache import _check_workers, _run_jobs, default_cache_dir
from datatrace.bench.settings import Setting
from datatrace.errors import ConfigError
from datatrace.metrics import BrittlenessResult, brittleness_curve, top_proponents
from datatrace.scores import Scores
from datatrace.store import Store

__all__ = ["correct_queries", "removal_brittleness"]


def _kind(removed: torch.Tensor) -> str:
    text = ",".join(str(i) for i in sorted(removed.tolist()))
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:20]


def correct_queries(setting: Setting, model: torch.nn.Module, n: int) -> torch.Tensor:
    """Positions (in ``queries("all")``) of the first ``n`` test queries ``model`` gets right."""
    margins = setting.measure(model, "all")
    test = torch.arange(setting.n_val, margins.shape[0])
    return test[margins[test] > 0][:n]


def removal_brittleness(
    setting: Setting,
    values: dict[str, torch.Tensor],
    queries: torch.Tensor,
    ks: Sequence[int],
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, BrittlenessResult]:
    """Fraction of ``queries`` whose prediction flips after removing their top-k proponents.

    Args:
        setting: a classification setting whose target is the margin.
        values: method id -> ``(n_val + n_test, n_train)`` scores over ``queries("all")``.
        queries: positions of the queries to test (correctly predicted, e.g. from
            :func:`correct_queries`).
        ks: increasing removal budgets.
        cache_dir: where stores live (default :func:`~datatrace.bench.cache.default_cache_dir`).
        workers: retraining processes.
        progress: show a progress bar.

    Returns:
        Method id -> :class:`~datatrace.metrics.BrittlenessResult` (query ids are positions).
    """
    if setting.kind != "classification" or setting.target != "margin":
        raise ConfigError(
            f"the removal task needs a classification setting with the margin target; "
            f"{setting.name!r} has {setting.kind!r} / {setting.target!r}."
        )
    _check_workers(workers)
    if not ks or any(int(b) <= int(a) for a, b in pairwise(ks)):
        raise ConfigError(f"removal ks must be strictly increasing; got {list(ks)!r}.")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    recipe = setting.recipe_hash()
    store = Store(
        root / f"{setting.name}-{recipe}-removal",
        config={"setting": setting.to_json(), "seed": 0},
        fingerprints={"recipe": recipe},
    )
    everything = torch.arange(setting.n_train)
    jobs: dict[str, tuple[str, int, torch.Tensor, int]] = {}
    for v in values.values():
        top = top_proponents(v[queries], max(ks))
        for row in range(len(queries)):
            for k in ks:
                removed = top[row, :k]
                kind = _kind(removed)
                if kind not in jobs and not store.has_shard(kind, 0):
                    keep = torch.ones(setting.n_train, dtype=torch.bool)
                    keep[removed] = False
                    jobs[kind] = (kind, 0, everything[keep], 0)
    _run_jobs(setting, store, list(jobs.values()), workers, f"{setting.name}: removal", progress)

    def retrain(query: int, removed: torch.Tensor) -> torch.Tensor:
        return store.read_shard(_kind(removed), 0, mmap=False)

    def flips(margins: torch.Tensor, query: int) -> bool:
        return bool(margins[query] <= 0)

    out = {}
    for method, v in values.items():
        scores = Scores(v[queries], torch.arange(setting.n_train), queries, method, {})
        out[method] = brittleness_curve(scores, list(ks), retrain, flips)
    return out
