"""The grouper registry and ``groups=``: what every attributor accepts as its units."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from datatrace.data import Batch, num_examples
from datatrace.errors import ConfigError, DataError
from datatrace.group.groupers import ClassRandomGrouper, GivenGrouper, Grouper, RandomGrouper
from datatrace.group.grouping import Grouping
from datatrace.group.kmeans_groupers import (
    KMeansGradGrouper,
    KMeansInputGrouper,
    KMeansReprGrouper,
)
from datatrace.task import Task

__all__ = ["GROUPERS", "check_groups_spec", "make_grouper", "resolve_groups"]

GROUPERS: dict[str, type[Grouper]] = {
    g.grouper_id: g
    for g in (
        RandomGrouper,
        ClassRandomGrouper,
        KMeansInputGrouper,
        KMeansReprGrouper,
        KMeansGradGrouper,
        GivenGrouper,
    )
}


def make_grouper(grouper_id: str, **settings: Any) -> Grouper:
    """Build a grouper by id (DESIGN.md §8), e.g. ``make_grouper("kmeans-grad", group_size=4)``."""
    if grouper_id not in GROUPERS:
        raise ConfigError(f"unknown grouper {grouper_id!r}; choose one of {sorted(GROUPERS)}.")
    if grouper_id == "given" and "source" not in settings:
        raise ConfigError(
            "the 'given' grouper needs the ids: pass source= (ids, a column name or a callable), "
            "or pass them to groups= directly."
        )
    try:
        return GROUPERS[grouper_id](**settings)
    except TypeError as exc:
        raise ConfigError(
            f"invalid settings {sorted(settings)} for grouper {grouper_id!r}: {exc}"
        ) from exc


GroupsSpec = Grouping | Grouper | str | Sequence[int] | torch.Tensor | Callable[[Batch], Any]


def check_groups_spec(groups: Any) -> Any:
    """Validate what was passed as ``groups=`` without the data (for ``__init__``).

    Returns the normalised spec: ``None``, a :class:`Grouping`, a :class:`Grouper` (ids,
    columns and callables become a :class:`GivenGrouper`).
    """
    if groups is None or isinstance(groups, (Grouping, Grouper)):
        return groups
    if isinstance(groups, str):
        if groups == "given":
            return make_grouper("given")  # raises the explanatory error
        if groups in GROUPERS:
            return make_grouper(groups)
        return GivenGrouper(groups)  # a column name; checked against the data in fit
    if callable(groups) and not isinstance(groups, torch.Tensor):
        return GivenGrouper(groups)
    if isinstance(groups, (Mapping, set)):
        raise ConfigError(
            f"groups= got a {type(groups).__name__}; pass a Grouping, a grouper (id or object), "
            "a sequence of group ids per training example, a column name or a callable."
        )
    try:
        return GivenGrouper(groups)
    except DataError as exc:
        raise ConfigError(f"invalid groups=: {exc}") from exc


def resolve_groups(groups: Any, train: Any, task: Task | None = None) -> Grouping | None:
    """Turn a ``groups=`` spec into a :class:`Grouping` of ``train`` (None: per example).

    Raises:
        DataError: when the ids do not cover the training set, or there are more groups
            than training examples.
    """
    spec = check_groups_spec(groups)
    if spec is None:
        return None
    n = num_examples(train)
    grouping = spec if isinstance(spec, Grouping) else spec.group(train, task)
    if grouping.n_train != n:
        raise DataError(
            f"the grouping has {grouping.n_train} group ids but the training set has {n} "
            "examples; give exactly one group id per training example."
        )
    if grouping.n_groups > n:  # only reachable through a hand-built Grouping
        raise DataError(f"{grouping.n_groups} groups for {n} training examples: some are empty.")
    return grouping
