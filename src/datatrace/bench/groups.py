"""Group ground truth: retrain on random subsets of groups, score group attributions.

Group LDS (Ley et al., 2024, "Generalized Group Data Attribution", §5) is the LDS of
:mod:`datatrace.metrics.lds` with groups as the units: each of ``m`` subsets keeps a
fraction ``alpha`` of the *groups* (all their members), the model is retrained on the kept
examples, and a group attribution predicts the change as the sum of the kept groups' scores.
The retraining loop is :func:`datatrace.bench.groundtruth.subset_ground_truth` over group
indices; this module only maps kept groups to their training examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from datatrace.bench.groundtruth import SubsetGroundTruth, subset_ground_truth
from datatrace.errors import DataError
from datatrace.group import Grouping
from datatrace.metrics.lds import LDSResult, lds
from datatrace.scores import Scores

__all__ = ["group_lds", "group_removal_effect", "group_subset_ground_truth"]


def group_subset_ground_truth(
    train_fn: Callable[[torch.Tensor, int], Any],
    measure_fn: Callable[[Any], torch.Tensor],
    grouping: Grouping,
    m: int,
    alpha: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SubsetGroundTruth:
    """Retrain on ``m`` random subsets of groups and measure every query.

    Args:
        train_fn: ``train_fn(example_indices, seed) -> model`` (ascending example indices).
        measure_fn: ``measure_fn(model) -> (n_query,)`` in improvement orientation.
        grouping: the groups; ``subsets`` of the result are ``(m, n_groups)``.
        m, alpha, seeds, seed, progress: as :func:`subset_ground_truth`.

    Example:
        >>> y = torch.arange(8.0)
        >>> g = Grouping.from_ids(torch.arange(8) // 2)
        >>> gt = group_subset_ground_truth(lambda idx, s: y[idx].mean(), lambda mu: -(mu - y) ** 2, g, m=3)
        >>> tuple(gt.subsets.shape), tuple(gt.targets.shape)
        ((3, 4), (3, 8))
    """
    order = torch.argsort(grouping.labels, stable=True)
    starts = torch.cumsum(grouping.sizes(), 0) - grouping.sizes()

    def members(groups: torch.Tensor) -> torch.Tensor:
        parts = [
            order[int(starts[g]) : int(starts[g]) + int(grouping.sizes()[g])]
            for g in groups.tolist()
        ]
        return torch.sort(torch.cat(parts)).values

    def train_groups(groups: torch.Tensor, s: int) -> Any:
        return train_fn(members(groups), s)

    return subset_ground_truth(
        train_groups, measure_fn, grouping.n_groups, m, alpha, seeds, seed, progress
    )


def group_lds(scores: Scores | torch.Tensor, ground_truth: SubsetGroundTruth) -> LDSResult:
    """LDS of ``(n_query, n_groups)`` group scores against a group ground truth."""
    values = scores.values if isinstance(scores, Scores) else scores
    if values.shape[1] != ground_truth.subsets.shape[1]:
        raise DataError(
            f"group scores have {values.shape[1]} units but the ground truth has "
            f"{ground_truth.subsets.shape[1]} groups; score with the same grouping."
        )
    return lds(values, ground_truth.subsets, ground_truth.targets)


def group_removal_effect(
    train_fn: Callable[[torch.Tensor, int], Any],
    measure_fn: Callable[[Any], torch.Tensor],
    grouping: Grouping,
    groups: torch.Tensor,
    seeds: int = 1,
) -> torch.Tensor:
    """``(len(groups), n_query)`` actual effect of training on each group: full minus removed.

    Positive = the group improves the query (DESIGN.md §1's sign), comparable to group scores.
    """
    n = grouping.n_train
    effects = []
    for s in range(seeds):
        full = measure_fn(train_fn(torch.arange(n), s)).double()
        rows = []
        for g in groups.tolist():
            keep = (grouping.labels != g).nonzero().flatten()
            rows.append(full - measure_fn(train_fn(keep, s)).double())
        effects.append(torch.stack(rows))
    return torch.stack(effects).mean(0)
