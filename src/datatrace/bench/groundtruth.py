"""Retraining ground truth: random-subset targets for the LDS, leave-one-out effects.

The subset protocol is that of TRAK (Park et al., 2023, "TRAK: Attributing Model Behavior at
Scale", ICML, §2.2) after datamodels (Ilyas et al., 2022): draw ``m`` subsets holding a
fraction ``alpha`` of the training units, retrain on each (optionally with several seeds),
and record every query's target. ``datatrace.metrics.lds`` then scores attributions against
it. The noise ceiling (DESIGN.md §9) says how much of that agreement retraining noise alone
allows.

The user supplies two callables, so this module knows nothing about models:

- ``train_fn(indices, seed) -> model`` trains on the training units ``indices`` (a 1-D
  ``torch.long`` tensor, ascending) with randomness fixed by ``seed``;
- ``measure_fn(model) -> Tensor (n_query,)`` returns each query's target in improvement
  orientation (higher is better: negated loss, margin, log-prob), as DESIGN.md §1 requires.

This is the small in-memory generator; caching under a hash belongs to the benchmark runner
(:mod:`datatrace.bench.cache`).

Under an initialised ``torch.distributed`` group of several processes (``torchrun``; DESIGN.md
§6) every rank must call these functions with the same arguments: rank ``r`` retrains the
``r``-th contiguous slice of the jobs (subset x seed in row-major order, or the full model
then each left-out unit), and the targets are all-gathered in job order, so every rank
returns exactly the single-process result (each job's seed is fixed by its position, not by
the rank that runs it). ``train_fn`` and ``measure_fn`` must be deterministic per job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datatrace import distributed
from datatrace._checks import check_int
from datatrace._progress import progress_bar
from datatrace.errors import ConfigError, DataError
from datatrace.metrics.lds import LDSResult, spearman_batched
from datatrace.store import fingerprint_tensors

__all__ = [
    "LeaveOneOut",
    "SubsetGroundTruth",
    "leave_one_out",
    "noise_ceiling",
    "sample_subsets",
    "subset_ground_truth",
]

TrainFn = Callable[[torch.Tensor, int], Any]
MeasureFn = Callable[[Any], torch.Tensor]


def sample_subsets(n_train: int, m: int, alpha: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Draw ``m`` random subsets of ``n_train`` units, each of size ``round(alpha * n_train)``.

    Each row is drawn independently and uniformly among subsets of that size; the result is
    deterministic given ``seed``. The size uses Python's ``round`` (half to even).

    Args:
        n_train: Number of training units.
        m: Number of subsets, ``>= 2`` (the LDS correlates over them).
        alpha: Fraction of units in each subset, in ``(0, 1)``.
        seed: Seed of the draw.

    Returns:
        ``(m, n_train)`` bool tensor; ``[j, i]`` is True when subset ``j`` holds unit ``i``.

    Raises:
        ConfigError: On ``m < 2``, ``alpha`` outside ``(0, 1)``, or a subset size of 0 or
            ``n_train`` (every subset would be the same).

    Example:
        >>> sample_subsets(n_train=10, m=3, alpha=0.3).sum(dim=1).tolist()
        [3, 3, 3]
    """
    check_int("n_train", n_train, 1)
    check_int("m", m, 2)
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must lie strictly between 0 and 1 (default 0.5); got {alpha!r}.")
    k = round(alpha * n_train)
    if not 0 < k < n_train:
        raise ConfigError(
            f"alpha={alpha} of n_train={n_train} gives subsets of {k} units, so every subset "
            "would be identical; raise n_train or move alpha towards 0.5."
        )
    gen = torch.Generator().manual_seed(seed)
    subsets = torch.zeros(m, n_train, dtype=torch.bool)
    for j in range(m):
        subsets[j, torch.randperm(n_train, generator=gen)[:k]] = True
    return subsets


def _measure(measure_fn: MeasureFn, model: Any, n_query: int | None) -> torch.Tensor:
    out = measure_fn(model)
    if not isinstance(out, torch.Tensor) or out.ndim != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"measure_fn must return a 1-D tensor (n_query,); got {got}.")
    if n_query is not None and out.shape[0] != n_query:
        raise DataError(
            f"measure_fn returned {out.shape[0]} targets, but an earlier call returned "
            f"{n_query}; it must measure the same queries every time."
        )
    return out.detach().to("cpu", torch.float64)


def _run_slice(
    jobs: Sequence[Callable[[], Any]],
    measure_fn: MeasureFn,
    desc: str,
    progress: bool,
) -> torch.Tensor:
    """Run this rank's contiguous slice of ``jobs`` (each returns a model) and measure them.

    Returns the ``(len(jobs), n_query)`` float64 targets of every job, in job order, on every
    rank. A failure on one rank (e.g. in ``train_fn``) is raised on every rank.
    """
    lo, hi = distributed.local_range(len(jobs))
    me, world = distributed.rank(), distributed.world_size()
    label = desc if world == 1 else f"{desc} [rank {me}/{world}: jobs {lo}-{hi - 1}]"

    def run() -> torch.Tensor | None:
        rows: list[torch.Tensor] = []
        n_query: int | None = None
        with progress_bar(desc=label, enabled=progress and me == 0, total=hi - lo) as bar:
            for job in jobs[lo:hi]:
                out = _measure(measure_fn, job(), n_query)
                n_query = int(out.shape[0])
                rows.append(out)
                bar.update(1)
        return torch.stack(rows) if rows else None

    local = distributed.run_collectively(run)
    if not distributed.is_distributed():
        if local is None:  # no jobs at all; callers always have at least one
            raise DataError(f"{desc}: there are no retraining jobs to run.")
        return local
    widths = distributed.all_gather_object(None if local is None else int(local.shape[1]))
    if len({w for w in widths if w is not None}) > 1:
        raise DataError(
            f"measure_fn returned {widths} targets on ranks 0..{world - 1} (None: no jobs); it "
            "must measure the same queries on every rank: build them from the same seed, or "
            "broadcast them from rank 0."
        )
    return distributed.all_gather_rows(local)


def _check_same_arguments(name: str, arguments: tuple[Any, ...]) -> None:
    distributed.check_same(
        arguments,
        f"the arguments of {name}",
        "every rank must call it with the same arguments (they fix the jobs and their seeds).",
    )


@dataclass(frozen=True)
class SubsetGroundTruth:
    """Targets of every query after retraining on random subsets.

    Attributes:
        subsets: ``(m, n_train)`` bool; which units each retraining used.
        targets: ``(m, n_query)`` float64 target per subset, averaged over seeds, in
            improvement orientation; pass it with ``subsets`` to ``datatrace.metrics.lds``.
        per_seed: ``(m, seeds, n_query)`` float64 target of every single retraining.
        train_seeds: ``(m, seeds)`` int64 seed passed to ``train_fn`` for each retraining.

    Example:
        >>> y = torch.arange(6.0)
        >>> gt = subset_ground_truth(
        ...     lambda idx, seed: y[idx].mean(), lambda mu: -(mu - y) ** 2,
        ...     n_train=6, m=4, progress=False)
        >>> gt.targets.shape, gt.per_seed.shape
        (torch.Size([4, 6]), torch.Size([4, 1, 6]))
    """

    subsets: torch.Tensor
    targets: torch.Tensor
    per_seed: torch.Tensor
    train_seeds: torch.Tensor

    def noise_ceiling(self) -> LDSResult:
        """Agreement between the two halves of the seeds; see ``noise_ceiling``."""
        return noise_ceiling(self.per_seed)


def subset_ground_truth(
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    n_train: int,
    m: int,
    alpha: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> SubsetGroundTruth:
    """Retrain on ``m`` random subsets (``seeds`` times each) and measure every query.

    Retraining ``s`` of subset ``j`` gets the training seed ``seed * m * seeds + j * seeds +
    s``: all ``m * seeds`` retrainings use distinct seeds, and different ``seed`` values give
    disjoint blocks, so no two models share their randomness by accident.

    Args:
        train_fn: ``train_fn(indices, seed) -> model``; ``indices`` is a 1-D long tensor.
        measure_fn: ``measure_fn(model) -> Tensor (n_query,)`` in improvement orientation.
        n_train: Number of training units.
        m: Number of subsets, ``>= 2``.
        alpha: Fraction of units per subset (DESIGN.md §8 default 0.5).
        seeds: Retrainings per subset; their targets are averaged. Use ``>= 2`` to get a
            noise ceiling.
        seed: Seed of the subset draw and base of the training seeds.
        progress: Show a tqdm progress bar over the ``m * seeds`` retrainings (rank 0's
            slice under ``torchrun``).

    Returns:
        A ``SubsetGroundTruth``.

    Raises:
        ConfigError: On invalid ``n_train``, ``m``, ``alpha`` or ``seeds``.
        DataError: If ``measure_fn`` does not return a 1-D tensor of a fixed length, or
            (under ``torchrun``) the ranks passed different arguments.
    """
    check_int("seeds", seeds, 1)
    subsets = sample_subsets(n_train, m, alpha, seed)
    train_seeds = seed * m * seeds + torch.arange(m * seeds, dtype=torch.int64).reshape(m, seeds)
    _check_same_arguments("subset_ground_truth", (n_train, m, alpha, seeds, seed))

    def job(number: int) -> Callable[[], Any]:
        j, s = divmod(number, seeds)  # row-major: subset j, its s-th seed
        return lambda: train_fn(torch.nonzero(subsets[j]).squeeze(1), int(train_seeds[j, s]))

    jobs = [job(number) for number in range(m * seeds)]
    per_seed = _run_slice(jobs, measure_fn, "subset retraining", progress).reshape(m, seeds, -1)
    return SubsetGroundTruth(
        subsets=subsets,
        targets=per_seed.mean(dim=1),
        per_seed=per_seed,
        train_seeds=train_seeds,
    )


@dataclass(frozen=True)
class LeaveOneOut:
    """Retrained leave-one-out effects.

    Attributes:
        effects: ``(len(indices), n_query)`` float64; ``effects[k, q] = full[q] -
            target_q(trained without indices[k])``. Positive means unit ``indices[k]``
            helped query ``q``, the sign convention of attribution scores (DESIGN.md §1).
        full: ``(n_query,)`` float64 targets of the model trained on all units.
        indices: ``(len(indices),)`` long; the units that were left out, in order.
    """

    effects: torch.Tensor
    full: torch.Tensor
    indices: torch.Tensor


def leave_one_out(
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    n_train: int,
    indices: torch.Tensor | Sequence[int],
    seed: int = 0,
    progress: bool = True,
) -> LeaveOneOut:
    """Retrain without each unit in ``indices`` and measure how much each one helped.

    Every model, the full one included, is trained with the same ``seed`` so that the
    difference isolates the removal (with a deterministic recipe, e.g. a convex model
    trained to convergence, it is exactly the leave-one-out effect).

    Under ``torchrun`` each rank runs a contiguous slice of the ``1 + len(indices)``
    retrainings (the full model first) and every rank returns the full result, equal to the
    single-process one.

    Args:
        train_fn: ``train_fn(indices, seed) -> model``; ``indices`` is a 1-D long tensor.
        measure_fn: ``measure_fn(model) -> Tensor (n_query,)`` in improvement orientation.
        n_train: Number of training units.
        indices: The units to leave out, one retraining each.
        seed: Training seed of every retraining.
        progress: Show a tqdm progress bar (rank 0's slice under ``torchrun``).

    Returns:
        A ``LeaveOneOut`` with ``effects`` and the full-model targets ``full``; compare
        ``effects`` with ``scores.values[:, indices].T`` via
        ``datatrace.metrics.loo_correlation``.

    Raises:
        ConfigError: If ``n_train < 2``.
        DataError: If ``indices`` is not 1-D or holds values outside ``[0, n_train)``, if
            ``measure_fn`` does not return a 1-D tensor of a fixed length, or (under
            ``torchrun``) the ranks passed different arguments.

    Example:
        >>> y = torch.tensor([0.0, 1.0, 5.0])
        >>> loo = leave_one_out(
        ...     lambda idx, seed: y[idx].mean(), lambda mu: -(mu - y[:1]) ** 2,
        ...     n_train=3, indices=[2], progress=False)
        >>> loo.effects.tolist()  # the outlier y=5 hurts query 0: -4 - (-0.25)
        [[-3.75]]
    """
    check_int("n_train", n_train, 2)
    idx = torch.as_tensor(indices)
    if idx.ndim != 1 or (idx.numel() > 0 and idx.is_floating_point()):
        raise DataError(
            f"indices must be a 1-D sequence of ints; got shape {tuple(idx.shape)} and dtype "
            f"{idx.dtype}."
        )
    idx = idx.to(torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_train):
        raise DataError(
            f"indices must lie in [0, n_train={n_train}); got values from {int(idx.min())} to "
            f"{int(idx.max())}."
        )
    _check_same_arguments("leave_one_out", (n_train, seed, fingerprint_tensors([idx])))
    everything = torch.arange(n_train)

    def job(left_out: int | None) -> Callable[[], Any]:
        if left_out is None:
            return lambda: train_fn(everything, seed)
        return lambda: train_fn(
            torch.cat([everything[:left_out], everything[left_out + 1 :]]), seed
        )

    jobs = [job(None), *(job(i) for i in idx.tolist())]
    targets = _run_slice(jobs, measure_fn, "leave-one-out", progress)
    full = targets[0].clone()
    return LeaveOneOut(effects=full - targets[1:], full=full, indices=idx)


def noise_ceiling(per_seed: torch.Tensor | SubsetGroundTruth) -> LDSResult:
    """LDS-style agreement between retrainings that differ only in seed (DESIGN.md §9).

    The seeds are split into two disjoint halves of equal size ``h = seeds // 2`` (the first
    ``h`` and the next ``h``; with an odd count the last seed is left out). Each half is
    averaged per subset, and the result is the mean over queries of the Spearman correlation
    over subsets between the two half-averages: the LDS a perfect attribution of an
    ``h``-seed average would reach against another ``h``-seed average.

    It is a conservative (low) ceiling for ground truth averaged over all ``seeds``, which is
    less noisy than either half; no Spearman-Brown style correction is applied.

    Args:
        per_seed: ``(m, seeds, n_query)`` targets of every retraining (``SubsetGroundTruth``
            ``.per_seed``), or the ``SubsetGroundTruth`` itself.

    Returns:
        An ``LDSResult`` (per-query agreement, ``nan`` for queries constant over subsets).

    Raises:
        DataError: If ``per_seed`` is not 3-D with ``m >= 2`` subsets and ``seeds >= 2``.

    Example:
        >>> x = torch.randn(5, 1, 3)
        >>> noise_ceiling(torch.cat([x, 2 * x + 1], dim=1)).mean
        1.0
    """
    t = per_seed.per_seed if isinstance(per_seed, SubsetGroundTruth) else per_seed
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] < 2 or t.shape[1] < 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise DataError(
            f"noise_ceiling needs per_seed of shape (m >= 2, seeds >= 2, n_query); got {got}. "
            "Generate the ground truth with seeds=2 or more."
        )
    h = int(t.shape[1]) // 2
    half_a = t[:, :h].to(torch.float64).mean(dim=1)
    half_b = t[:, h : 2 * h].to(torch.float64).mean(dim=1)
    return LDSResult.from_per_query(spearman_batched(half_a, half_b, dim=0))
