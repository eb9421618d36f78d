"""Turning what users pass as data into ordered batches.

Accepted: a ``DataLoader`` that does not shuffle, a map-style ``Dataset``, a tuple/list of
tensors sharing their first dimension, or a dict of such tensors (HF-style batches).
Attribution is about *which* example, so the order must be fixed: shuffled loaders are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from datatrace.errors import DataError

__all__ = [
    "Batch",
    "batch_size_of",
    "iter_batch_range",
    "iter_batches",
    "num_batches",
    "num_examples",
]

Batch = Any  # a tuple/list of tensors or a dict of tensors


def num_examples(data: Any) -> int:
    """Number of examples in ``data`` (raises ``DataError`` when it cannot be known)."""
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise DataError(
                "the DataLoader's dataset has no len(); datatrace needs map-style datasets "
                "so that every training example has a fixed index."
            ) from exc
    if isinstance(data, Mapping):
        return _leading_dim(list(data.values()), "dict")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return _leading_dim(list(data), "tuple")
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    if isinstance(data, Dataset):
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError as exc:
            raise DataError("the Dataset has no len(); pass a map-style dataset.") from exc
    raise DataError(
        f"cannot use data of type {type(data).__name__}; pass a DataLoader (shuffle=False), a "
        "Dataset, a tuple of tensors (inputs..., labels) or a dict of tensors."
    )


def _leading_dim(tensors: Sequence[Any], kind: str) -> int:
    if not tensors:
        raise DataError(f"the {kind} of tensors is empty; pass at least inputs and labels.")
    sizes = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"every entry of a {kind} of data must be a tensor; got {type(t).__name__}."
            )
        if t.ndim == 0:
            raise DataError(
                f"data tensors need a leading example dimension; got a scalar in the {kind}."
            )
        sizes.add(int(t.shape[0]))
    if len(sizes) != 1:
        raise DataError(
            f"the tensors of the {kind} have different lengths {sorted(sizes)}; they must agree."
        )
    return sizes.pop()


def _check_loader(loader: DataLoader) -> None:
    if not isinstance(loader.sampler, SequentialSampler) or loader.batch_sampler is None:
        raise DataError(
            f"the DataLoader uses {type(loader.sampler).__name__}, so example order changes between "
            "passes and scores could not be matched to training indices; build it with "
            "shuffle=False (or pass the Dataset itself and set batch_size=)."
        )


def iter_batches(data: Any, batch_size: int) -> Iterator[Batch]:
    """Yield batches of ``data`` in a fixed order; every example appears exactly once."""
    n = num_examples(data)
    if n == 0:
        raise DataError("the dataset is empty; attribution needs at least one example.")
    if isinstance(data, DataLoader):
        _check_loader(data)
        yield from data
        return
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, Mapping):
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in data.items()}
        return
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        for start in range(0, n, batch_size):
            yield tuple(t[start : start + batch_size] for t in data)
        return
    yield from DataLoader(data, batch_size=batch_size, shuffle=False)


def num_batches(data: Any, batch_size: int) -> int:
    """Number of batches :func:`iter_batches` yields for ``data``."""
    if isinstance(data, DataLoader):
        _check_loader(data)
        assert data.batch_sampler is not None  # checked by _check_loader
        return len(data.batch_sampler)  # type: ignore[arg-type]
    return -(-num_examples(data) // batch_size)


def iter_batch_range(
    data: Any, batch_size: int, start: int, stop: int
) -> Iterator[tuple[int, Batch]]:
    """``(offset, batch)`` for batches ``start .. stop - 1`` of ``iter_batches(data, batch_size)``.

    ``offset`` is the index of the batch's first example in ``data``. The batches are the
    ones :func:`iter_batches` yields (same boundaries, same contents), but those outside the
    range are not loaded: a rank of a distributed job reads only its own slice.

    Example:
        >>> data = (torch.arange(10.0),)
        >>> [(o, b[0].tolist()) for o, b in iter_batch_range(data, 4, 1, 3)]
        [(4, [4.0, 5.0, 6.0, 7.0]), (8, [8.0, 9.0])]
    """
    n, total = num_examples(data), num_batches(data, batch_size)
    start, stop = max(0, start), min(stop, total)
    if start >= stop:
        return
    if isinstance(data, DataLoader):
        index_batches = [list(b) for b in data.batch_sampler]  # type: ignore[union-attr]
        offset = sum(len(b) for b in index_batches[:start])
        loader: Any = data
        if (start, stop) != (0, total):
            loader = DataLoader(
                data.dataset,
                batch_sampler=index_batches[start:stop],
                collate_fn=data.collate_fn,
                num_workers=data.num_workers,
                pin_memory=data.pin_memory,
                timeout=data.timeout,
                worker_init_fn=data.worker_init_fn,
            )
        for idx, batch in zip(index_batches[start:stop], loader):
            yield offset, batch
            offset += len(idx)
        return
    if isinstance(data, torch.Tensor):
        data = (data,)
    bounds = [(b * batch_size, min(n, (b + 1) * batch_size)) for b in range(start, stop)]
    if isinstance(data, Mapping):
        for lo, hi in bounds:
            yield lo, {k: v[lo:hi] for k, v in data.items()}
    elif isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        for lo, hi in bounds:
            yield lo, tuple(t[lo:hi] for t in data)
    else:  # a map-style Dataset, batched as iter_batches does (default collate)
        sampler = [list(range(lo, hi)) for lo, hi in bounds]
        for (lo, _), batch in zip(bounds, DataLoader(data, batch_sampler=sampler)):
            yield lo, batch


def batch_size_of(batch: Batch) -> int:
    """Leading dimension of a batch."""
    if isinstance(batch, Mapping):
        return _leading_dim(list(batch.values()), "dict")
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return _leading_dim(list(batch), "tuple")
