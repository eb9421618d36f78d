"""A :class:`Grouping`: which group each training example belongs to (the attribution units).

Group ids are any non-negative integers; they are relabelled internally to
``0..n_groups-1`` in ascending id order and the original ids are the score's ``unit_ids``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from datatrace._checks import check_int
from datatrace.errors import DataError

__all__ = ["Grouping"]


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
            check_int("n_groups", n_groups, 1, DataError)
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
