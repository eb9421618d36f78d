"""Random projections of per-sample gradients (DESIGN.md §4: never ``n_train x n_params``).

A projector maps a gradient ``x`` (length ``n_params``) to ``P^T x`` (length ``proj_dim``)
with a random ``P`` scaled so that ``E[<P^T x, P^T y>] = <x, y>``. By the Johnson-Lindenstrauss
lemma (Johnson & Lindenstrauss 1984; proof as in Dasgupta & Gupta 2003) a Gaussian ``P`` keeps
``|<Px, Py> - <x, y>| <= eps`` for unit ``x, y`` with probability at least
``1 - 4 exp(-(eps^2 - eps^3) k / 4)`` (norm bound, polarised); Achlioptas (2003, Thm. 1.1)
shows the same for ``+-1`` entries. The sparse JL transform / CountSketch (Charikar et al.
2002; Kane & Nelson 2014, "Sparser Johnson-Lindenstrauss transforms", block construction)
touches each coordinate ``nnz`` times. LoGra (Choe et al. 2024, "What is your data worth to
GPT?") projects a Linear/Conv2d gradient ``G = sum_t g_t a_t^T`` as
``P_g^T G P_a = sum_t (P_g^T g_t)(P_a^T a_t)^T``, i.e. with ``P = P_g (x) P_a``, without ever
forming ``G``.

Dense matrices are generated in row chunks of ``block_rows`` from a ``torch.Generator``
seeded by a stable hash of ``(seed, member, chunk)``, so a matrix depends only on these settings
(and, for Gaussians, on the generation dtype: float64 for float64 inputs, else float32), never
on how the input is split into blocks or on the batch. ``generate_on="device"`` (the default)
draws the chunks with a generator on the input's device: on a GPU that is the difference
between generating a large matrix in microseconds and copying it over from the CPU for every
batch, but CUDA's random stream differs from the CPU's, so the same seed gives another (equally
valid) matrix there. ``generate_on="cpu"`` gives the identical matrix on every device.
"""

from __future__ import annotations

import abc
import hashlib
import math
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Literal

import torch

from datatrace.devices import working_dtype
from datatrace.errors import ConfigError, DataError, NotFittedError
from datatrace.gradients.engine import PerSampleGrads
from datatrace.gradients.hooks import LayerFactors

__all__ = [
    "FactoredProjector",
    "GaussianProjector",
    "IdentityProjector",
    "Projector",
    "ProjectorKind",
    "RademacherProjector",
    "SJLTProjector",
    "make_projector",
]

ProjectorKind = Literal["none", "gaussian", "rademacher", "sjlt", "factored"]
_MiB = 1 << 20
# Per-sample gradients are formed from layer factors at most this many elements at a time
# (8 MiB in float32), so projecting never holds a (batch, n_params) or (batch, O, I) tensor.
_PIECE_ELEMS = 1 << 21
# The SJLT goes through the batch 64 examples at a time, in pieces of 2^19 elements (2 MiB):
# the (proj_dim, 64) output block and the piece stay in cache across sparse products (about
# 3x faster than whole-batch pieces at proj_dim 4096; measured on 2 CPU cores).
_SKETCH_WIDTH, _SKETCH_PIECE = 64, 1 << 19


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from ints/strings, identical across processes (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}.")
    return value


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


class Projector(abc.ABC):
    """Base of all projectors: a linear map ``R^n_params -> R^proj_dim`` with ``E[P P^T] = I``.

    Example:
        >>> proj = make_projector("rademacher", 8, seed=0)
        >>> x = torch.randn(2, 30)
        >>> torch.allclose(proj.project_flat(x), proj.project_flat(x[:, :10]) + proj.project_flat(x[:, 10:], 10))
        True
    """

    @property
    @abc.abstractmethod
    def proj_dim(self) -> int:
        """Number of output features."""

    def output_dim(self, psg: PerSampleGrads) -> int:
        """Number of features :meth:`project` returns for gradients laid out like ``psg``."""
        return self.proj_dim

    def project(self, psg: PerSampleGrads) -> torch.Tensor:
        """Project per-sample gradients, one parameter block at a time: ``(B, proj_dim)``."""
        out: torch.Tensor | None = None
        offset = 0
        for _, block in psg.blocks():
            part = self.project_flat(block, offset)
            out = part if out is None else out.add_(part)
            offset += block.shape[1]
        if out is None:
            raise DataError("these per-sample gradients hold no parameters.")
        return out

    @abc.abstractmethod
    def project_flat(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Project ``x`` (``(B, n)``), rows ``[offset, offset + n)`` of the ``n_params`` inputs.

        Summing the projections of consecutive blocks equals projecting the whole vector.
        """


def _check_block(x: torch.Tensor, offset: int) -> None:
    if x.ndim != 2 or not x.is_floating_point():
        raise DataError(
            f"project_flat takes a floating (B, n) tensor; got {x.dtype} of shape {tuple(x.shape)}."
        )
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise DataError(f"offset must be an integer >= 0; got {offset!r}.")


class _ChunkedProjector(Projector):
    """Shared loop of projectors whose matrix is generated in seeded row chunks."""

    _kind = ""

    def __init__(
        self,
        proj_dim: int,
        seed: int = 0,
        member: int = 0,
        block_rows: int = 8192,
        cache_bytes: int = 256 * _MiB,
        generate_on: Literal["device", "cpu"] = "device",
    ) -> None:
        self._proj_dim = _check_int("proj_dim", proj_dim, 1)
        self.seed = _check_int("seed", seed, 0)
        self.member = _check_int("member", member, 0)
        self.block_rows = _check_int("block_rows", block_rows, 1)
        self.cache_bytes = _check_int("cache_bytes", cache_bytes, 0)
        if generate_on not in ("device", "cpu"):
            raise ConfigError(f"generate_on must be 'device' or 'cpu'; got {generate_on!r}.")
        self.generate_on = generate_on
        self._cache = _ChunkCache(cache_bytes)
        self._scratch_bufs: dict[Hashable, torch.Tensor] = {}

    @property
    def proj_dim(self) -> int:
        return self._proj_dim

    def _scratch(
        self, numel: int, dtype: torch.dtype, device: torch.device, name: str = "piece"
    ) -> torch.Tensor:
        """A 1-D work buffer reused across calls (a fresh MiB-sized tensor page-faults anew)."""
        key = (name, dtype, device)
        buf = self._scratch_bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._scratch_bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(proj_dim={self.proj_dim}, seed={self.seed}, member={self.member})"

    @abc.abstractmethod
    def _make_chunk(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]: ...

    def _apply(
        self, x: torch.Tensor, chunk: tuple[torch.Tensor, ...], lo: int, hi: int, out: torch.Tensor
    ) -> None:
        """Add the projection of ``x`` (rows ``lo:hi`` of ``chunk``) into ``out``."""
        out.addmm_(x, chunk[0][lo:hi])

    def _chunk(
        self, index: int, dtype: torch.dtype, device: torch.device, memo: dict | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Chunk ``index`` of the matrix, from the cache or generated.

        ``memo`` (one per :meth:`project` call) keeps the last chunk used: pieces are visited
        in row order, so a chunk the cache cannot hold is generated once per call, not once
        per piece that touches it.
        """
        key = (index, dtype, device)
        if memo is not None and memo.get("key") == key:
            return memo["chunk"]

        def make() -> tuple[torch.Tensor, ...]:
            # A CPU generator gives the same matrix on every device; one on the device avoids
            # generating on the CPU and copying (module docstring).
            where = device if self.generate_on == "device" else torch.device("cpu")
            gen = torch.Generator(device=where).manual_seed(
                _stable_seed(self._kind, self.seed, self.member, index)
            )
            return tuple(t.to(device) for t in self._make_chunk(gen, dtype))

        chunk = self._cache.get(key, make)
        if memo is not None:
            memo.update(key=key, chunk=chunk)
        return chunk

    def _accumulate(
        self, x: torch.Tensor, offset: int, out: torch.Tensor, memo: dict | None = None
    ) -> None:
        """Add the projection of ``x`` (``(B, n)``, rows ``offset:offset+n``) into ``out``."""
        start, stop, rows = offset, offset + x.shape[1], self.block_rows
        for c in range(start // rows, -(-stop // rows)):
            lo, hi = max(start, c * rows), min(stop, (c + 1) * rows)
            chunk = self._chunk(c, out.dtype, x.device, memo)
            self._apply(x[:, lo - start : hi - start], chunk, lo - c * rows, hi - c * rows, out)

    def project(self, psg: PerSampleGrads) -> torch.Tensor:
        """Project per-sample gradients piece by piece into one ``(B, proj_dim)`` output."""
        out_dtype = _psg_dtype(psg)
        dtype = _work_dtype(out_dtype)
        out = torch.zeros(psg.batch_size, self.proj_dim, dtype=dtype, device=_psg_device(psg))
        memo: dict = {}
        for offset, piece in _pieces(psg):
            self._accumulate(piece.to(dtype), offset, out, memo)
        return out.to(out_dtype)

    def project_flat(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        _check_block(x, offset)
        dtype = _work_dtype(x.dtype)
        out = torch.zeros(x.shape[0], self.proj_dim, dtype=dtype, device=x.device)
        self._accumulate(x.to(dtype), offset, out)
        return out.to(x.dtype)


class GaussianProjector(_ChunkedProjector):
    """Dense Gaussian projection, entries ``N(0, 1/proj_dim)`` (JL lemma).

    Args:
        proj_dim: number of output features ``k``.
        seed: seed of the matrix.
        member: ensemble member; each member gets an independent matrix.
        block_rows: rows per generated chunk (part of the matrix's identity).
        cache_bytes: generated chunks are kept up to this many bytes (per projector) so that
            repeated batches reuse them; 0 regenerates every chunk every time.
        generate_on: ``"device"`` (draw on the input's device) or ``"cpu"`` (the same matrix
            on every device); see the module docstring.

    Example:
        >>> proj = GaussianProjector(16, seed=0)
        >>> proj.project_flat(torch.randn(4, 100)).shape
        torch.Size([4, 16])
    """

    _kind = "gaussian"

    def _make_chunk(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return (_randn(gen, self.block_rows, self.proj_dim, dtype),)


class RademacherProjector(_ChunkedProjector):
    """Dense random-sign projection, entries ``+-1/sqrt(proj_dim)`` (Achlioptas 2003).

    Arguments as :class:`GaussianProjector`; the matrix does not depend on the dtype.

    Example:
        >>> proj = RademacherProjector(8, seed=1)
        >>> proj.project_flat(torch.ones(1, 3)).abs().max().item() <= 3 / 8**0.5 + 1e-6
        True
    """

    _kind = "rademacher"

    def _make_chunk(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        bits = torch.randint(
            0,
            2,
            (self.block_rows, self.proj_dim),
            generator=gen,
            dtype=torch.int8,
            device=gen.device,
        )
        return (bits.to(dtype).mul_(2).sub_(1).mul_(1.0 / math.sqrt(self.proj_dim)),)


class SJLTProjector(_ChunkedProjector):
    """Sparse JL transform (CountSketch for ``nnz=1``; Kane & Nelson 2014 block construction).

    The ``proj_dim`` outputs are cut into ``nnz`` near-equal blocks; every input coordinate adds
    ``+-x_i / sqrt(nnz)`` to one random bucket of each block. Cost is ``O(B n nnz)``.

    Args:
        proj_dim: number of output features ``k``.
        seed: seed of the hash functions.
        member: ensemble member; each member gets independent hashes.
        nnz: non-zeros per input coordinate, ``1 <= nnz <= proj_dim``.
        block_rows: coordinates per generated hash chunk.
        cache_bytes: hash chunks are kept up to this many bytes.
        generate_on: as in :class:`GaussianProjector`.

    Example:
        >>> proj = SJLTProjector(32, seed=0, nnz=2)
        >>> proj.project_flat(torch.randn(2, 1000)).shape
        torch.Size([2, 32])
    """

    _kind = "sjlt"

    def __init__(
        self,
        proj_dim: int,
        seed: int = 0,
        member: int = 0,
        nnz: int = 1,
        block_rows: int = 1 << 16,
        cache_bytes: int = 256 * _MiB,
        generate_on: Literal["device", "cpu"] = "device",
    ) -> None:
        super().__init__(proj_dim, seed, member, block_rows, cache_bytes, generate_on)
        self.nnz = _check_int("nnz", nnz, 1)
        if nnz > proj_dim:
            raise ConfigError(f"nnz must be in [1, proj_dim={proj_dim}]; got nnz={nnz}.")

    def _make_chunk(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        edges = [j * self.proj_dim // self.nnz for j in range(self.nnz + 1)]
        cols = [
            torch.randint(
                edges[j], edges[j + 1], (self.block_rows,), generator=gen, device=gen.device
            )
            for j in range(self.nnz)
        ]
        bits = torch.randint(
            0, 2, (self.block_rows, self.nnz), generator=gen, dtype=torch.int8, device=gen.device
        )
        return torch.stack(cols, 1), bits.to(dtype).mul_(2).sub_(1).mul_(1.0 / math.sqrt(self.nnz))

    def _apply(
        self, x: torch.Tensor, chunk: tuple[torch.Tensor, ...], lo: int, hi: int, out: torch.Tensor
    ) -> None:
        # Fallback for devices without sparse matmul; CPU and CUDA use _sketch.
        cols, signs = chunk[0][lo:hi], chunk[1][lo:hi]
        for j in range(self.nnz):
            out.index_add_(1, cols[:, j], x * signs[:, j])

    def _sketch(
        self,
        start: int,
        stop: int,
        dtype: torch.dtype,
        device: torch.device,
        memo: dict | None = None,
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the matrix, transposed: a sparse CSR ``(proj_dim, stop - start)``.

        Built from the same hash chunks as :meth:`_apply` and cached like them. A CSR product
        sums each bucket's coordinates in order, several times faster than ``index_add_``
        along the strided output dimension.
        """

        def make() -> tuple[torch.Tensor, ...]:
            rows, cols, signs = self.block_rows, [], []
            for c in range(start // rows, -(-stop // rows)):
                lo, hi = max(start, c * rows) - c * rows, min(stop, (c + 1) * rows) - c * rows
                chunk = self._chunk(c, dtype, device, memo)
                cols.append(chunk[0][lo:hi])
                signs.append(chunk[1][lo:hi])
            bucket = torch.cat(cols).reshape(-1)  # (n * nnz,), coordinate-major
            order = torch.argsort(bucket, stable=True)  # by bucket, then by coordinate
            # int32 indices: the CPU kernel converts int64 ones on every product
            coord = torch.arange(stop - start, device=device, dtype=torch.int32)
            coord = coord.repeat_interleave(self.nnz)
            crow = torch.zeros(self.proj_dim + 1, dtype=torch.int32, device=device)
            crow[1:] = torch.bincount(bucket, minlength=self.proj_dim).cumsum(0)
            value = torch.cat(signs).reshape(-1)[order]
            with warnings.catch_warnings():
                # beta notice (all versions) and an invariant-check notice (torch < 2.13)
                warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support")
                warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks")
                shape = (self.proj_dim, stop - start)
                return (
                    torch.sparse_csr_tensor(
                        crow, coord[order], value, shape, check_invariants=False
                    ),
                )

        return self._cache.get(("csr", start, stop, dtype, device), make)[0]

    def _accumulate_t(
        self, xt: torch.Tensor, offset: int, out_t: torch.Tensor, memo: dict | None = None
    ) -> None:
        """Add the projection of ``xt`` (``(n, B)``, rows ``offset:offset+n``) into ``out_t``."""
        if xt.shape[0] == 0:
            return
        if out_t.device.type not in ("cpu", "cuda"):
            self._accumulate(xt.T, offset, out_t.T, memo)
            return
        sketch = self._sketch(offset, offset + xt.shape[0], out_t.dtype, out_t.device, memo)
        out_t.addmm_(sketch, xt)

    def project(self, psg: PerSampleGrads) -> torch.Tensor:
        out_dtype = _psg_dtype(psg)
        dtype, device = _work_dtype(out_dtype), _psg_device(psg)
        width, coords = _SKETCH_WIDTH, _SKETCH_PIECE // _SKETCH_WIDTH  # B-free: sketches reused
        out = torch.empty(psg.batch_size, self.proj_dim, dtype=dtype, device=device)
        memo: dict = {}
        for lo in range(0, psg.batch_size, width):
            sub = _batch_slice(psg, lo, lo + width)
            n = sub.batch_size
            out_t = self._scratch(self.proj_dim * n, dtype, device, "out").view(-1, n).zero_()
            for offset, piece in _pieces(sub, True, coords, self._scratch):
                self._accumulate_t(piece.to(dtype), offset, out_t, memo)
            out[lo : lo + n] = out_t.T
        return out.to(out_dtype)

    def project_flat(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        _check_block(x, offset)
        dtype = _work_dtype(x.dtype)
        width, coords = _SKETCH_WIDTH, _SKETCH_PIECE // _SKETCH_WIDTH
        out = torch.empty(x.shape[0], self.proj_dim, dtype=dtype, device=x.device)
        memo: dict = {}
        for b in range(0, x.shape[0], width):
            n = x[b : b + width].shape[0]
            out_t = self._scratch(self.proj_dim * n, dtype, x.device, "out").view(-1, n).zero_()
            for lo in range(0, x.shape[1], coords):
                part = x[b : b + width, lo : lo + coords].T
                xt = self._scratch(part.numel(), dtype, x.device).view(part.shape).copy_(part)
                self._accumulate_t(xt, offset + lo, out_t, memo)
            out[b : b + n] = out_t.T
        return out.to(x.dtype)


class IdentityProjector(Projector):
    """No projection: features are the full flattened gradients (small models only).

    Args:
        n_params: number of tracked parameters if known; otherwise ``proj_dim`` is fixed by the
            first :meth:`project` call.

    Example:
        >>> IdentityProjector(n_params=3).project_flat(torch.ones(1, 2), offset=1).tolist()
        [[0.0, 1.0, 1.0]]
    """

    def __init__(self, n_params: int | None = None) -> None:
        self._n = None if n_params is None else _check_int("n_params", n_params, 1)

    @property
    def proj_dim(self) -> int:
        if self._n is None:
            raise NotFittedError(
                "IdentityProjector.proj_dim is known after project(); or pass n_params=."
            )
        return self._n

    def output_dim(self, psg: PerSampleGrads) -> int:
        return sum(math.prod(s) for s in psg.shapes.values())

    def project(self, psg: PerSampleGrads) -> torch.Tensor:
        n = self.output_dim(psg)
        if self._n is not None and n != self._n:
            raise DataError(
                f"IdentityProjector expects {self._n} parameters; these gradients have {n}."
            )
        self._n = n
        return psg.flat()

    def project_flat(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        _check_block(x, offset)
        if offset + x.shape[1] > self.proj_dim:
            raise DataError(
                f"block [{offset}, {offset + x.shape[1]}) exceeds n_params={self.proj_dim}."
            )
        return torch.nn.functional.pad(x, (offset, self.proj_dim - offset - x.shape[1]))


_Unit = LayerFactors | tuple[str, str | None, str | None] | str


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


class FactoredProjector(Projector):
    """LoGra's per-layer Kronecker projection ``P_g^T G P_a`` (Choe et al. 2024).

    Each layer's gradient ``G`` (``(O, I')``, bias as a last column) becomes ``proj_dim_out x
    proj_dim_in`` features; ``P_a`` (``I' x proj_dim_in``) and ``P_g`` (``O x proj_dim_out``) are
    ``N(0, 1/k)`` and seeded by ``(seed, member, layer name)``. Hook-engine layers are projected
    from their factors. Dense parameters ``<m>.weight`` with >= 2 dims (with ``<m>.bias`` when
    tracked), or a lone tracked ``<m>.bias``, are reshaped to that same matrix, so features do not
    depend on the gradient engine; any other parameter gets its own Gaussian projection to
    ``proj_dim_in * proj_dim_out`` features. Units are concatenated in canonical order, so
    :attr:`proj_dim` depends on the task: it is fixed by the first :meth:`project` call, and
    :meth:`output_dim` computes it beforehand.

    Args:
        proj_dim_in: ``k_in``, projected width of the layer inputs.
        proj_dim_out: ``k_out``, projected width of the layer output gradients.
        seed: seed of all layer matrices.
        member: ensemble member; each member gets independent matrices.
        cache_bytes: generated matrices are kept up to this many bytes.

    Example:
        >>> from datatrace.gradients import compute_per_sample_grads
        >>> from datatrace.task import Task
        >>> task = Task(torch.nn.Linear(5, 3).eval())
        >>> psg = compute_per_sample_grads(task, (torch.randn(4, 5), torch.tensor([0, 1, 2, 0])))
        >>> FactoredProjector(4, 2).project(psg).shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        proj_dim_in: int,
        proj_dim_out: int,
        seed: int = 0,
        member: int = 0,
        cache_bytes: int = 256 * _MiB,
    ) -> None:
        self.proj_dim_in = _check_int("proj_dim_in", proj_dim_in, 1)
        self.proj_dim_out = _check_int("proj_dim_out", proj_dim_out, 1)
        self.seed = _check_int("seed", seed, 0)
        self.member = _check_int("member", member, 0)
        self._cache = _ChunkCache(_check_int("cache_bytes", cache_bytes, 0))
        self._dense: dict[str, GaussianProjector] = {}
        self._proj_dim: int | None = None

    @property
    def dim_per_layer(self) -> int:
        return self.proj_dim_in * self.proj_dim_out

    @property
    def proj_dim(self) -> int:
        if self._proj_dim is None:
            raise NotFittedError(
                "FactoredProjector.proj_dim is known after project(); use output_dim(psg)."
            )
        return self._proj_dim

    def layer_matrices(
        self,
        layer: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_a`` (``(in_features, proj_dim_in)``) and ``P_g`` (``(out_features, proj_dim_out)``)."""

        def matrix(side: str, rows: int, k: int) -> torch.Tensor:
            def make() -> tuple[torch.Tensor, ...]:
                seed = _stable_seed("factored", self.seed, self.member, layer, side)
                return (_randn(torch.Generator().manual_seed(seed), rows, k, dtype).to(device),)

            return self._cache.get((layer, side, rows, dtype, device), make)[0]

        p_a = matrix("a", in_features, self.proj_dim_in)
        return p_a, matrix("g", out_features, self.proj_dim_out)

    def _units(self, psg: PerSampleGrads) -> list[_Unit]:
        """Hook layers, dense ``(module, weight, bias)`` matrices and other parameter names."""
        unit: dict[str, _Unit] = {n: f for f in psg.factors for n in (f.weight, f.bias) if n}
        shapes, units = psg.shapes, dict[int, _Unit]()
        for name in psg.names:
            if name not in unit:
                prefix, _, leaf = name.rpartition(".")
                w, b = _join(prefix, "weight"), _join(prefix, "bias")
                wd = w in psg.dense and len(shapes[w]) >= 2
                # a bias joins its weight's matrix, or stands alone as (O, 1) like the hook engine's
                bd = b in psg.dense and len(shapes[b]) == 1
                bd = bd and (w not in shapes or (wd and shapes[b][0] == shapes[w][0]))
                if (leaf == "weight" and wd) or (leaf == "bias" and bd):
                    group = (prefix, w if wd else None, b if bd else None)
                    unit.update({n: group for n in group[1:] if n})
                else:
                    unit[name] = name
            units.setdefault(id(unit[name]), unit[name])
        return list(units.values())

    def output_dim(self, psg: PerSampleGrads) -> int:
        return len(self._units(psg)) * self.dim_per_layer

    def project(self, psg: PerSampleGrads) -> torch.Tensor:
        out_dtype, n = _psg_dtype(psg), psg.batch_size
        dtype, d = _work_dtype(out_dtype), self.dim_per_layer
        units = self._units(psg)
        total = len(units) * d
        if self._proj_dim is not None and total != self._proj_dim:
            raise DataError(
                f"these gradients give {total} features, earlier ones {self._proj_dim}; "
                "train and query gradients must track the same parameters."
            )
        if not units:
            raise DataError("these per-sample gradients hold no parameters.")
        # Each unit writes its columns of one output (no per-unit tensors and final cat).
        out = torch.empty(n, total, dtype=dtype, device=_psg_device(psg))
        for j, unit in enumerate(units):
            part = out[:, j * d : (j + 1) * d]
            if isinstance(unit, str):
                if unit not in self._dense:
                    seed = _stable_seed("factored-dense", self.seed, self.member, unit)
                    self._dense[unit] = GaussianProjector(self.dim_per_layer, seed=seed)
                    self._dense[unit]._cache = self._cache  # one memory budget for all matrices
                part.copy_(self._dense[unit].project_flat(psg.dense[unit].reshape(n, -1)))
            elif isinstance(unit, LayerFactors):
                a, g = unit.a.to(dtype), unit.g.to(dtype)
                p_a, p_g = self.layer_matrices(unit.module, a.shape[2], g.shape[2], dtype, a.device)
                ga, aa = g @ p_g, a @ p_a
                if ga.shape[1] == 1:  # one position: the outer product, written in place
                    view = part.view(n, self.proj_dim_out, self.proj_dim_in)
                    torch.mul(ga[:, 0, :, None], aa[:, 0, None, :], out=view)
                else:
                    part.copy_(torch.einsum("btp,btq->bpq", ga, aa).reshape(n, -1))
            else:
                module, w, b = unit
                cols = [psg.dense[w].flatten(2)] if w else []
                mat = torch.cat(cols + ([psg.dense[b].unsqueeze(2)] if b else []), 2).to(dtype)
                p_a, p_g = self.layer_matrices(
                    module, mat.shape[2], mat.shape[1], dtype, mat.device
                )
                part.copy_((p_g.T @ mat @ p_a).reshape(n, -1))
        self._proj_dim = total
        return out.to(out_dtype)

    def project_flat(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        raise NotImplementedError(
            "FactoredProjector projects per layer; call project(psg) instead."
        )


_BUILDERS: dict[str, tuple[Callable[..., Projector], frozenset[str]]] = {
    "gaussian": (GaussianProjector, frozenset({"block_rows", "cache_bytes", "generate_on"})),
    "rademacher": (RademacherProjector, frozenset({"block_rows", "cache_bytes", "generate_on"})),
    "sjlt": (SJLTProjector, frozenset({"nnz", "block_rows", "cache_bytes", "generate_on"})),
    "factored": (FactoredProjector, frozenset({"proj_dim_in", "proj_dim_out", "cache_bytes"})),
    "none": (IdentityProjector, frozenset({"n_params"})),
}


def make_projector(
    kind: ProjectorKind, proj_dim: int | None = None, seed: int = 0, member: int = 0, **kw: Any
) -> Projector:
    """Build a projector by id.

    Args:
        kind: ``"none"``, ``"gaussian"``, ``"rademacher"``, ``"sjlt"`` or ``"factored"``.
        proj_dim: output features (ignored for ``"none"``). For ``"factored"`` it is the
            per-layer ``proj_dim_in * proj_dim_out`` (may be None when both are given); without
            those keywords it must be a perfect square and both become ``sqrt(proj_dim)``.
        seed: seed of the random matrix.
        member: ensemble member.
        **kw: extra settings of the chosen class (``nnz``, ``block_rows``, ...).

    Example:
        >>> make_projector("sjlt", 64, seed=3, nnz=2).proj_dim
        64
    """
    if kind not in _BUILDERS:
        raise ConfigError(f"unknown projector kind {kind!r}; choose one of {sorted(_BUILDERS)}.")
    builder, allowed = _BUILDERS[kind]
    if set(kw) - allowed:
        raise ConfigError(
            f"projector {kind!r} takes no {sorted(set(kw) - allowed)}; it accepts {sorted(allowed)}."
        )
    if kind == "none":
        return builder(**kw)
    if kind == "factored":
        k_in, k_out = kw.pop("proj_dim_in", None), kw.pop("proj_dim_out", None)
        if k_in is None and k_out is None:
            k_in = k_out = math.isqrt(_check_int("proj_dim", proj_dim, 1))
        if proj_dim is not None and (k_in or 0) * (k_out or 0) != proj_dim:
            raise ConfigError(
                f"factored proj_dim is per layer, proj_dim_in * proj_dim_out; got proj_dim="
                f"{proj_dim} with proj_dim_in={k_in}, proj_dim_out={k_out}. Pass a perfect square "
                "or matching proj_dim_in= and proj_dim_out=."
            )
        return builder(k_in, k_out, seed=seed, member=member, **kw)
    return builder(_check_int("proj_dim", proj_dim, 1), seed=seed, member=member, **kw)
