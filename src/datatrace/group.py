"""Groups of training examples as attribution units, and the groupers that form them.

Generalized group data attribution (Ley et al., 2024, "Generalized Group Data Attribution")
attributes to groups of training points instead of single points: a group's gradient is the
gradient of its summed loss, so one group feature replaces ``|g|`` per-sample features in
projection, kernels, scoring and storage. The shared attribution loop consumes a
:class:`Grouping` (``groups=`` of every attributor); this module knows no method.

A :class:`Grouping` maps each training index to a group. Group ids are any non-negative
integers; they are relabelled internally to ``0..n_groups-1`` in ascending id order and the
original ids are the score's ``unit_ids``. Groupers (DESIGN.md §8 ids): ``random``,
``class-random`` (groups of one class each), ``kmeans-input``, ``kmeans-repr``,
``kmeans-grad`` and ``given``. Every grouper is deterministic for its seed and records the
seconds it took on the grouping it returns (the grouping cost is part of the bill).
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from datatrace.data import Batch, as_data, iter_batches, num_examples
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.task import Task

__all__ = [
    "GROUPERS",
    "ClassRandomGrouper",
    "GivenGrouper",
    "Grouper",
    "Grouping",
    "KMeansGradGrouper",
    "KMeansInputGrouper",
    "KMeansReprGrouper",
    "RandomGrouper",
    "balanced_kmeans",
    "kmeans",
    "make_grouper",
    "resolve_groups",
    "take_examples",
]


# ----------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class Grouping:
    """Which group each training example belongs to.

    Attributes:
        labels: ``(n_train,)`` int64 group index in ``[0, n_groups)`` of every example.
        ids: ``(n_groups,)`` the user-facing id of each group (a score's ``unit_ids``).
        method: the grouper id that produced it (``"given"`` for ids passed in).
        seconds: wall-clock seconds the grouper took (0 for given ids).
        config: the grouper's settings (JSON-able).

    Example:
        >>> g = Grouping.from_ids([5, 2, 5, 9])
        >>> g.n_groups, g.ids.tolist(), g.labels.tolist()
        (3, [2, 5, 9], [1, 0, 1, 2])
    """

    labels: torch.Tensor
    ids: torch.Tensor
    method: str = "given"
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lab, ids = self.labels, self.ids
        if lab.ndim != 1 or lab.dtype != torch.int64 or ids.ndim != 1:
            raise DataError(
                f"Grouping needs 1-D int64 labels and 1-D ids; got labels {lab.dtype} of shape "
                f"{tuple(lab.shape)} and ids of shape {tuple(ids.shape)}. Use Grouping.from_ids."
            )
        if lab.numel() == 0:
            raise DataError("a grouping of an empty training set is meaningless.")
        n = ids.numel()
        if int(lab.min()) < 0 or int(lab.max()) >= n:
            raise DataError(f"group labels must lie in [0, {n}); got [{lab.min()}, {lab.max()}].")
        empty = (torch.bincount(lab, minlength=n) == 0).nonzero().flatten()
        if empty.numel():
            raise DataError(
                f"groups {ids[empty[:5]].tolist()} are empty ({empty.numel()} in all); every "
                "group needs at least one training example."
            )

    @classmethod
    def from_ids(
        cls,
        group_ids: Sequence[int] | torch.Tensor,
        *,
        n_groups: int | None = None,
        method: str = "given",
        seconds: float = 0.0,
        config: Mapping[str, Any] | None = None,
    ) -> Grouping:
        """Build a grouping from one non-negative integer id per training example.

        Ids need not be contiguous: they are relabelled in ascending order and kept as
        :attr:`ids`. With ``n_groups`` the ids must be exactly ``0..n_groups-1``, each used at
        least once (an unused id is an empty group, refused).

        Args:
            group_ids: ``(n_train,)`` integer ids (list, tuple, NumPy array or tensor).
            n_groups: the declared number of groups, if any.
            method: the grouper id recorded on the grouping.
            seconds: grouping cost to record.
            config: grouper settings to record.
        """
        t = _as_id_tensor(group_ids)
        if n_groups is not None:
            if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
                raise DataError(f"n_groups must be an integer >= 1; got {n_groups!r}.")
            if n_groups > t.numel():
                raise DataError(
                    f"n_groups={n_groups} is larger than the {t.numel()} training examples; "
                    "some groups would be empty. Use at most one group per example."
                )
            if int(t.max()) >= n_groups:
                raise DataError(f"group ids must be < n_groups={n_groups}; got id {int(t.max())}.")
            ids = torch.arange(n_groups)
            labels = t
        else:
            ids, labels = torch.unique(t, sorted=True, return_inverse=True)
        return cls(labels.long(), ids.long(), method, float(seconds), dict(config or {}))

    @property
    def n_train(self) -> int:
        return int(self.labels.numel())

    @property
    def n_groups(self) -> int:
        return int(self.ids.numel())

    def sizes(self) -> torch.Tensor:
        """``(n_groups,)`` number of examples per group."""
        return torch.bincount(self.labels, minlength=self.n_groups)

    def members(self, group: int) -> torch.Tensor:
        """Training indices of group index ``group`` (not its id), ascending."""
        return (self.labels == group).nonzero().flatten()

    def sum_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(n_groups, ...)`` sums of the rows of ``x`` (``(n_train, ...)``) per group."""
        self._check_rows(x)
        out = x.new_zeros(self.n_groups, *x.shape[1:])
        return out.index_add_(0, self.labels.to(x.device), x)

    def mean_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(n_groups, ...)`` means of the rows of ``x`` per group."""
        sizes = self.sizes().to(device=x.device, dtype=x.dtype)
        return self.sum_rows(x) / sizes.view(-1, *([1] * (x.ndim - 1)))

    def _check_rows(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.n_train:
            raise DataError(
                f"expected {self.n_train} rows (one per training example); got {x.shape[0]}."
            )

    def fingerprint(self) -> str:
        """Stable hash of the labels and ids (for store manifests)."""
        h = hashlib.sha256()
        for t in (self.labels, self.ids):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (method, settings, sizes, fingerprint, cost)."""
        sizes = self.sizes()
        return {
            "method": self.method,
            "config": dict(self.config),
            "n_groups": self.n_groups,
            "n_train": self.n_train,
            "size_min": int(sizes.min()),
            "size_max": int(sizes.max()),
            "fingerprint": self.fingerprint(),
        }

    def chunks(
        self, batch_size: int, forward_size: int | None = None
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """Whole groups packed into chunks of at most ``batch_size`` examples.

        Yields ``(first_group, stop_group, batches)``: groups ``first_group:stop_group`` and
        the training indices of their examples in group order, in batches of at most
        ``forward_size`` examples (default ``batch_size``) that hold whole groups; only a
        group larger than ``forward_size`` is cut, into batches of its own (a group larger
        than ``batch_size`` is also alone in its chunk), and the loop adds up its partial
        group features.
        """
        forward_size = batch_size if forward_size is None else forward_size
        order = torch.argsort(self.labels, stable=True)
        sizes = self.sizes().tolist()

        def batches(first: int, stop: int, offset: int) -> list[torch.Tensor]:
            out, lo, count = [], offset, 0
            for size in sizes[first:stop]:
                if count and count + size > forward_size:
                    out.append(order[lo : lo + count])
                    lo, count = lo + count, 0
                if size > forward_size:  # cut alone into forward_size pieces
                    out.extend(torch.split(order[lo : lo + size], forward_size))
                    lo += size
                else:
                    count += size
            if count:
                out.append(order[lo : lo + count])
            return out

        start_group, start_ex, count = 0, 0, 0
        for gi, size in enumerate(sizes):
            if count and count + size > batch_size:
                yield start_group, gi, batches(start_group, gi, start_ex)
                start_group, start_ex, count = gi, start_ex + count, 0
            count += size
        yield start_group, len(sizes), batches(start_group, len(sizes), start_ex)


def _as_id_tensor(group_ids: Any) -> torch.Tensor:
    try:
        t = torch.as_tensor(group_ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"group ids must be a sequence of non-negative integers; got {type(group_ids).__name__}."
        ) from exc
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise DataError(f"group ids must be integers; got dtype {t.dtype}.")
    if t.ndim != 1 or t.numel() == 0:
        raise DataError(f"group ids must be a non-empty 1-D sequence; got shape {tuple(t.shape)}.")
    t = t.long().cpu()
    if int(t.min()) < 0:
        bad = t[t < 0][:5].tolist()
        raise DataError(f"group ids must be >= 0; got negative ids {bad}.")
    return t


# ----------------------------------------------------------------------------- data access
def take_examples(data: Any, indices: torch.Tensor) -> Batch:
    """The examples ``indices`` of ``data`` as one batch, in that order.

    Works for the data forms :func:`datatrace.data.iter_batches` accepts: a tensor, a
    tuple/list or dict of tensors, a map-style ``Dataset`` or a ``DataLoader`` over one
    (its dataset is indexed and collated with the default collate function).
    """
    data = as_data(data)
    if isinstance(data, torch.Tensor):
        return (data[indices.to(data.device)],)
    if isinstance(data, Mapping):
        return {k: v[indices.to(v.device)] for k, v in data.items()}
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(t[indices.to(t.device)] for t in data)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(data, DataLoader) and data.collate_fn is not default_collate:
        collate = data.collate_fn
    else:
        collate = default_collate
    if not isinstance(dataset, Dataset):
        raise DataError(
            f"cannot index data of type {type(data).__name__} by example; pass tensors, a dict "
            "of tensors, a map-style Dataset or a DataLoader over one."
        )
    return collate([dataset[int(i)] for i in indices])


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


def _inputs_of(task: Task, train: Any, batch_size: int) -> torch.Tensor:
    parts = []
    for batch in _batches(train, batch_size):
        split = task.split_batch(batch)
        leaves = [t for t in (*split.args, *split.kwargs.values()) if isinstance(t, torch.Tensor)]
        if not leaves:
            raise DataError("kmeans-input found no input tensor in the batches.")
        parts.append(leaves[0].reshape(leaves[0].shape[0], -1).double().cpu())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- k-means
def _sq_dists(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` squared distances; ``xx`` is ``(x * x).sum(1, keepdim=True)``."""
    return torch.addmm(xx + (c * c).sum(1), x, c.T, alpha=-2).clamp_min_(0)


def kmeans(
    x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100, tol: float = 1e-6
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii, 2007); labels ``(n,)``.

    Distances are computed in float32 as ``||x||² - 2 x·c + ||c||²`` (one matrix product per
    iteration; float64 and explicit differences made seeding 1,250 centres on 20,000 points
    take 40 s). Deterministic for ``seed`` (a CPU generator picks the seeds). An empty cluster is
    re-seeded with the point farthest from its centre; clusters still empty at the end are
    dropped, so labels are ``0..k'-1`` with ``k' <= k``, all non-empty.

    Args:
        x: ``(n, d)`` points.
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of the k-means++ draws.
        max_iter: Lloyd iterations at most.
        tol: stop when the inertia improves by less than this fraction.

    Example:
        >>> x = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 10.0)])
        >>> kmeans(x, 2, seed=0).bincount().tolist()
        [5, 5]
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"kmeans needs (n, d) points with n >= 1; got {tuple(x.shape)}.")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k must be an integer in [1, {n}] (the number of points); got {k!r}.")
    x = x.float()
    xx = (x * x).sum(1, keepdim=True)
    gen = _generator("kmeans", seed)
    centres = x.new_empty(k, x.shape[1])
    centres[0] = x[int(torch.randint(n, (1,), generator=gen))]
    closest = _sq_dists(x, centres[:1], xx).squeeze(1)
    for j in range(1, k):
        total = float(closest.sum())
        if total > 0:
            pick = int(torch.multinomial((closest / total).float().cpu(), 1, generator=gen))
        else:  # fewer distinct points than clusters: any point
            pick = int(torch.randint(n, (1,), generator=gen))
        centres[j] = x[pick]
        # ||x - c||² as xx - 2 x·c + cc: one matrix-vector product, no (n, d) temporary
        # (the explicit difference cost 40 s of seeding 1,250 centres on 20,000 points)
        c = centres[j]
        dist = torch.addmv(xx.squeeze(1) + c @ c, x, c, alpha=-2).clamp_min_(0)
        dist[pick] = 0.0
        torch.minimum(closest, dist, out=closest)
    previous = math.inf
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(max_iter):
        d = _sq_dists(x, centres, xx)
        dist, labels = d.min(1)
        inertia = float(dist.sum())
        counts = torch.bincount(labels, minlength=k)
        sums = x.new_zeros(k, x.shape[1]).index_add_(0, labels, x)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        for j in (~nonempty).nonzero().flatten().tolist():
            far = int(dist.argmax())
            centres[j] = x[far]
            dist[far] = 0
        if previous - inertia <= tol * max(previous, 1e-300) and bool(nonempty.all()):
            break
        previous = inertia
    labels = _sq_dists(x, centres, xx).argmin(1)
    return torch.unique(labels, return_inverse=True)[1]


def _capacity_assign(d: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign points to clusters, nearest pairs first, at most ``capacity`` points a cluster.

    ``d`` is ``(n, k)`` squared distances with ``k * capacity >= n``. Greedy over the pairs
    sorted by distance (each point's ``min(k, 32)`` nearest clusters); points whose
    candidates all fill up take the nearest cluster with room left.
    """
    n, k = d.shape
    m = min(k, 32)
    dist, cand = d.topk(m, dim=1, largest=False)
    order = dist.flatten().argsort(stable=True)
    points = torch.arange(n).repeat_interleave(m)[order].tolist()
    clusters = cand.flatten()[order].tolist()
    labels = [-1] * n
    room = [capacity] * k
    for i, c in zip(points, clusters):
        if labels[i] < 0 and room[c] > 0:
            labels[i] = c
            room[c] -= 1
    out = torch.tensor(labels, dtype=torch.long)
    full = torch.tensor([r == 0 for r in room])  # kept up to date, not rebuilt per point
    for i in (out < 0).nonzero().flatten().tolist():
        c = int(d[i].masked_fill(full, math.inf).argmin())
        out[i] = c
        room[c] -= 1
        if room[c] == 0:
            full[c] = True
    return out


def balanced_kmeans(
    x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100, refine: int = 10
) -> torch.Tensor:
    """K-means whose clusters hold at most ``ceil(n / k)`` points each; labels ``(n,)``.

    Lloyd's k-means (:func:`kmeans`) places the centres; points are then assigned nearest
    pairs first under the capacity, and centres and capacity-constrained assignments
    alternate ``refine`` times (stopping early when nothing moves). Plain k-means on
    gradients or representations tends to put most well-fitted examples in one giant
    cluster (digits MLP, "size 16": clusters of 1 to ~1,270 of 1,437 points); balanced
    clusters keep every group near the requested size.

    Example:
        >>> x = torch.cat([torch.zeros(6, 2), torch.full((2, 2), 10.0)])
        >>> balanced_kmeans(x, 2, seed=0).bincount().tolist()
        [4, 4]
    """
    labels = kmeans(x, k, seed=seed, max_iter=max_iter)
    x = x.float()
    n, k = x.shape[0], int(labels.max()) + 1
    capacity = -(-n // k)
    xx = (x * x).sum(1, keepdim=True)
    for _ in range(refine):
        counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x.dtype)
        centres = x.new_zeros(k, x.shape[1]).index_add_(0, labels, x) / counts[:, None]
        new = _capacity_assign(_sq_dists(x, centres, xx), capacity)
        if torch.equal(new, labels):
            break
        labels = new
    return torch.unique(labels, return_inverse=True)[1]


# ----------------------------------------------------------------------------- groupers
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
        for name, value in (("group_size", group_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0; got {seed!r}.")
        self.group_size, self.seed, self.batch_size = group_size, seed, batch_size

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


def _generator(kind: str, seed: int) -> torch.Generator:
    """A CPU generator for ``(kind, seed)``: salted, so ``seed=0`` here draws another stream
    than ``torch.Generator().manual_seed(0)`` elsewhere (label flips, subset sampling), which
    would otherwise line random groups up with, e.g., the flipped examples."""
    digest = hashlib.blake2b(repr(("datatrace.group", kind, int(seed))).encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


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
        perm = torch.randperm(n, generator=_generator(self.grouper_id, self.seed))
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
        gen = _generator(self.grouper_id, self.seed)
        ids = torch.empty_like(labels)
        offset = 0
        for c in torch.unique(labels, sorted=True).tolist():
            idx = (labels == c).nonzero().flatten()
            k = -(-idx.numel() // self.group_size)
            perm = torch.randperm(idx.numel(), generator=gen)
            ids[idx] = offset + _balanced(perm, k)
            offset += k
        return ids


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
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1; got {max_iter!r}.")
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
