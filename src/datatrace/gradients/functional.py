"""Generic per-sample gradients with ``torch.func``: ``vmap(grad(loss_of_one_example))``.

Group gradients (:func:`functional_group_grads`) vmap over groups instead: ``grad`` of each
group's summed objective.

Works for any module ``functional_call`` can run; memory is ``chunk_size x n_tracked``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from datatrace.data import Batch
from datatrace.task import Task, _SplitBatch

__all__ = ["functional_group_grads", "functional_per_sample_grads"]


def _unsqueeze(x: Any) -> Any:
    return x.unsqueeze(0) if isinstance(x, torch.Tensor) else x


def functional_per_sample_grads(
    task: Task,
    state: Mapping[str, torch.Tensor],
    batch: Batch,
    names: Sequence[str],
    which: str = "loss",
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of each example's objective w.r.t. ``names``: ``{name: (B, *param.shape)}``.

    Args:
        task: the task (model, loss, target).
        state: parameters and buffers to evaluate at (see :meth:`Task.state`).
        batch: one batch in any form the task accepts.
        names: parameters to differentiate.
        which: ``"loss"`` (training loss) or ``"query"`` (the task's query objective).
        chunk_size: examples per vectorised chunk (None: the whole batch at once).
    """
    split = task.split_batch(batch)
    objective = task.objective(which)
    params = {n: state[n].detach() for n in names}
    rest = {n: v for n, v in state.items() if n not in params}

    def one(
        p: dict[str, torch.Tensor], args: Any, kwargs: Any, labels: Any, mask: Any
    ) -> torch.Tensor:
        single = _SplitBatch(
            tree_map(_unsqueeze, args),
            tree_map(_unsqueeze, kwargs),
            _unsqueeze(labels),
            _unsqueeze(mask),
        )
        out = task.outputs({**rest, **p}, single)
        return objective(out, single)[0]

    mask_dim = 0 if split.mask is not None else None
    fn = vmap(grad(one), in_dims=(None, 0, 0, 0, mask_dim), chunk_size=chunk_size)
    return fn(params, split.args, split.kwargs, split.labels, split.mask)


def functional_group_grads(
    task: Task,
    state: Mapping[str, torch.Tensor],
    batch: Batch,
    names: Sequence[str],
    members: torch.Tensor,
    which: str = "loss",
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of each group's summed objective w.r.t. ``names``: ``{name: (G, *shape)}``.

    ``members`` is ``(G, k)`` of batch indices, ``-1`` padding groups smaller than ``k``.
    Each group is one mini-batch of its ``k`` members (padding weighted 0) and ``vmap`` runs
    ``grad`` of the weighted sum over groups: one gradient per group, never one per example.
    """
    split = task.split_batch(batch)
    objective = task.objective(which)
    params = {n: state[n].detach() for n in names}
    rest = {n: v for n, v in state.items() if n not in params}
    index = members.clamp_min(0)
    weight = (members >= 0).to(next(iter(params.values())).dtype)

    def gather(x: Any) -> Any:
        return x[index.to(x.device)] if isinstance(x, torch.Tensor) else x

    def one(
        p: dict[str, torch.Tensor], args: Any, kwargs: Any, labels: Any, mask: Any, w: Any
    ) -> torch.Tensor:
        group = _SplitBatch(args, kwargs, labels, mask)
        out = task.outputs({**rest, **p}, group)
        return (objective(out, group) * w).sum()

    mask = gather(split.mask)
    mask_dim = 0 if mask is not None else None
    fn = vmap(grad(one), in_dims=(None, 0, 0, 0, mask_dim, 0), chunk_size=chunk_size)
    args, kwargs = tree_map(gather, split.args), tree_map(gather, split.kwargs)
    return fn(params, args, kwargs, gather(split.labels), mask, weight.to(index.device))
