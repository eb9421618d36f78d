"""The projector interface, and the identity (no projection)."""

from __future__ import annotations

import abc
import math

import torch

from datatrace._checks import check_int
from datatrace.errors import DataError, NotFittedError
from datatrace.gradients.engine import PerSampleGrads

__all__ = ["IdentityProjector", "Projector"]


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
        self._n = None if n_params is None else check_int("n_params", n_params, 1)

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
