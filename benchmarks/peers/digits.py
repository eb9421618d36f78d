"""The legacy digits-MLP recipe of the peer comparison (``peers.py``) and its LDS ground truth.

A 64-128-64-10 ReLU MLP without dropout, Adam 30 epochs (``datatrace.bench.digits``), 100
half-subsets x 2 seeds, 60 validation + 200 test queries: the recipe every table of
``docs/peers.md`` was measured on. (The registered ``digits-mlp`` setting of ``datatrace bench``
has dropout, 50 x 2 subsets and 300 test queries, so its LDS values differ.) Ground truth and
the peers' member models are cached under ``$DATATRACE_BENCH_CACHE``, default
``<datatrace cache>/benchmarks`` (``datatrace.bench.default_cache_dir``), keyed by a hash of the
recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from datatrace.bench import default_cache_dir
from datatrace.bench.digits import load_digits_split, train_digits_mlp
from datatrace.bench.groundtruth import SubsetGroundTruth, subset_ground_truth
from datatrace.task import margin

CACHE = Path(os.environ.get("DATATRACE_BENCH_CACHE", default_cache_dir() / "benchmarks"))


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that produces the digits LDS ground truth (its hash keys the cache)."""

    m: int = 100  # random subsets
    alpha: float = 0.5
    seeds: int = 2  # retrainings per subset (two halves give the noise ceiling)
    epochs: int = 30
    hidden: tuple[int, ...] = (128, 64)
    n_val: int = 60  # validation queries (hyperparameter choice)
    n_test: int = 200  # test queries (reported)
    subset_seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def digits_queries(
    recipe: DigitsRecipe,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(train, queries)``; queries are the first ``n_val + n_test`` test images."""
    train, test = load_digits_split()
    n = recipe.n_val + recipe.n_test
    return train, (test[0][:n], test[1][:n])


def train_model(
    train: tuple[torch.Tensor, torch.Tensor], recipe: DigitsRecipe, seed: int
) -> torch.nn.Module:
    return train_digits_mlp(train, seed=seed, epochs=recipe.epochs, hidden=recipe.hidden)


def digits_ground_truth(
    recipe: DigitsRecipe = DigitsRecipe(), progress: bool = True
) -> SubsetGroundTruth:
    """LDS ground truth for the digits MLP (margins of the queries), cached on disk."""
    path = CACHE / f"digits-lds-{recipe.key()}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return SubsetGroundTruth(d["subsets"], d["targets"], d["per_seed"], d["train_seeds"])
    train, queries = digits_queries(recipe)
    x, y = train

    def train_fn(indices: torch.Tensor, seed: int) -> torch.nn.Module:
        return train_model((x[indices], y[indices]), recipe, seed=1000 + seed)

    def measure(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return margin(model(queries[0]), queries[1])

    gt = subset_ground_truth(
        train_fn,
        measure,
        len(y),
        recipe.m,
        recipe.alpha,
        recipe.seeds,
        recipe.subset_seed,
        progress=progress,
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "subsets": gt.subsets,
            "targets": gt.targets,
            "per_seed": gt.per_seed,
            "train_seeds": gt.train_seeds,
        },
        tmp,
    )
    tmp.replace(path)
    return gt
