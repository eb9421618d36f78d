"""Turning what users pass as data into ordered batches.

Accepted: a ``DataLoader`` that does not shuffle, a map-style dataset (a torch ``Dataset``, a
Hugging Face ``datasets.Dataset``, or any object with ``__len__`` and ``__getitem__`` whose
rows the default collate function batches), a tuple/list of tensors sharing their first
dimension, or a dict of such tensors (HF-style batches). Attribution is about *which*
example, so the order must be fixed: shuffled loaders and iterable datasets are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset
from torch.utils.data._utils.collate import default_collate

from datatrace.errors import DataError

__all__ = [
    "Batch",
    "as_data",
    "batch_size_of",
    "count_or_none",
    "iter_batch_range",
    "iter_batches",
    "num_batches",
    "num_examples",
    "subset_examples",
    "take_examples",
]

Batch = Any  # a tuple/list of tensors or a dict of tensors


_ACCEPTED = (
    "pass a DataLoader (shuffle=False), a map-style dataset (a torch Dataset, a Hugging Face "
    "datasets.Dataset, or any object with __len__ and __getitem__), a tuple of tensors "
    "(inputs..., labels) or a dict of tensors."
)


class MapDataset(Dataset):
    """A duck-typed map-style dataset (e.g. a Hugging Face ``datasets.Dataset``) as a torch one.

    Rows are read with ``data[i]`` (``data.__getitems__(indices)`` where the object has it,
    as ``datasets.Dataset`` does) and batched by the default collate function.
    """

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        getitems = getattr(self.data, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [self.data[i] for i in indices]


def _is_hf_dataset(data: Any) -> bool:
    """A Hugging Face ``datasets.Dataset`` (duck-typed: no import of ``datasets``)."""
    return all(hasattr(data, a) for a in ("with_format", "column_names", "format", "__len__"))


def _as_torch_format(data: Any) -> Any:
    """``data`` with its rows as tensors (its column selection kept); str columns refused."""
    fmt = data.format
    if fmt.get("type") != "torch":
        data = data.with_format(
            "torch",
            columns=fmt.get("columns"),
            output_all_columns=fmt.get("output_all_columns", False),
        )
    if len(data):
        row = data[0]
        bad = [k for k, v in row.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DataError(
                f"column(s) {bad} of the datasets.Dataset hold {type(row[bad[0]]).__name__} "
                "values, which cannot be batched into tensors for the model; drop them with "
                f"dataset.remove_columns({bad}) (tokenize text columns first)."
            )
    return data


def as_data(data: Any) -> Any:
    """``data`` in a form the rest of datatrace batches directly.

    A Hugging Face ``datasets.Dataset`` (rows converted to tensors) or another duck-typed
    map-style dataset is wrapped in a torch :class:`MapDataset`; every other accepted form is
    returned as is. Raises ``DataError`` for data that cannot be indexed by example.

    Example:
        >>> class Rows:  # any object with __len__ and __getitem__
        ...     def __len__(self):
        ...         return 3
        ...     def __getitem__(self, i):
        ...         return {"x": torch.full((2,), float(i)), "labels": torch.tensor(i)}
        >>> next(iter_batches(as_data(Rows()), 2))["x"]
        tensor([[0., 0.],
                [1., 1.]])
    """
    if isinstance(data, (DataLoader, Dataset, torch.Tensor, Mapping, tuple, list)):
        return data
    if _is_hf_dataset(data):
        return MapDataset(_as_torch_format(data))
    kind = type(data)
    if type(data).__module__.split(".")[0] == "numpy":
        raise DataError(
            f"cannot use a numpy {kind.__name__} as data; convert it with torch.from_numpy(x) "
            "and pass a tuple of tensors (inputs..., labels)."
        )
    if hasattr(kind, "__len__") and hasattr(kind, "__getitem__") and kind not in (str, bytes):
        return MapDataset(data)
    if hasattr(kind, "__iter__"):
        raise DataError(
            f"cannot use data of type {kind.__name__}: it is iterable but has no len() or "
            "indexing, so training examples have no fixed index (a streaming or iterable "
            f"dataset); {_ACCEPTED}"
        )
    raise DataError(f"cannot use data of type {kind.__name__}; {_ACCEPTED}")


def num_examples(data: Any) -> int:
    """Number of examples in ``data`` (raises ``DataError`` when it cannot be known)."""
    data = as_data(data)
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
            raise DataError(
                f"the {type(data).__name__} has no len(), so its examples have no fixed index "
                "(an IterableDataset); pass a map-style dataset (with __len__ and __getitem__)."
            ) from exc
    raise DataError(f"cannot use data of type {type(data).__name__}; {_ACCEPTED}")


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
    covered = sum(len(b) for b in loader.batch_sampler)
    n = len(loader.dataset)  # type: ignore[arg-type]
    if covered != n:
        raise DataError(
            f"the DataLoader's batches cover {covered} of its dataset's {n} examples"
            + (" (drop_last=True)" if loader.drop_last else "")
            + "; every training example must be attributed. Build it with drop_last=False "
            "(or pass the Dataset itself and set batch_size=)."
        )


def iter_batches(data: Any, batch_size: int) -> Iterator[Batch]:
    """Yield batches of ``data`` in a fixed order; every example appears exactly once."""
    data = as_data(data)
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
    data = as_data(data)
    if isinstance(data, DataLoader):
        _check_loader(data)
        assert data.batch_sampler is not None  # checked by _check_loader
        return len(data.batch_sampler)  # type: ignore[arg-type]
    return -(-num_examples(data) // batch_size)


def count_or_none(count: Callable[..., int], data: Any, *args: Any) -> int | None:
    """``count(data, *args)`` (:func:`num_examples`, :func:`num_batches`), or None where the
    data cannot be counted (for a progress bar's total: the batching itself then says what
    is wrong with the data)."""
    try:
        return count(data, *args)
    except DataError:
        return None


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
    data = as_data(data)
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


def subset_examples(data: Any, indices: torch.Tensor, batch_size: int) -> Any:
    """The examples ``indices`` of ``data``, in that order, as data a pass reads (e.g.
    K-FAC's curvature passes on a subset).

    Tensors are indexed (a copy of the subset); a dataset, or a loader's dataset, is wrapped
    in a :class:`~torch.utils.data.Subset`, so only the subset's examples are ever loaded.
    """
    data = as_data(data)
    rows = indices.tolist()
    if isinstance(data, DataLoader):
        return DataLoader(
            Subset(data.dataset, rows),
            batch_size=data.batch_size or batch_size,
            shuffle=False,
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
        )
    if isinstance(data, Dataset):
        return Subset(data, rows)
    return take_examples(data, indices)
