"""Shared parts of the projectors: per-sample gradients cut into pieces (never a whole
``(B, n_params)`` or ``(B, O, I)`` tensor), seeded random matrices and the chunk cache."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator

import torch

from datatrace.devices import working_dtype
from datatrace.errors import DataError
from datatrace.gradients.engine import PerSampleGrads
from datatrace.gradients.hooks import LayerFactors

_MiB = 1 << 20
# Per-sample gradients are formed from layer factors at most this many elements at a time
# (8 MiB in float32), so projecting never holds a (batch, n_params) or (batch, O, I) tensor.
_PIECE_ELEMS = 1 << 21


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # projections accumulate in the working dtype: never in half precision
    return working_dtype(dtype)


def _randn(gen: torch.Generator, rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``(rows, k)`` entries ``N(0, 1/k)`` on the generator's device."""
    return torch.randn(rows, k, generator=gen, dtype=dtype, device=gen.device).mul_(
        1.0 / math.sqrt(k)
    )


def _psg_dtype(psg: PerSampleGrads) -> torch.dtype:
    return next(iter(psg.dense.values())).dtype if psg.dense else psg.factors[0].a.dtype


def _psg_device(psg: PerSampleGrads) -> torch.device:
    return next(iter(psg.dense.values())).device if psg.dense else psg.factors[0].a.device


Scratch = Callable[[int, torch.dtype, torch.device], torch.Tensor]


def _weight_pieces(
    f: LayerFactors, rows: int, transposed: bool, scratch: Scratch | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first output row, piece)``: per-sample weight gradients, ``rows`` output rows at a time.

    A piece is ``(B, rows * I)``, or ``(rows * I, B)`` when ``transposed`` (row-major, as a
    sparse product wants it). With one position (MLPs) pieces are broadcast products written
    into one reused buffer (``scratch(numel, dtype, device)`` if given): a piece is only valid
    until the next one is taken.
    """
    b, n_out, width = f.g.shape[0], f.g.shape[2], f.in_features
    a, g = f.a[:, :, :width], f.g
    if g.shape[1] != 1:
        for lo in range(0, n_out, rows):
            hi = min(n_out, lo + rows)
            if transposed:
                part = torch.einsum("bto,bti->oib", g[:, :, lo:hi], a).contiguous()
                yield lo, part.reshape(-1, b)
            else:
                yield lo, f.weight_grads(lo, hi).reshape(b, -1)
        return
    if transposed:
        left, right = g[:, 0].T.contiguous()[:, None, :], a[:, 0].T.contiguous()[None, :, :]
    else:
        left, right = g[:, 0, :, None], a[:, 0, None, :]
    numel = min(rows, n_out) * width * b
    buf = (
        torch.empty(numel, dtype=g.dtype, device=g.device)
        if scratch is None
        else scratch(numel, g.dtype, g.device)
    )
    for lo in range(0, n_out, rows):
        hi = min(n_out, lo + rows)
        n = (hi - lo) * width * b
        if transposed:
            part = torch.mul(left[lo:hi], right, out=buf[:n].view(hi - lo, width, b))
            yield lo, part.view(-1, b)
        else:
            part = torch.mul(left[:, lo:hi], right, out=buf[:n].view(b, hi - lo, width))
            yield lo, part.view(b, -1)


def _pieces(
    psg: PerSampleGrads,
    transposed: bool = False,
    coords: int | None = None,
    scratch: Scratch | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(row offset, piece)`` covering the flattened gradients in canonical order.

    A piece is ``(B, n)`` (``(n, B)`` when ``transposed``, then contiguous) with ``n`` at most
    ``coords`` coordinates (default ``_PIECE_ELEMS / B``; one output row of a layer if that is
    more); hook-engine weights are formed a few output rows at a time straight from the
    factors, never as a whole ``(B, O, I)`` block. A piece is only valid until the next one is
    taken.
    """
    if not psg.names:
        raise DataError("these per-sample gradients hold no parameters.")
    by_name = {n: f for f in psg.factors for n in (f.weight, f.bias) if n is not None}
    b, offset = psg.batch_size, 0
    coords = max(1, _PIECE_ELEMS // max(b, 1)) if coords is None else coords
    for name in psg.names:
        numel = math.prod(psg.shapes[name])
        if name in psg.dense:
            x = psg.dense[name].reshape(b, -1)
            step = coords
            for lo in range(0, numel, step):
                part = x[:, lo : lo + step]
                if transposed and scratch is not None:
                    buf = scratch(part.numel(), part.dtype, part.device)
                    yield offset + lo, buf.view(part.shape[1], b).copy_(part.T)
                else:
                    yield offset + lo, part.T.contiguous() if transposed else part
        elif name == by_name[name].weight:
            f = by_name[name].param_order()  # Conv1D: pieces in the (I, O) parameter's order
            rows = max(1, coords // max(f.in_features, 1))
            for lo, part in _weight_pieces(f, rows, transposed, scratch):
                yield offset + lo * f.in_features, part
        else:
            bias = by_name[name].bias_grads()
            yield offset, bias.T.contiguous() if transposed else bias
        offset += numel


def _batch_slice(psg: PerSampleGrads, lo: int, hi: int) -> PerSampleGrads:
    """Examples ``lo:hi`` of ``psg`` (views, no copies)."""
    factors = [f.rows(lo, hi) for f in psg.factors]
    dense = {n: t[lo:hi] for n, t in psg.dense.items()}
    return PerSampleGrads(psg.names, psg.shapes, dense, factors, min(hi, psg.batch_size) - lo)


def _nbytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        parts = (t.crow_indices(), t.col_indices(), t.values())
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


class _ChunkCache:
    """Generated tensors kept until ``max_bytes`` is reached, then no more are added.

    Not LRU: projections sweep the chunks in order, which would make LRU evict every chunk
    just before it is needed again; keeping the first chunks that fit gives hits instead.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.nbytes = max_bytes, 0
        self._items: dict[Hashable, tuple[torch.Tensor, ...]] = {}

    def get(
        self, key: Hashable, make: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        if key not in self._items:
            value = make()
            size = sum(_nbytes(t) for t in value)
            if self.nbytes + size > self.max_bytes:
                return value
            self._items[key], self.nbytes = value, self.nbytes + size
        return self._items[key]
