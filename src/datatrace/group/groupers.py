"""The grouper base class and the groupers that need no clustering: ``random``,
``class-random`` and ``given`` (DESIGN.md §8 ids).

Every grouper is deterministic for its seed and records the seconds it took on the grouping it
returns (the grouping cost is part of the bill).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from datatrace._checks import check_int
from datatrace._seeds import group_generator
from datatrace.data import Batch, iter_batches, num_examples
from datatrace.errors import ConfigError, DataError
from datatrace.group.grouping import Grouping, _as_id_tensor
from datatrace.task import Task

__all__ = ["ClassRandomGrouper", "GivenGrouper", "Grouper", "RandomGrouper"]


class Grouper(ABC):
    """Base of all groupers: :meth:`group` maps a training set to a :class:`Grouping`.

    Subclasses set ``grouper_id`` and implement :meth:`_group_ids`; the base class times the
    call, so the grouping carries its own cost.

    Args:
        group_size: the (mean) number of examples per group; ``n_groups = ceil(n / size)``.
        seed: seed of every random choice.
        batch_size: batch size for passes over the data (representations, gradients).
    """

    grouper_id: ClassVar[str] = ""

    def __init__(self, group_size: int = 16, seed: int = 0, batch_size: int = 256) -> None:
        self.group_size = check_int("group_size", group_size, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)

    def config(self) -> dict[str, Any]:
        """JSON-able settings (recorded on the grouping and in store manifests)."""
        return {"group_size": self.group_size, "seed": self.seed}

    def n_groups(self, n_train: int) -> int:
        return -(-n_train // self.group_size)

    def group(self, train: Any, task: Task | None = None) -> Grouping:
        """Group ``train`` (any data form the attributors accept); timed."""
        start = time.perf_counter()
        ids = self._group_ids(train, task)
        seconds = time.perf_counter() - start
        return Grouping.from_ids(ids, method=self.grouper_id, seconds=seconds, config=self.config())

    @abstractmethod
    def _group_ids(self, train: Any, task: Task | None) -> torch.Tensor:
        """``(n_train,)`` non-negative group ids."""

    def _need_task(self, task: Task | None) -> Task:
        if task is None:
            raise ConfigError(f"the {self.grouper_id!r} grouper needs the task; pass task=.")
        return task

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({settings})"


def _batches(train: Any, batch_size: int) -> Iterator[Batch]:
    return iter_batches(train, batch_size)


def _labels_of(task: Task, train: Any, batch_size: int) -> torch.Tensor:
    parts = []
    for batch in _batches(train, batch_size):
        labels = task.split_batch(batch).labels
        if labels is None or labels.ndim != 1 or labels.is_floating_point():
            raise DataError(
                "class-random grouping needs one integer class label per example; this task's "
                "labels are missing or not 1-D integers."
            )
        parts.append(labels.cpu())
    return torch.cat(parts)


def _balanced(perm: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Ids for a permutation: consecutive runs of near-equal size (sizes differ by <= 1)."""
    ids = torch.empty_like(perm)
    ids[perm] = torch.arange(perm.numel()) * n_groups // perm.numel()
    return ids


class RandomGrouper(Grouper):
    """Uniformly random groups of ``group_size`` (sizes differ by at most one).

    Example:
        >>> g = RandomGrouper(group_size=4, seed=0).group(torch.zeros(10, 3))
        >>> g.n_groups, sorted(g.sizes().tolist())
        (3, [3, 3, 4])
    """

    grouper_id = "random"

    def _group_ids(self, train: Any, task: Task | None) -> torch.Tensor:
        n = num_examples(train)
        if self.group_size > n:
            raise DataError(f"group_size={self.group_size} exceeds the {n} training examples.")
        perm = torch.randperm(n, generator=group_generator(self.grouper_id, self.seed))
        return _balanced(perm, self.n_groups(n))


class ClassRandomGrouper(Grouper):
    """Class-pure random groups: each class is shuffled and cut into groups of ``group_size``.

    Every group holds examples of one class only; each class gets ``ceil(n_c / group_size)``
    groups of near-equal size, so classes are represented in proportion to their size.

    Example:
        >>> from datatrace import Task
        >>> x, y = torch.randn(12, 2), torch.tensor([0, 1] * 6)
        >>> g = ClassRandomGrouper(group_size=3).group((x, y), Task(torch.nn.Linear(2, 2).eval()))
        >>> all(len(set(y[g.labels == j].tolist())) == 1 for j in range(g.n_groups))
        True
    """

    grouper_id = "class-random"

    def _group_ids(self, train: Any, task: Task | None) -> torch.Tensor:
        labels = _labels_of(self._need_task(task), train, self.batch_size)
        gen = group_generator(self.grouper_id, self.seed)
        ids = torch.empty_like(labels)
        offset = 0
        for c in torch.unique(labels, sorted=True).tolist():
            idx = (labels == c).nonzero().flatten()
            k = -(-idx.numel() // self.group_size)
            perm = torch.randperm(idx.numel(), generator=gen)
            ids[idx] = offset + _balanced(perm, k)
            offset += k
        return ids


class GivenGrouper(Grouper):
    """User-given groups: ids per example, a dict column, or a callable on batches.

    Args:
        source: a sequence/tensor of ``n_train`` non-negative ids; a key of dict-shaped
            training data; or a callable ``batch -> (B,) ids`` applied to the training
            batches in order.
        batch_size: batch size when ``source`` is a callable.

    Example:
        >>> GivenGrouper([0, 0, 1]).group(torch.zeros(3, 2)).sizes().tolist()
        [2, 1]
    """

    grouper_id = "given"

    def __init__(self, source: Any, batch_size: int = 256) -> None:
        super().__init__(1, 0, batch_size)
        if not (isinstance(source, str) or callable(source)):
            source = _as_id_tensor(source)
        self.source = source

    def config(self) -> dict[str, Any]:
        if isinstance(self.source, str):
            return {"column": self.source}
        return (
            {"callable": getattr(self.source, "__name__", "callable")}
            if callable(self.source)
            else {}
        )

    def _group_ids(self, train: Any, task: Task | None) -> torch.Tensor:
        from datatrace.group.spec import GROUPERS

        src = self.source
        if isinstance(src, torch.Tensor):
            return src
        if isinstance(src, str):
            if not isinstance(train, Mapping) or src not in train:
                keys = sorted(train) if isinstance(train, Mapping) else None
                raise DataError(
                    f"groups={src!r} names a column, but the training data "
                    + (f"has keys {keys}" if keys is not None else "is not a dict of tensors")
                    + f"; grouper ids are {sorted(GROUPERS)}."
                )
            return _as_id_tensor(train[src])
        parts = []
        for batch in _batches(train, self.batch_size):
            out = _as_id_tensor(src(batch))
            parts.append(out)
        return torch.cat(parts)
