"""Downstream tasks of group attribution: dataset pruning and noisy-label identification.

**Dataset pruning with groups.** A group's value is its total attribution to a held-out
validation set: ``value[g] = sum_q scores[q, g]`` over the validation queries (DESIGN.md §1:
positive = training on the group helps). :func:`prune_groups` drops the lowest-valued groups
first and returns the training indices kept; :func:`group_pruning_curve` retrains on them at
several fractions kept and :func:`random_example_pruning_curve` is the baseline that drops the
*same number of examples* uniformly at random (Yang et al., 2023, "Dataset Pruning", ICLR, for
the per-example task; Ley et al., 2024, "Generalized Group Data Attribution", for groups).

**Noisy-label identification with groups.** Groups are inspected in decreasing order of a
group score (self-influence from ``attributor.self_attribute()`` with ``groups=``, or the
training loss summed per group with :func:`sum_per_group`); inspecting a group inspects all its
examples. :func:`group_inspection_curve` gives the fraction of flipped labels found against
the fraction of *training examples* inspected, and the area under that piecewise-linear curve
(1 for a perfect order when the flips fill the first groups, about 0.5 for a random order).

Ties are broken by position: among equal values the lower group index is dropped first
(pruning) and inspected first (inspection). Groups are given as a
:class:`~datatrace.group.Grouping` or as one group id per training example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from datatrace._progress import progress_bar
from datatrace.errors import ConfigError, DataError
from datatrace.group import Grouping
from datatrace.metrics.lds import _real_cpu64
from datatrace.metrics.mislabel import _check_fraction
from datatrace.metrics.removal import _as_float
from datatrace.scores import Scores

__all__ = [
    "GroupInspectionResult",
    "GroupPruningResult",
    "group_inspection_curve",
    "group_pruning_curve",
    "group_values",
    "prune_groups",
    "random_example_pruning_curve",
    "random_group_inspection_curve",
    "sum_per_group",
]

M = TypeVar("M")
GroupsLike = Grouping | torch.Tensor | Sequence[int] | np.ndarray


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _grouping(groups: GroupsLike) -> Grouping:
    if isinstance(groups, Grouping):
        return groups
    if isinstance(groups, np.ndarray):
        return Grouping.from_ids(torch.as_tensor(groups))
    return Grouping.from_ids(groups)


def _unit_vector(values: Any, n_groups: int, name: str) -> torch.Tensor:
    v = _real_cpu64(values, name)
    if v.shape != (n_groups,):
        raise DataError(
            f"{name} must have shape (n_groups={n_groups},), one value per group; got "
            f"{tuple(v.shape)}."
        )
    n_bad = int((~torch.isfinite(v)).sum())
    if n_bad:
        raise DataError(f"{name} contain {n_bad} non-finite values; every group needs a value.")
    return v


def _check_fractions_kept(fractions: Sequence[Any] | torch.Tensor) -> list[float]:
    if not isinstance(fractions, (Sequence, torch.Tensor, np.ndarray)) or isinstance(
        fractions, str
    ):
        raise ConfigError(
            f"fractions_kept must be a sequence of numbers in (0, 1]; got {fractions!r}."
        )
    if isinstance(fractions, torch.Tensor):
        items = fractions.reshape(-1).tolist()
    else:
        items = list(fractions)
    if not items:
        raise ConfigError("fractions_kept must name at least one fraction; got none.")
    out = []
    for fr in items:
        if isinstance(fr, bool) or not isinstance(fr, (int, float, np.floating, np.integer)):
            raise ConfigError(
                f"fractions kept must be numbers in (0, 1]; got {fr!r} ({type(fr).__name__})."
            )
        if not math.isfinite(float(fr)) or not 0.0 < float(fr) <= 1.0:
            raise ConfigError(
                f"fractions kept must lie in (0, 1] (the fraction of training examples kept); "
                f"got {fr!r}."
            )
        out.append(float(fr))
    return out


def _n_target(fraction_kept: float, n_train: int) -> int:
    # Round half up (0.29 * 100 is 28.999999999999996 in floating point), keep at least one.
    return max(1, math.floor(fraction_kept * n_train + 0.5))


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


def group_values(scores: Scores | torch.Tensor) -> torch.Tensor:
    """Each group's total attribution to the validation queries: the column sums.

    Args:
        scores: ``(n_val, n_groups)`` group attribution scores of held-out validation
            queries (``attributor.attribute(val)`` with ``groups=``), or a ``Scores``.

    Returns:
        ``(n_groups,)`` float64 values, in the column order of ``scores``.

    Raises:
        DataError: If ``scores`` is not 2-D, is empty or holds non-finite values.

    Example:
        >>> group_values(torch.tensor([[1.0, -2.0], [0.5, 1.0]])).tolist()
        [1.5, -1.0]
    """
    v = scores.values if isinstance(scores, Scores) else scores
    if not isinstance(v, torch.Tensor):
        raise DataError(f"scores must be a Scores or a 2-D tensor; got {type(v).__name__}.")
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise DataError(
            f"scores must be (n_val, n_groups) with at least one query and one group; got "
            f"shape {tuple(v.shape)}."
        )
    v = _real_cpu64(v, "scores")
    n_bad = int((~torch.isfinite(v)).sum())
    if n_bad:
        raise DataError(f"scores (shape {tuple(v.shape)}) contain {n_bad} non-finite values.")
    return v.sum(dim=0)


def _kept_for(order: torch.Tensor, g: Grouping, n_target: int) -> torch.Tensor:
    """Drop groups in ``order`` while at least ``n_target`` examples remain."""
    sizes = g.sizes()[order]
    remaining = g.n_train - torch.cumsum(sizes, 0)  # examples left after dropping 1..j groups
    n_drop = int((remaining >= n_target).sum())
    dropped = torch.zeros(g.n_groups, dtype=torch.bool)
    dropped[order[:n_drop]] = True
    return (~dropped[g.labels]).nonzero().flatten()


def prune_groups(values: Any, groups: GroupsLike, fraction_kept: float) -> torch.Tensor:
    """Training indices kept after dropping the lowest-valued groups.

    Groups are dropped in increasing value (ties: lower group index first) for as long as at
    least ``round(fraction_kept * n_train)`` examples remain (at least one), so whole groups
    go and the kept count is the smallest one at or above the target.

    Args:
        values: ``(n_groups,)`` group values (e.g. :func:`group_values`), in the order of
            the grouping's groups (its ``ids``).
        groups: a ``Grouping`` or ``(n_train,)`` group ids.
        fraction_kept: fraction of the training examples to keep, in ``(0, 1]``.

    Returns:
        ``(n_kept,)`` int64 training indices, ascending.

    Raises:
        DataError: If ``values`` has the wrong length or non-finite entries, or the group
            ids are invalid.
        ConfigError: If ``fraction_kept`` is not in ``(0, 1]``.

    Example:
        >>> prune_groups([0.5, -1.0, 2.0], [0, 0, 1, 1, 2, 2], 0.5).tolist()
        [0, 1, 4, 5]
    """
    g = _grouping(groups)
    v = _unit_vector(values, g.n_groups, "values")
    (fr,) = _check_fractions_kept([fraction_kept])
    order = torch.sort(v, stable=True).indices
    return _kept_for(order, g, _n_target(fr, g.n_train))


@dataclass(frozen=True)
class GroupPruningResult:
    """Accuracy after retraining on what a pruning rule kept.

    Attributes:
        fractions_kept: ``(n_f,)`` float64 requested fractions of examples kept (x axis).
        n_kept: ``(n_f,)`` int64 examples each retraining used (whole groups: at or above
            the target).
        accuracy: ``(n_f,)`` float64 what ``evaluate_fn`` returned (y axis).
        kept: the kept training indices of every fraction.
    """

    fractions_kept: torch.Tensor
    n_kept: torch.Tensor
    accuracy: torch.Tensor
    kept: tuple[torch.Tensor, ...]


def _run_curve(
    fractions: list[float],
    kept_sets: list[torch.Tensor],
    retrain_fn: Callable[[torch.Tensor], M],
    evaluate_fn: Callable[[M], Any],
    progress: bool,
    desc: str,
) -> GroupPruningResult:
    acc = torch.empty(len(kept_sets), dtype=torch.float64)
    for j, kept in enumerate(progress_bar(kept_sets, desc=desc, enabled=progress)):
        acc[j] = _as_float(evaluate_fn(retrain_fn(kept.clone())), f"at fraction {fractions[j]!r}")
    return GroupPruningResult(
        fractions_kept=torch.tensor(fractions, dtype=torch.float64),
        n_kept=torch.tensor([len(k) for k in kept_sets], dtype=torch.int64),
        accuracy=acc,
        kept=tuple(kept_sets),
    )


def group_pruning_curve(
    values: Any,
    groups: GroupsLike,
    fractions_kept: Sequence[float] | torch.Tensor,
    retrain_fn: Callable[[torch.Tensor], M],
    evaluate_fn: Callable[[M], Any],
    progress: bool = False,
) -> GroupPruningResult:
    """Retrain on :func:`prune_groups`' kept indices at every fraction and evaluate.

    Args:
        values: ``(n_groups,)`` group values.
        groups: a ``Grouping`` or ``(n_train,)`` group ids.
        fractions_kept: fractions of examples kept, each in ``(0, 1]``; include 1 for the
            full-data reference.
        retrain_fn: ``retrain_fn(kept) -> model``, ``kept`` ascending int64 indices (e.g.
            ``lambda kept: setting.train(indices=kept)``).
        evaluate_fn: ``evaluate_fn(model) -> float``, e.g. test accuracy.
        progress: Show a tqdm progress bar over the retrainings.

    Returns:
        A :class:`GroupPruningResult`.

    Raises:
        DataError: As :func:`prune_groups`, or if ``evaluate_fn`` returns a non-number.
        ConfigError: If a fraction is outside ``(0, 1]`` or none is given.
    """
    g = _grouping(groups)
    v = _unit_vector(values, g.n_groups, "values")
    fractions = _check_fractions_kept(fractions_kept)
    order = torch.sort(v, stable=True).indices
    kept = [_kept_for(order, g, _n_target(fr, g.n_train)) for fr in fractions]
    return _run_curve(fractions, kept, retrain_fn, evaluate_fn, progress, "group pruning")


def random_example_pruning_curve(
    n_train: int,
    n_kept: Sequence[int] | torch.Tensor,
    retrain_fn: Callable[[torch.Tensor], M],
    evaluate_fn: Callable[[M], Any],
    seed: int = 0,
    progress: bool = False,
) -> GroupPruningResult:
    """Random baseline: keep ``n_kept[j]`` examples of one seeded random order (nested).

    Pass a :class:`GroupPruningResult`'s ``n_kept`` to remove exactly as many examples as
    the group rule did.

    Args:
        n_train: Number of training examples.
        n_kept: Examples to keep per point, each in ``[1, n_train]``.
        retrain_fn: As in :func:`group_pruning_curve`.
        evaluate_fn: As in :func:`group_pruning_curve`.
        seed: Seed of the random order (``torch.Generator().manual_seed(seed)``).
        progress: Show a tqdm progress bar over the retrainings.

    Returns:
        A :class:`GroupPruningResult` whose ``fractions_kept`` are ``n_kept / n_train``.

    Raises:
        ConfigError: If ``n_train < 1`` or a count is outside ``[1, n_train]``.
    """
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 1:
        raise ConfigError(f"n_train must be a positive int; got {n_train!r}.")
    counts = n_kept.tolist() if isinstance(n_kept, torch.Tensor) else list(n_kept)
    if not counts:
        raise ConfigError("n_kept must name at least one count; got none.")
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= c <= n_train:
            raise ConfigError(f"n_kept entries must be ints in [1, n_train={n_train}]; got {c!r}.")
    perm = torch.randperm(int(n_train), generator=torch.Generator().manual_seed(seed))
    kept = [torch.sort(perm[: int(c)]).values for c in counts]
    fractions = [int(c) / int(n_train) for c in counts]
    return _run_curve(fractions, kept, retrain_fn, evaluate_fn, progress, "random pruning")


# --------------------------------------------------------------------------------------------
# Noisy-label identification
# --------------------------------------------------------------------------------------------


def sum_per_group(per_example: Any, groups: GroupsLike) -> torch.Tensor:
    """``(n_groups,)`` float64 sums of a per-example score (e.g. training loss) per group.

    Example:
        >>> sum_per_group([1.0, 2.0, 4.0], [1, 0, 1]).tolist()
        [2.0, 5.0]
    """
    g = _grouping(groups)
    x = _unit_vector(per_example, g.n_train, "per_example")
    return g.sum_rows(x)


@dataclass(frozen=True)
class GroupInspectionResult:
    """Flipped labels found while inspecting whole groups in decreasing score order.

    Attributes:
        order: ``(n_groups,)`` int64 group indices in inspection order.
        fraction_inspected: ``(n_groups + 1,)`` float64 fraction of training examples
            inspected after ``0, 1, ..., n_groups`` groups.
        fraction_found: ``(n_groups + 1,)`` float64 fraction of the flipped labels found.
        area: trapezoidal area under ``fraction_found`` vs ``fraction_inspected``.
        n_flipped: Number of flipped examples.
    """

    order: torch.Tensor
    fraction_inspected: torch.Tensor
    fraction_found: torch.Tensor
    area: float
    n_flipped: int

    def found_at(self, fraction: float) -> float:
        """Fraction found after inspecting ``fraction`` of the examples (linear in between).

        Raises:
            DataError: If ``fraction`` is not a number in ``[0, 1]``.
        """
        _check_fraction(fraction)
        x = self.fraction_inspected.numpy()
        y = self.fraction_found.numpy()
        return float(np.interp(fraction, x, y))


def group_inspection_curve(scores: Any, groups: GroupsLike, flipped: Any) -> GroupInspectionResult:
    """Inspect groups in decreasing ``scores`` order and count the flipped labels found.

    Args:
        scores: ``(n_groups,)`` group scores, higher = more suspicious (group
            self-influence, or :func:`sum_per_group` of the training loss).
        groups: a ``Grouping`` or ``(n_train,)`` group ids.
        flipped: ``(n_train,)`` bool mask of the flipped training labels.

    Returns:
        A :class:`GroupInspectionResult`.

    Raises:
        DataError: If ``scores`` has the wrong length or non-finite entries, ``flipped`` is
            not a bool mask of length ``n_train``, or no label is flipped.

    Example:
        >>> r = group_inspection_curve([0.1, 3.0], [0, 0, 1, 1], [False, False, True, False])
        >>> r.fraction_found.tolist(), r.area
        ([0.0, 1.0, 1.0], 0.75)
    """
    g = _grouping(groups)
    s = _unit_vector(scores, g.n_groups, "scores")
    f = flipped if isinstance(flipped, torch.Tensor) else torch.as_tensor(np.asarray(flipped))
    if f.dtype != torch.bool or f.shape != (g.n_train,):
        raise DataError(
            f"flipped must be a bool mask of shape (n_train={g.n_train},); got dtype {f.dtype} "
            f"and shape {tuple(f.shape)}."
        )
    f = f.detach().cpu()
    n_flipped = int(f.sum())
    if n_flipped == 0:
        raise DataError("flipped marks no example; the inspection curve needs one flip at least.")
    order = torch.sort(s, descending=True, stable=True).indices
    sizes = g.sizes().to(torch.float64)[order]
    flips = g.sum_rows(f.to(torch.float64))[order]
    zero = torch.zeros(1, dtype=torch.float64)
    x = torch.cat([zero, torch.cumsum(sizes, 0)]) / g.n_train
    y = torch.cat([zero, torch.cumsum(flips, 0)]) / n_flipped
    area = float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())
    return GroupInspectionResult(order, x, y, area, n_flipped)


def random_group_inspection_curve(
    groups: GroupsLike, flipped: Any, seed: int = 0
) -> GroupInspectionResult:
    """Random baseline of :func:`group_inspection_curve`: groups in a seeded random order."""
    g = _grouping(groups)
    s = torch.rand(g.n_groups, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return group_inspection_curve(s, g, flipped)
