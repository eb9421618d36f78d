"""torch.distributed helpers: the same ``fit``/``attribute`` code under ``torchrun`` (DESIGN.md §6).

datatrace never starts processes. The user launches with ``torchrun`` and calls
``torch.distributed.init_process_group`` (``"gloo"`` on CPU, ``"nccl"`` on GPU, after
``torch.cuda.set_device``); datatrace only detects an initialised default group. Without
one, or with a single process, every helper here is the identity and :func:`rank` /
:func:`world_size` are 0 / 1, so single-process code pays nothing.

Work is split by contiguous ranges (:func:`split_range`): rank ``r`` of ``w`` takes the
``r``-th of ``w`` nearly equal slices of the training set's *batches* (shards), keeping their
global indices. Statistics are all-reduced in float64, row blocks of differing lengths are
all-gathered in rank order (any dtype, moved as raw bytes), and errors raised on one rank
inside :func:`run_collectively` are raised on every rank instead of leaving the others
waiting in the next collective.

Every function that communicates is a collective: all ranks must call it, in the same order.

Example:
    >>> split_range(10, parts=3, index=0), split_range(10, parts=3, index=2)
    ((0, 4), (7, 10))
    >>> rank(), world_size()  # no process group initialised
    (0, 1)
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from datatrace import errors
from datatrace.data import iter_batches, num_examples
from datatrace.errors import ConfigError, DataError, DatatraceError, StoreError
from datatrace.scores import TopK, streaming_topk
from datatrace.store import Store, fingerprint_batch

__all__ = [
    "all_gather_blocks",
    "all_gather_object",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_same",
    "check_same_queries",
    "gather_score_blocks",
    "is_distributed",
    "local_range",
    "merge_topk",
    "open_store",
    "rank",
    "run_collectively",
    "split_range",
    "sync_store",
    "topk_blocks",
    "world_size",
]

T = TypeVar("T")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without an initialised group)."""
    return dist.get_rank() if _initialised() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without an initialised group)."""
    return dist.get_world_size() if _initialised() else 1


def is_distributed() -> bool:
    """Whether an initialised default group has more than one process."""
    return world_size() > 1


def split_range(n: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """``[lo, hi)`` of slice ``index`` when ``range(n)`` is cut into ``parts`` contiguous slices.

    Slices differ in length by at most one, the longer ones first, so rank 0 always gets work
    when ``n >= 1``; a rank beyond ``n`` gets an empty slice. Defaults: this process's rank and
    the world size.

    Raises:
        ConfigError: a negative ``n``, ``parts < 1`` or ``index`` outside ``[0, parts)``.
    """
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"split_range needs an integer n >= 0; got {n!r}.")
    if not isinstance(parts, int) or parts < 1 or not 0 <= index < parts:
        raise ConfigError(
            f"split_range needs parts >= 1 and 0 <= index < parts; got parts={parts!r}, "
            f"index={index!r}."
        )
    size, extra = divmod(n, parts)
    lo = index * size + min(index, extra)
    return lo, lo + size + (index < extra)


def local_range(n: int) -> tuple[int, int]:
    """This rank's contiguous ``[lo, hi)`` of ``range(n)`` (all of it in a single process)."""
    return split_range(n)


# ----------------------------------------------------------------------------- primitives
def _comm_device() -> torch.device:
    """Where tensors must live for the default group's backend (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process).

    For small metadata only (sizes, error messages, digests): it pickles.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (small metadata only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums over ranks of ``tensors``, returned in their dtypes and devices.

    The sums are taken in float64 (one flat buffer, one collective), so accumulated
    statistics (covariances, counts) lose nothing to the reduction. Every rank must pass
    tensors of the same shapes in the same order.

    Example:
        >>> all_reduce_sum([torch.ones(2), torch.zeros(1)])  # single process: unchanged
        [tensor([1., 1.]), tensor([0.])]
    """
    if not is_distributed():
        return list(tensors)
    if not tensors:
        return []
    device = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos : pos + t.numel()].reshape(t.shape).to(t.device, t.dtype))
        pos += t.numel()
    return out


def all_gather_rows(t: torch.Tensor | None) -> torch.Tensor:
    """Rows of every rank's ``t`` concatenated in rank order; ranks may hold different counts.

    ``None`` stands for zero rows (e.g. a rank with no shards): its trailing shape and dtype
    are taken from the other ranks. The bytes travel unchanged, so any dtype (bfloat16,
    bool, int64) gathers exactly. The result is on ``t``'s device (the backend's device for
    a ``None`` rank).

    Raises:
        DataError: the ranks' trailing shapes or dtypes differ, or every rank passed None.
    """
    if not is_distributed():
        if t is None:
            raise DataError("all_gather_rows got None in a single process; pass a tensor.")
        return t
    meta = all_gather_object(
        None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))
    )
    present = [m for m in meta if m is not None]
    if not present:
        raise DataError("all_gather_rows: every rank passed None; at least one needs rows.")
    kinds = {(m[0][1:], m[1]) for m in present}
    if len(kinds) != 1:
        raise DataError(
            f"all_gather_rows needs the same trailing shape and dtype on every rank; got "
            f"{[None if m is None else (m[0], m[1]) for m in meta]} by rank. Pass tensors of "
            "one kind."
        )
    trailing, dtype_name = kinds.pop()
    dtype = getattr(torch, dtype_name)
    shapes = [(0, *trailing) if m is None else m[0] for m in meta]
    device = _comm_device()
    width = torch.empty((), dtype=dtype).element_size()
    sizes = [int(torch.Size(s).numel()) * width for s in shapes]
    longest = max(max(sizes), 1)
    local = torch.zeros(longest, dtype=torch.uint8, device=device)
    if t is not None and t.numel():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        local[: raw.numel()] = raw.to(device)
    buffers = [torch.empty_like(local) for _ in shapes]
    dist.all_gather(buffers, local)
    parts = [
        buf[:size].view(dtype).reshape(shape) for buf, size, shape in zip(buffers, sizes, shapes)
    ]
    return torch.cat(parts, 0).to(device if t is None else t.device)


def all_gather_blocks(blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's list of row blocks, joined in rank order, each block kept as it was.

    The in-memory train features of a distributed fit: rank ``r`` featurized a contiguous
    slice of the batches; afterwards every rank holds every batch's block, in global order
    and with the same block boundaries as a single-process fit (so sums over blocks round
    alike).
    """
    if not is_distributed():
        return list(blocks)
    counts = all_gather_object([int(b.shape[0]) for b in blocks])
    rows = all_gather_rows(torch.cat(list(blocks), 0) if blocks else None)
    return list(torch.split(rows, [c for per_rank in counts for c in per_rank], 0))


def check_same(value: Any, what: str, fix: str) -> None:
    """Raise ``DataError`` on every rank unless all ranks passed an equal ``value``.

    Args:
        value: a small picklable description (a size, a digest).
        what: what it describes, for the message (e.g. ``"the queries"``).
        fix: how to make the ranks agree.
    """
    values = all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        raise DataError(
            f"{what} differ between ranks ({', '.join(f'rank {r}: {v!r}' for r, v in enumerate(values))}); "
            f"{fix}"
        )


def run_collectively(fn: Callable[[], T]) -> T:
    """Call ``fn`` on every rank; if it raised on any rank, raise on all of them.

    The rank that failed re-raises its own exception; the others raise the same datatrace
    error class (``DatatraceError`` for any other exception) naming that rank and its
    message. Without this, one rank's ``StoreError`` would leave the others blocked in their
    next collective.
    """
    try:
        result, failure = fn(), None
    except Exception as exc:
        result, failure = None, exc
    reports = all_gather_object(None if failure is None else (type(failure).__name__, str(failure)))
    if failure is not None:
        raise failure
    for r, report in enumerate(reports):
        if report is not None:
            cls = getattr(errors, report[0], DatatraceError)
            if not (isinstance(cls, type) and issubclass(cls, DatatraceError)):
                cls = DatatraceError
            raise cls(f"rank {r} failed: {report[0]}: {report[1]}")
    return result  # type: ignore[return-value]


# ----------------------------------------------------------------------------- store
def open_store(
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    fingerprints: Mapping[str, str],
    overwrite: bool = False,
    probes: Mapping[str, Sequence[float]] | None = None,
    probe_rtol: float = 1e-4,
) -> Store:
    """Open a store that every rank writes shards to (a plain :class:`Store` in one process).

    Rank 0 opens it first (creating it, checking config and fingerprints, folding any
    journals a killed job left, removing partial writes); then the other ranks open it as
    shard writers with journals of their own (see :class:`Store`). The directory must be on
    a file system every rank sees. ``overwrite`` clears a stale store (rank 0 does it).
    ``probes`` and ``probe_rtol`` are checked as :class:`Store` does, on every rank.
    """
    # Every rank checks the same config, fingerprints and probes; only how it opens differs.
    store = functools.partial(
        Store, path, config=config, fingerprints=fingerprints, probes=probes, probe_rtol=probe_rtol
    )
    if not is_distributed():
        return store(overwrite=overwrite)
    me = rank()
    owner = run_collectively(lambda: store(overwrite=overwrite) if me == 0 else None)

    def join() -> Store:
        if owner is not None:
            return owner
        if not (Path(path) / "manifest.json").exists():
            raise StoreError(
                f"rank {me} cannot see the store rank 0 opened at {str(path)!r}; with several "
                "processes the store must be on a file system every rank sees (the same path "
                "on every node)."
            )
        return store(create=False, rank=me)

    return run_collectively(join)


def sync_store(store: Store) -> None:
    """After every rank wrote its shards: rank 0 merges the journals, the others reload.

    Afterwards every rank's view lists every complete shard (no-op in one process).
    """
    if not is_distributed():
        return
    barrier()  # every rank's shard files and journal lines are on disk
    me = rank()
    run_collectively(store.merge_journals if me == 0 else lambda: None)
    run_collectively(store.reload if me != 0 else lambda: None)


# ----------------------------------------------------------------------------- results
def check_same_queries(queries: Any, batch_size: int) -> None:
    """Raise ``DataError`` on every rank unless all ranks hold the same queries.

    Compares the number of queries and a digest of their tensors (the count alone for
    batches that are not tensors). A no-op in a single process.
    """
    if not is_distributed():
        return
    h, n = hashlib.sha256(), num_examples(queries)
    try:
        for batch in iter_batches(queries, batch_size):
            h.update(fingerprint_batch(batch).encode())
        digest = h.hexdigest()
    except DataError:
        digest = ""
    check_same(
        (n, digest),
        "the queries (count, digest)",
        "every rank must pass the same queries: build them from the same seed, or broadcast "
        "them from rank 0 (torch.distributed.broadcast_object_list).",
    )


def gather_score_blocks(
    blocks: Sequence[torch.Tensor], ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ``(n_query, n_units)`` scores and unit ids from every rank's local score blocks.

    ``blocks`` are this rank's ``(n_query, n_block)`` scores of consecutive units, ``ids``
    their unit ids; ranks hold consecutive slices, in rank order (none on some ranks).
    """
    if not is_distributed():
        return torch.cat(list(blocks), 1), torch.cat(list(ids))
    device = blocks[0].device if blocks else None
    # (n_query, n_local) blocks travel as the rows of their transpose
    values = all_gather_rows(torch.cat(list(blocks), 1).T if blocks else None).T
    unit_ids = all_gather_rows(torch.cat(list(ids)) if ids else None).cpu()
    return values.to(device or values.device), unit_ids


def topk_blocks(blocks: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int) -> TopK:
    """:func:`~datatrace.scores.streaming_topk` of this rank's blocks, merged over ranks."""
    if not is_distributed():
        return streaming_topk(blocks, k)
    first = next(blocks, None)
    local = None if first is None else streaming_topk(itertools.chain([first], blocks), k)
    return merge_topk(local, k)


def merge_topk(local: TopK | None, k: int) -> TopK:
    """The global top-``k`` from every rank's local top-k (``None``: a rank with no units).

    The top ``k`` of a union is the top ``k`` of its parts' top ``k``: each rank sends
    ``n_query x k`` candidates, never its scores.
    """
    if not is_distributed():
        if local is None:
            raise DataError("merge_topk got no candidates in a single process.")
        return local

    def gathered(values: torch.Tensor | None, ids: torch.Tensor | None) -> tuple[Any, Any]:
        v = all_gather_rows(None if values is None else values.T.contiguous()).T
        i = all_gather_rows(None if ids is None else ids.T.contiguous()).T
        return v, i.to(v.device)

    pv, pi = gathered(
        None if local is None else local.proponent_values,
        None if local is None else local.proponent_ids,
    )
    ov, oi = gathered(
        None if local is None else local.opponent_values,
        None if local is None else local.opponent_ids,
    )
    kk = min(k, pv.shape[1])
    top = torch.topk(pv, kk, dim=1)
    bot = torch.topk(ov, kk, dim=1, largest=False)
    return TopK(
        torch.gather(pi, 1, top.indices), top.values, torch.gather(oi, 1, bot.indices), bot.values
    )
