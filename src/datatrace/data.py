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

__all__ = ["Batch", "batch_size_of", "iter_batches", "num_examples"]

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


def batch_size_of(batch: Batch) -> int:
    """Leading dimension of a batch."""
    if isinstance(batch, Mapping):
        return _leading_dim(list(batch.values()), "dict")
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return _leading_dim(list(batch), "tuple")
