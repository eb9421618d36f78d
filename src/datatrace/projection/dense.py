"""Dense random projections, generated in seeded row chunks: Gaussian (JL lemma) and random
signs (Achlioptas 2003), and the chunked loop they share with the SJLT."""

from __future__ import annotations

import abc
import math
from collections.abc import Hashable
from typing import Literal

import torch

from datatrace._checks import check_int
from datatrace._seeds import stable_seed
from datatrace.errors import ConfigError
from datatrace.gradients.engine import PerSampleGrads
from datatrace.projection._pieces import (
    _ChunkCache,
    _MiB,
    _pieces,
    _psg_device,
    _psg_dtype,
    _randn,
    _work_dtype,
)
from datatrace.projection.base import Projector, _check_block

__all__ = ["GaussianProjector", "RademacherProjector"]


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
        self._proj_dim = check_int("proj_dim", proj_dim, 1)
        self.seed = check_int("seed", seed, 0)
        self.member = check_int("member", member, 0)
        self.block_rows = check_int("block_rows", block_rows, 1)
        self.cache_bytes = check_int("cache_bytes", cache_bytes, 0)
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
                stable_seed(self._kind, self.seed, self.member, index)
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
