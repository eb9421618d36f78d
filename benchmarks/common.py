"""Shared pieces of the benchmark scripts: the digits MLP setting and its LDS ground truth.

Ground truth is cached under ``benchmarks/.cache/`` keyed by a hash of the recipe, so every
script (and the peer comparison) scores against the same retrainings.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from datatrace.bench.digits import load_digits_split, train_digits_mlp
from datatrace.bench.groundtruth import SubsetGroundTruth, subset_ground_truth
from datatrace.task import margin

CACHE = Path(os.environ.get("DATATRACE_BENCH_CACHE", Path(__file__).parent / ".cache"))


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


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of warm runs (DESIGN.md §9) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@dataclass
class DigitsBench:
    """Everything the digits-MLP benchmark scripts share: ground truth, splits, the model."""

    recipe: DigitsRecipe
    gt: SubsetGroundTruth
    train: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[torch.Tensor, torch.Tensor]
    val: slice
    test: slice
    model: torch.nn.Module
    checkpoints: list[Any]


def digits_bench(threads: int = 2) -> DigitsBench:
    """Cached ground truth, train/query split and the seed-0 model (eval mode) with its
    trajectory (a checkpoint every 10 epochs), with ``threads`` torch threads."""
    from datatrace.bench.digits import train_digits_mlp_trajectory

    torch.set_num_threads(threads)
    recipe = DigitsRecipe()
    gt = digits_ground_truth(recipe)
    train, queries = digits_queries(recipe)
    model, checkpoints = train_digits_mlp_trajectory(
        train, seed=0, epochs=recipe.epochs, hidden=recipe.hidden, every=10
    )
    model.eval()
    return DigitsBench(
        recipe,
        gt,
        train,
        queries,
        slice(0, recipe.n_val),
        slice(recipe.n_val, recipe.n_val + recipe.n_test),
        model,
        checkpoints,
    )


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """Run ``script args`` in its own process (peak memory is per process, DESIGN.md §9).

    Returns the JSON of the last ``RESULT {...}`` line it prints, or, when it failed,
    ``{"error": last stderr lines, "returncode": ...}``.
    """
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": tail, "returncode": proc.returncode}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result
