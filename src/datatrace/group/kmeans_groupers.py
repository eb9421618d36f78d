"""Groupers that cluster per-example vectors: ``kmeans-input`` (raw inputs), ``kmeans-repr``
(penultimate representations) and ``kmeans-grad`` (projected training-loss gradients)."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from datatrace._checks import check_int
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.group.clustering import balanced_kmeans, kmeans
from datatrace.group.groupers import Grouper, _batches
from datatrace.task import Task

__all__ = ["KMeansGradGrouper", "KMeansInputGrouper", "KMeansReprGrouper"]


def _inputs_of(task: Task, train: Any, batch_size: int) -> torch.Tensor:
    parts = []
    for batch in _batches(train, batch_size):
        split = task.split_batch(batch)
        leaves = [t for t in (*split.args, *split.kwargs.values()) if isinstance(t, torch.Tensor)]
        if not leaves:
            raise DataError("kmeans-input found no input tensor in the batches.")
        parts.append(leaves[0].reshape(leaves[0].shape[0], -1).double().cpu())
    return torch.cat(parts)


class _KMeansGrouper(Grouper):
    """K-means on per-example vectors, ``ceil(n / group_size)`` clusters.

    ``balanced=True`` (default) caps every cluster at ``group_size`` points
    (:func:`balanced_kmeans`); ``balanced=False`` is plain Lloyd k-means, whose cluster
    sizes can be very unequal.
    """

    def __init__(
        self,
        group_size: int = 16,
        seed: int = 0,
        batch_size: int = 256,
        max_iter: int = 100,
        standardize: bool = True,
        balanced: bool = True,
    ) -> None:
        super().__init__(group_size, seed, batch_size)
        check_int("max_iter", max_iter, 1)
        if not isinstance(balanced, bool):
            raise ConfigError(f"balanced must be True or False; got {balanced!r}.")
        self.max_iter, self.standardize, self.balanced = max_iter, bool(standardize), balanced

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "max_iter": self.max_iter,
            "standardize": self.standardize,
            "balanced": self.balanced,
        }

    @abstractmethod
    def _vectors(self, train: Any, task: Task | None) -> torch.Tensor:
        """``(n_train, d)`` vectors to cluster."""

    def _group_ids(self, train: Any, task: Task | None) -> torch.Tensor:
        x = self._vectors(train, task).double().cpu()
        if self.group_size > x.shape[0]:
            raise DataError(
                f"group_size={self.group_size} exceeds the {x.shape[0]} training examples."
            )
        if self.standardize:  # one feature with a large scale must not decide alone
            x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
        cluster = balanced_kmeans if self.balanced else kmeans
        return cluster(x, self.n_groups(x.shape[0]), seed=self.seed, max_iter=self.max_iter)


class KMeansInputGrouper(_KMeansGrouper):
    """K-means on the raw (flattened) inputs: the first input tensor of each batch.

    Example:
        >>> x = torch.cat([torch.zeros(4, 2), torch.ones(4, 2)]) + 0.01 * torch.randn(8, 2)
        >>> g = KMeansInputGrouper(group_size=4, standardize=False).group((x, torch.zeros(8).long()))
        >>> sorted(g.sizes().tolist())
        [4, 4]
    """

    grouper_id = "kmeans-input"

    def _vectors(self, train: Any, task: Task | None) -> torch.Tensor:
        if task is None:  # split like the default Task: inputs are all but the labels
            return torch.cat(
                [
                    (b[0] if isinstance(b, (tuple, list)) else b).reshape(
                        len(b[0]) if isinstance(b, (tuple, list)) else len(b), -1
                    )
                    for b in _batches(train, self.batch_size)
                ]
            )
        return _inputs_of(task, train, self.batch_size)


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(
            "kmeans-repr hooks the input of the model's last nn.Linear by default, and the model "
            "has none; pass module='<name>' of the layer whose input to cluster."
        )
    return names[-1]


class KMeansReprGrouper(_KMeansGrouper):
    """K-means on penultimate representations: the input of ``module`` (default: the last
    ``nn.Linear``) under the task's current weights.

    Args:
        module: name of the module whose input is clustered.
        **kw: ``batch_size`` as :class:`Grouper`; ``max_iter``, ``standardize`` and ``balanced`` of k-means.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> KMeansReprGrouper(group_size=2).group(data, Task(model.eval())).n_train
        8
    """

    grouper_id = "kmeans-repr"

    def __init__(self, group_size: int = 16, seed: int = 0, module: str | None = None, **kw: Any):
        super().__init__(group_size, seed, **kw)
        self.module = module

    def config(self) -> dict[str, Any]:
        return {**super().config(), "module": self.module}

    def _vectors(self, train: Any, task: Task | None) -> torch.Tensor:
        task = self._need_task(task)
        name = self.module if self.module is not None else _last_linear(task.model)
        modules = dict(task.model.named_modules())
        if name not in modules:
            raise ModelError(f"module={name!r} is not a submodule of the model.")
        seen: list[torch.Tensor] = []
        handle = modules[name].register_forward_hook(lambda m, i, o: seen.append(i[0]))
        parts, state = [], task.state()
        try:
            with torch.no_grad():
                for batch in _batches(train, self.batch_size):
                    seen.clear()
                    split = task.split_batch(batch)
                    task.outputs(state, split)
                    if len(seen) != 1:
                        raise ModelError(
                            f"module {name!r} ran {len(seen)} times in one forward pass; pick a "
                            "module called once per example."
                        )
                    parts.append(seen[0].reshape(seen[0].shape[0], -1).cpu())
        finally:
            handle.remove()
        return torch.cat(parts)


class KMeansGradGrouper(_KMeansGrouper):
    """K-means on projected training-loss gradients under the task's current weights.

    Gradients are projected per layer (LoGra's factored projection, ``proj_dim`` features
    per layer, a perfect square), which is cheap next to a dense projection: the grouping
    costs about one forward/backward pass over the training set.

    Args:
        proj_dim: features per layer of the factored projection (a perfect square).
        **kw: ``batch_size`` as :class:`Grouper`; ``max_iter``, ``standardize`` and ``balanced`` of k-means.

    Example:
        >>> from datatrace import Task
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> KMeansGradGrouper(group_size=2, proj_dim=4).group(data, Task(torch.nn.Linear(3, 2).eval())).n_train
        8
    """

    grouper_id = "kmeans-grad"

    def __init__(self, group_size: int = 16, seed: int = 0, proj_dim: int = 64, **kw: Any):
        super().__init__(group_size, seed, **kw)
        root = math.isqrt(proj_dim) if isinstance(proj_dim, int) and proj_dim > 0 else 0
        if isinstance(proj_dim, bool) or root * root != proj_dim:
            raise ConfigError(f"proj_dim must be a perfect square >= 1; got {proj_dim!r}.")
        self.proj_dim = proj_dim

    def config(self) -> dict[str, Any]:
        return {**super().config(), "proj_dim": self.proj_dim}

    def _vectors(self, train: Any, task: Task | None) -> torch.Tensor:
        from datatrace.gradients import compute_per_sample_grads
        from datatrace.projection import make_projector

        task = self._need_task(task)
        projector = make_projector("factored", self.proj_dim, seed=self.seed)
        state = task.state()
        parts = [
            projector.project(compute_per_sample_grads(task, batch, state=state)).cpu()
            for batch in _batches(train, self.batch_size)
        ]
        return torch.cat(parts)
