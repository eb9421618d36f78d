"""Counterfactual removal metrics: brittleness and dataset pruning curves.

Both metrics retrain; the retraining itself belongs to the benchmark layer, which passes it in
as callables. The functions here choose *what* to remove, call back, and tabulate.

**Brittleness** (Ilyas et al., 2022, "Datamodels: Predicting Predictions from Training
Data", ICML; used to compare attribution methods in Park et al., 2023, "TRAK: Attributing
Model Behavior at Scale", ICML): for a query and a budget ``k``,
remove the ``k`` training units the attribution ranks as its strongest proponents, retrain,
and check whether the query's prediction flips. A better attribution flips more predictions
with fewer removals. The curve reports, per ``k``, the fraction of queries that flipped;
``first_flip_k`` gives each query's smallest flipping budget (its brittleness estimate).

**Dataset pruning** (Yang et al., 2023, "Dataset Pruning: Reducing Training Data by Examining
Generalization Influence", ICLR): a unit's value is its total attribution to a validation
set, ``sum_q values[q, i]`` (DESIGN.md §1: positive = training on it helps). Drop the
lowest-valued fraction of the units, retrain on the rest and evaluate; a good attribution
keeps accuracy up longer than dropping units at random (``random_pruning_curve``, or
``random_example_pruning_curve`` for exactly as many examples as another curve kept).

**Groups** (Ley et al., 2024, "Generalized Group Data Attribution"): with ``groups=``, the
values are one per group (``attributor.attribute(val)`` with ``groups=``), fractions count
training *examples*, and whole groups are dropped, lowest value first, while at most
``round(fraction * n_train)`` examples go; ``retrain_fn`` gets the kept example indices.
Singleton groups give exactly the per-example result.

Ties are broken deterministically by position: among equal scores the lower column index is
the stronger proponent (brittleness) and is dropped first (pruning). Indices passed to the
callables are unit ids: a ``Scores``' ``unit_ids`` (and ``query_ids``), or column (row)
positions for a plain tensor. To evaluate a subset of queries, pass a ``Scores`` holding
those rows and their ``query_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np
import torch

from datatrace._progress import progress_bar
from datatrace.errors import ConfigError, DataError
from datatrace.metrics.lds import _real_cpu64
from datatrace.scores import Scores

if TYPE_CHECKING:  # metrics sit below group (DESIGN.md §3): a Grouping is only duck-typed
    from datatrace.group import Grouping

__all__ = [
    "BrittlenessResult",
    "PruningResult",
    "brittleness_curve",
    "pruning_curve",
    "random_example_pruning_curve",
    "random_pruning_curve",
    "top_proponents",
]

M = TypeVar("M")
GroupsLike: TypeAlias = "Grouping | torch.Tensor | Sequence[int] | np.ndarray"


# --------------------------------------------------------------------------------------------
# Shared validation
# --------------------------------------------------------------------------------------------


def _values_and_ids(
    values: Scores | torch.Tensor, name: str = "values"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values float64 (n_query, n_units), unit_ids, query_ids)`` after validation."""
    if isinstance(values, Scores):
        v, unit_ids, query_ids = values.values, values.unit_ids, values.query_ids
        assert unit_ids is not None and query_ids is not None  # set by Scores.__post_init__
    elif isinstance(values, torch.Tensor):
        v = values
        if v.ndim != 2:
            raise DataError(
                f"{name} must be 2-D (n_query, n_train) attribution scores; got shape "
                f"{tuple(v.shape)}."
            )
        unit_ids = torch.arange(v.shape[1])
        query_ids = torch.arange(v.shape[0])
    else:
        raise DataError(
            f"{name} must be a Scores or a 2-D torch.Tensor; got {type(values).__name__}."
        )
    v = _real_cpu64(v, name)
    n_bad = int((~torch.isfinite(v)).sum())
    if n_bad:
        raise DataError(f"{name} (shape {tuple(v.shape)}) contain {n_bad} non-finite values.")
    if v.shape[0] == 0 or v.shape[1] == 0:
        raise DataError(
            f"{name} needs at least one query and one training unit; got shape {tuple(v.shape)}."
        )
    return v, unit_ids.detach().to("cpu", torch.int64), query_ids.detach().to("cpu", torch.int64)


def _check_k(k: Any, n_train: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_train:
        raise ConfigError(f"k must be an int in [1, n_train={n_train}]; got {k!r}.")
    return int(k)


def _check_ks(ks: Sequence[int] | torch.Tensor, n_train: int) -> torch.Tensor:
    items = ks.tolist() if isinstance(ks, torch.Tensor) else list(ks)
    if not items:
        raise ConfigError("ks must name at least one removal budget k; got an empty sequence.")
    out = [_check_k(k, n_train) for k in items]
    if any(b <= a for a, b in pairwise(out)):
        raise ConfigError(f"ks must be strictly increasing; got {out}.")
    return torch.tensor(out, dtype=torch.int64)


def _check_fractions(fractions: Sequence[float] | torch.Tensor) -> torch.Tensor:
    items = fractions.tolist() if isinstance(fractions, torch.Tensor) else list(fractions)
    if not items:
        raise ConfigError("fractions must name at least one fraction to prune; got none.")
    for fr in items:
        if isinstance(fr, bool) or not isinstance(fr, (int, float, np.floating, np.integer)):
            raise ConfigError(
                f"fractions must be numbers in [0, 1); got {fr!r} ({type(fr).__name__})."
            )
        if not 0.0 <= float(fr) < 1.0:
            raise ConfigError(
                f"fractions must lie in [0, 1) (the fraction of units dropped); got {fr!r}."
            )
    out = [float(fr) for fr in items]
    if any(b <= a for a, b in pairwise(out)):
        raise ConfigError(f"fractions must be strictly increasing; got {out}.")
    return torch.tensor(out, dtype=torch.float64)


def _n_dropped(fraction: float, n_units: int, what: str = "units") -> int:
    # Round half up, not floor: 0.29 * 100 is 28.999999999999996 in floating point.
    n_drop = math.floor(fraction * n_units + 0.5)
    if n_drop >= n_units:
        raise ConfigError(
            f"pruning fraction {fraction!r} of {n_units} {what} drops {n_drop} and keeps none; "
            f"use fractions below {(n_units - 0.5) / n_units:.6g}."
        )
    return n_drop


def _group_labels(groups: GroupsLike, n_units: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, ids)`` of a ``Grouping`` or of ``(n_train,)`` group ids, for ``n_units`` values.

    ``labels[i]`` is example i's group index, ``ids`` the group ids in ascending order (as
    ``Grouping.from_ids`` relabels them), which is the order the values must follow.
    """
    labels = getattr(groups, "labels", None)
    if isinstance(labels, torch.Tensor):  # a datatrace.group.Grouping, validated when built
        ids = groups.ids  # type: ignore[union-attr]
    else:
        t = groups if isinstance(groups, torch.Tensor) else torch.as_tensor(np.asarray(groups))
        bad = t.is_floating_point() or t.is_complex() or t.dtype == torch.bool
        if bad or t.ndim != 1 or t.numel() == 0 or int(t.min()) < 0:
            raise DataError(
                f"groups must be a Grouping or (n_train,) non-negative integer group ids; got "
                f"dtype {t.dtype} and shape {tuple(t.shape)}."
            )
        ids, labels = torch.unique(t.detach().cpu().long(), sorted=True, return_inverse=True)
    if ids.numel() != n_units:
        raise DataError(
            f"{name} must have one value per group (n_groups={ids.numel()}); got {n_units}."
        )
    return labels.detach().cpu().long(), ids.detach().cpu().long()


def _as_bool(x: Any, where: str) -> bool:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype == torch.bool:
        return bool(x.item())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    got = (
        f"a tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
        if isinstance(x, torch.Tensor)
        else repr(x)
    )
    raise DataError(f"flips_fn must return a bool; got {got} {where}.")


def _as_float(x: Any, where: str) -> float:
    try:
        if isinstance(x, bool):
            raise TypeError
        value = float(x)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(
            f"evaluate_fn must return a float; got {type(x).__name__} {where}."
        ) from None
    if not math.isfinite(value):
        raise DataError(f"evaluate_fn returned {value} {where}; expected a finite number.")
    return value


# --------------------------------------------------------------------------------------------
# Brittleness
# --------------------------------------------------------------------------------------------


def top_proponents(values: Scores | torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scored units of every query, strongest first.

    Ranks by score alone, as in Ilyas et al. (2022): if a query has fewer than ``k``
    positive scores, the rest of its top ``k`` are its least negative units. Ties go to
    the lower column index.

    Args:
        values: ``(n_query, n_train)`` attribution scores, or a ``Scores``.
        k: Number of units per query, in ``[1, n_train]``.

    Returns:
        ``(n_query, k)`` int64 unit ids (a ``Scores``' ``unit_ids``, else column indices).

    Raises:
        DataError: If ``values`` is not 2-D or holds non-finite values.
        ConfigError: If ``k`` is not an int in ``[1, n_train]``.

    Example:
        >>> top_proponents(torch.tensor([[0.5, -1.0, 2.0, 0.5]]), 3).tolist()
        [[2, 0, 3]]
    """
    v, unit_ids, _ = _values_and_ids(values)
    k = _check_k(k, int(v.shape[1]))
    cols = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return unit_ids[cols]


@dataclass(frozen=True)
class BrittlenessResult:
    """Predictions flipped by removing each query's top-``k`` proponents.

    Attributes:
        ks: ``(n_k,)`` int64 removal budgets, increasing.
        fraction_flipped: ``(n_k,)`` float64 fraction of queries whose prediction flipped
            after removing their top-``k`` proponents and retraining (the curve to plot).
        flipped: ``(n_k, n_query)`` bool, ``flipped[j, q]`` for budget ``ks[j]``; every
            budget is an independent retraining, so a row need not contain the previous.
        query_ids: ``(n_query,)`` int64 ids of the queries, in column order of ``flipped``.

    Example:
        >>> values = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
        >>> r = brittleness_curve(values, [1, 2], lambda q, removed: removed.tolist(),
        ...                       lambda removed, q: 1 in removed)
        >>> r.fraction_flipped.tolist(), r.first_flip_k.tolist()
        ([0.0, 1.0], [2, 2])
    """

    ks: torch.Tensor
    fraction_flipped: torch.Tensor
    flipped: torch.Tensor
    query_ids: torch.Tensor

    @property
    def first_flip_k(self) -> torch.Tensor:
        """``(n_query,)`` int64 smallest ``k`` in ``ks`` that flipped each query, -1 if none."""
        any_flip = self.flipped.any(dim=0)
        first = torch.argmax(self.flipped.to(torch.int8), dim=0)  # first True in each column
        return torch.where(any_flip, self.ks[first], torch.full_like(first, -1))


def brittleness_curve(
    values: Scores | torch.Tensor,
    ks: Sequence[int] | torch.Tensor,
    retrain_fn: Callable[[int, torch.Tensor], M],
    flips_fn: Callable[[M, int], Any],
    progress: bool = False,
) -> BrittlenessResult:
    """Fraction of queries whose prediction flips when their top-``k`` proponents go.

    For every ``k`` in ``ks`` and every query, calls ``retrain_fn(query_id, removed)`` with
    the query's ``k`` strongest proponents (``top_proponents``), then
    ``flips_fn(model, query_id)``: ``len(ks) * n_query`` retrainings in all.

    Args:
        values: ``(n_query, n_train)`` attribution scores, or a ``Scores``; positive =
            proponent (DESIGN.md §1).
        ks: Strictly increasing removal budgets, each in ``[1, n_train]``.
        retrain_fn: ``retrain_fn(query_id, removed) -> model``; ``removed`` is a 1-D int64
            tensor of the unit ids to leave out, strongest proponent first.
        flips_fn: ``flips_fn(model, query_id) -> bool``, True if the retrained model's
            prediction on the query differs from the original model's.
        progress: Show a tqdm progress bar over the retrainings.

    Returns:
        A ``BrittlenessResult``.

    Raises:
        DataError: If ``values`` is not 2-D with finite entries, or ``flips_fn`` returns
            anything but a bool.
        ConfigError: If ``ks`` is empty, not increasing or out of ``[1, n_train]``.
    """
    v, unit_ids, query_ids = _values_and_ids(values)
    n_query, n_train = v.shape
    budgets = _check_ks(ks, n_train)
    k_max = int(budgets[-1])
    ranked = unit_ids[torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k_max]]
    flipped = torch.zeros(len(budgets), n_query, dtype=torch.bool)
    total = len(budgets) * n_query
    with progress_bar(desc="removal retraining", enabled=progress, total=total) as bar:
        for j, k in enumerate(budgets.tolist()):
            for row in range(n_query):
                query_id = int(query_ids[row])
                model = retrain_fn(query_id, ranked[row, :k].clone())
                flipped[j, row] = _as_bool(
                    flips_fn(model, query_id), f"for query {query_id} at k={k}"
                )
                bar.update(1)
    return BrittlenessResult(
        ks=budgets,
        fraction_flipped=flipped.to(torch.float64).mean(dim=1),
        flipped=flipped,
        query_ids=query_ids,
    )


# --------------------------------------------------------------------------------------------
# Dataset pruning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruningResult:
    """Evaluation after retraining on what remains when the lowest-valued units are dropped.

    Attributes:
        fractions: ``(n_f,)`` float64 fraction of units dropped, increasing (the x axis).
        n_kept: ``(n_f,)`` int64 number of units each retraining used.
        accuracy: ``(n_f,)`` float64 what ``evaluate_fn`` returned (accuracy by convention;
            the y axis).
        unit_values: ``(n_units,)`` float64 value of every unit that the ranking used
            (the total attribution, or the random draw of ``random_pruning_curve``).
        kept: per fraction, the 1-D int64 ids passed to ``retrain_fn`` (unit ids, or
            training indices with ``groups=``), ascending.

    Example:
        >>> r = pruning_curve(torch.tensor([0.3, -0.2, 0.1, 0.5]), [0.0, 0.5],
        ...                   lambda kept: kept.tolist(), lambda kept: float(len(kept)))
        >>> r.n_kept.tolist(), r.accuracy.tolist(), r.kept[1].tolist()
        ([4, 2], [4.0, 2.0], [0, 3])
    """

    fractions: torch.Tensor
    n_kept: torch.Tensor
    accuracy: torch.Tensor
    unit_values: torch.Tensor
    kept: tuple[torch.Tensor, ...]


def _unit_values(values_or_unit_scores: Scores | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = values_or_unit_scores
    if isinstance(x, torch.Tensor) and x.ndim == 1:
        u = _real_cpu64(x, "unit scores")
        n_bad = int((~torch.isfinite(u)).sum())
        if n_bad:
            raise DataError(
                f"unit scores (shape {tuple(u.shape)}) contain {n_bad} non-finite values."
            )
        if u.shape[0] == 0:
            raise DataError("unit scores are empty; there is nothing to prune.")
        return u, torch.arange(u.shape[0])
    if isinstance(x, torch.Tensor) and x.ndim != 2:
        raise DataError(
            f"values_or_unit_scores must be (n_query, n_train) attribution scores of the "
            f"validation queries or (n_train,) unit values; got shape {tuple(x.shape)}."
        )
    v, unit_ids, _ = _values_and_ids(x, "values_or_unit_scores")
    # DESIGN.md §1: values[q, i] > 0 means unit i helps query q, so the column sum is how much
    # the unit helps the validation set as a whole.
    return v.sum(dim=0), unit_ids


def _prune(
    unit_values: torch.Tensor,
    unit_ids: torch.Tensor,
    fractions: torch.Tensor,
    n_drop: list[int],
    fns: tuple[Callable[[torch.Tensor], M], Callable[[M], Any]],
    progress: bool,
    desc: str,
    labels: torch.Tensor | None = None,
) -> PruningResult:
    """Retrain without the ``n_drop[j]`` lowest-valued units (examples, with ``labels``)."""
    retrain_fn, evaluate_fn = fns
    order = torch.sort(unit_values, stable=True).indices  # lowest value (dropped) first
    kept_sets = []
    for d in n_drop:
        if labels is None:
            kept_sets.append(unit_ids[torch.sort(order[d:]).values])
            continue
        # Whole groups, lowest value first, for as long as at most d examples are dropped.
        sizes = torch.bincount(labels, minlength=len(order))[order]
        gone = torch.zeros(len(order), dtype=torch.bool)
        gone[order[: int((torch.cumsum(sizes, 0) <= d).sum())]] = True
        kept_sets.append((~gone[labels]).nonzero().flatten())
    accuracy = torch.empty(len(n_drop), dtype=torch.float64)
    for j, kept in enumerate(progress_bar(kept_sets, desc=desc, enabled=progress)):
        model = retrain_fn(kept.clone())
        accuracy[j] = _as_float(evaluate_fn(model), f"at fraction {float(fractions[j])!r}")
    return PruningResult(
        fractions=fractions,
        n_kept=torch.tensor([len(k) for k in kept_sets], dtype=torch.int64),
        accuracy=accuracy,
        unit_values=unit_values,
        kept=tuple(kept_sets),
    )


def pruning_curve(
    values_or_unit_scores: Scores | torch.Tensor,
    fractions: Sequence[float] | torch.Tensor,
    retrain_fn: Callable[[torch.Tensor], M],
    evaluate_fn: Callable[[M], Any],
    progress: bool = False,
    *,
    groups: GroupsLike | None = None,
) -> PruningResult:
    """Accuracy after dropping the lowest-valued fraction of the units and retraining.

    For every fraction ``p`` the ``round(p * n_units)`` units of lowest value are dropped
    (rounding half up; ties drop the lower index first) and ``retrain_fn`` gets the rest.
    The pruned sets are nested: a larger fraction drops a superset.

    Args:
        values_or_unit_scores: ``(n_query, n_train)`` attribution scores of validation
            queries (a tensor or a ``Scores``), whose column sums are the unit values; or
            ``(n_train,)`` unit values directly.
        fractions: Strictly increasing fractions of units to drop, each in ``[0, 1)`` and
            leaving at least one unit; include 0 for the full-data reference.
        retrain_fn: ``retrain_fn(kept) -> model``; ``kept`` is a 1-D int64 tensor of the
            unit ids to train on, ascending.
        evaluate_fn: ``evaluate_fn(model) -> float``, e.g. test accuracy.
        progress: Show a tqdm progress bar over the retrainings.
        groups: A ``Grouping`` or ``(n_train,)`` group ids when the units are groups (in
            ascending id order): fractions then count training examples, whole groups go
            while at most ``round(p * n_train)`` examples are dropped, and ``kept`` holds
            training indices (module docstring).

    Returns:
        A ``PruningResult``.

    Raises:
        DataError: On a wrong shape or non-finite values, values that are not one per
            group, or if ``evaluate_fn`` returns a non-number or a non-finite number.
        ConfigError: On empty, non-increasing or out-of-range ``fractions``.

    Example:
        >>> r = pruning_curve(torch.tensor([0.5, -1.0, 2.0]), [0.5], lambda kept: kept,
        ...                   lambda kept: 0.0, groups=[0, 0, 1, 1, 2, 2])
        >>> r.kept[0].tolist()
        [0, 1, 4, 5]
    """
    u, ids = _unit_values(values_or_unit_scores)
    fr = _check_fractions(fractions)
    fns = (retrain_fn, evaluate_fn)
    if groups is None:
        n_drop = [_n_dropped(f, len(u)) for f in fr.tolist()]
        return _prune(u, ids, fr, n_drop, fns, progress, "pruning retraining")
    labels, group_ids = _group_labels(groups, len(u), "values_or_unit_scores")
    if isinstance(values_or_unit_scores, Scores) and not torch.equal(ids, group_ids):
        raise DataError(
            f"the scores' unit_ids {ids[:5].tolist()}... are not the groups' ids "
            f"{group_ids[:5].tolist()}...; attribute with the same groups."
        )
    n_drop = [_n_dropped(f, len(labels), "training examples") for f in fr.tolist()]
    return _prune(u, ids, fr, n_drop, fns, progress, "group pruning retraining", labels)


def random_pruning_curve(
    n_units: int,
    fractions: Sequence[float] | torch.Tensor,
    retrain_fn: Callable[[torch.Tensor], M],
    evaluate_fn: Callable[[M], Any],
    seed: int = 0,
    progress: bool = False,
) -> PruningResult:
    """The random baseline of ``pruning_curve``: drop units in a seeded random order.

    Units get i.i.d. uniform values from ``torch.Generator().manual_seed(seed)`` and are
    pruned exactly as in ``pruning_curve``, so the pruned sets are nested as there. Average
    several seeds for a smooth baseline.

    Args:
        n_units: Number of training units (ids ``0 .. n_units - 1``).
        fractions: As in ``pruning_curve``.
        retrain_fn: As in ``pruning_curve``.
        evaluate_fn: As in ``pruning_curve``.
        seed: Seed of the random order.
        progress: Show a tqdm progress bar over the retrainings.

    Returns:
        A ``PruningResult`` whose ``unit_values`` are the random draws.

    Raises:
        ConfigError: If ``n_units < 1``, or on invalid ``fractions``.
        DataError: If ``evaluate_fn`` returns a non-number or a non-finite number.

    Example:
        >>> r = random_pruning_curve(10, [0.0, 0.3], lambda kept: kept,
        ...                          lambda kept: float(len(kept)))
        >>> r.accuracy.tolist()
        [10.0, 7.0]
    """
    if isinstance(n_units, bool) or not isinstance(n_units, (int, np.integer)) or n_units < 1:
        raise ConfigError(f"n_units must be a positive int; got {n_units!r}.")
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(int(n_units), generator=gen, dtype=torch.float64)
    fr = _check_fractions(fractions)
    n_drop = [_n_dropped(f, int(n_units)) for f in fr.tolist()]
    fns = (retrain_fn, evaluate_fn)
    return _prune(u, torch.arange(int(n_units)), fr, n_drop, fns, progress, "random pruning")


def random_example_pruning_curve(
    n_train: int,
    n_kept: Sequence[int] | torch.Tensor,
    retrain_fn: Callable[[torch.Tensor], M],
    evaluate_fn: Callable[[M], Any],
    seed: int = 0,
    progress: bool = False,
) -> PruningResult:
    """Random baseline with given counts: keep ``n_kept[j]`` examples of one seeded order.

    Pass another ``PruningResult``'s ``n_kept`` (e.g. a curve with ``groups=``) to remove
    exactly as many examples at random. The kept sets are nested prefixes of
    ``torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))``.

    Args:
        n_train: Number of training examples.
        n_kept: Examples to keep per point, each in ``[1, n_train]``.
        retrain_fn: As in ``pruning_curve``.
        evaluate_fn: As in ``pruning_curve``.
        seed: Seed of the random order.
        progress: Show a tqdm progress bar over the retrainings.

    Returns:
        A ``PruningResult`` whose ``fractions`` are ``(n_train - n_kept) / n_train``.

    Raises:
        ConfigError: If ``n_train < 1`` or a count is outside ``[1, n_train]``.

    Example:
        >>> r = random_example_pruning_curve(10, [10, 4], lambda kept: kept,
        ...                                  lambda kept: float(len(kept)))
        >>> r.accuracy.tolist()
        [10.0, 4.0]
    """
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 1:
        raise ConfigError(f"n_train must be a positive int; got {n_train!r}.")
    n = int(n_train)
    counts = n_kept.tolist() if isinstance(n_kept, torch.Tensor) else list(n_kept)
    if not counts:
        raise ConfigError("n_kept must name at least one count; got none.")
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= c <= n:
            raise ConfigError(f"n_kept entries must be ints in [1, n_train={n}]; got {c!r}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Values that rank perm[0] highest, so dropping the lowest n - c keeps perm[:c].
    u = torch.empty(n, dtype=torch.float64)
    u[perm] = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    n_drop = [n - int(c) for c in counts]
    fr = torch.tensor(n_drop, dtype=torch.float64) / n
    fns = (retrain_fn, evaluate_fn)
    return _prune(u, torch.arange(n), fr, n_drop, fns, progress, "random example pruning")
