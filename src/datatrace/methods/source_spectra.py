"""Source's spectral maps: the propagation and response of a segment's curvature.

For a segment with curvature ``H`` (its eigenbasis ``Q``, eigenvalues ``Λ``) and ``η K``
learning-rate steps, :func:`propagation` is ``exp(-η K Λ)`` and :func:`response` is
``(1 - exp(-η K Λ)) / Λ`` (their limits at ``Λ = 0``), applied in the eigenbasis by a
:class:`Spectrum`: the dense curvature's (GGN, Hessian) or K-FAC/EK-FAC's per-layer ones
(averaged over a segment's checkpoints in one shared basis, paper App. D.2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from datatrace.curvature import (
    KFACCurvature,
    KFACLayer,
    eigen_pass_seed,
    fit_ekfac_eigenvalues,
    fit_kfac,
)
from datatrace.solvers import DenseSpectrum

__all__ = ["KFACSpectrum", "Spectrum", "dense_spectrum", "kfac_spectrum", "propagation", "response"]


# ----------------------------------------------------------------------------- spectral maps
def _log_propagation(
    sigma: torch.Tensor, schedule: Sequence[tuple[float, int]], unroll: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log|P|, sign P)`` of the propagation over a segment's ``(η, steps)`` schedule."""
    if unroll == "exp":
        total = sum(lr * k for lr, k in schedule)
        return -sigma * total, torch.ones_like(sigma)
    log_p = torch.zeros_like(sigma)
    sign = torch.ones_like(sigma)
    for lr, k in schedule:
        base = 1.0 - lr * sigma
        # log1p keeps digits when η σ is tiny (log(1 - 1e-10) would lose half of them)
        log_base = torch.where(base > 0, torch.log1p(-lr * sigma), torch.log(base.abs()))
        log_p = log_p + k * log_base
        if k % 2 == 1:
            sign = sign * torch.sign(base)
    return log_p, sign


def propagation(
    sigma: torch.Tensor, schedule: Sequence[tuple[float, int]], unroll: str = "exp"
) -> torch.Tensor:
    """``P(σ)``: how a segment carries a parameter perturbation forward, per eigenvalue.

    Args:
        sigma: eigenvalues (damping included).
        schedule: the segment's ``(learning rate, steps)`` pairs.
        unroll: ``"exp"`` for ``exp(-σ Σ η_k)``, ``"sgd"`` for ``Π_k (1 - η_k σ)``.

    Example:
        >>> propagation(torch.tensor([0.0, 1.0], dtype=torch.float64), [(0.1, 10)]).tolist()
        [1.0, 0.36787944117144233]
    """
    log_p, sign = _log_propagation(sigma.to(torch.float64), schedule, unroll)
    return (sign * torch.exp(log_p)).to(sigma.dtype)


def response(
    sigma: torch.Tensor, schedule: Sequence[tuple[float, int]], unroll: str = "exp"
) -> torch.Tensor:
    """``R(σ) = (1 - P(σ)) / σ``, with its limit ``Σ η_k`` at ``σ = 0``, per eigenvalue.

    Computed as ``-expm1(log P) / σ`` in float64, so it stays accurate for tiny ``σ η K``.

    Example:
        >>> sigma = torch.tensor([0.0, 1e-12, 1e3], dtype=torch.float64)
        >>> response(sigma, [(0.1, 10)]).tolist()
        [1.0, 0.9999999999995, 0.001]
    """
    s = sigma.to(torch.float64)
    total = sum(lr * k for lr, k in schedule)
    log_p, sign = _log_propagation(s, schedule, unroll)
    one_minus_p = torch.where(sign > 0, -torch.expm1(log_p), 1.0 - sign * torch.exp(log_p))
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.where(s == 0, torch.full_like(s, total), one_minus_p / safe).to(sigma.dtype)


# ----------------------------------------------------------------------------- curvature
class Spectrum(Protocol):
    """A segment's curvature known by its eigenbasis: applies ``Q f(Λ) Qᵀ`` to flat rows
    (:class:`~datatrace.solvers.DenseSpectrum`, or K-FAC's per-layer eigenbases)."""

    def apply(self, v: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``(k, dim)`` rows times the matrix function ``fn`` of the curvature."""
        ...


class KFACSpectrum:
    def __init__(self, curvature: KFACCurvature) -> None:
        self.curvature = curvature

    def apply(self, v: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        c = self.curvature
        mats = c.apply_spectral(c.to_matrices(v), lambda layer: fn(layer.eigenvalues))
        return c.from_matrices(mats)


def dense_spectrum(
    op_cls: type,
    task: Any,
    data: Any,
    samples: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
    batch_size: int,
    progress: bool | None = False,
) -> DenseSpectrum:
    total = None
    for w, state in samples:
        op = op_cls(task, data, state=state, batch_size=batch_size)
        m = op.to_dense(progress=progress).to(torch.float64)
        total = w * m if total is None else total + w * m
    assert total is not None
    return DenseSpectrum(total)


def kfac_spectrum(
    task: Any,
    data: Any,
    samples: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
    kind: str,
    fisher: str,
    batch_size: int,
    seed: int,
    progress: bool | None = False,
) -> KFACSpectrum:
    """K-FAC/EK-FAC averaged over ``samples`` in one shared eigenbasis (paper, App. D.2)."""
    f64 = torch.float64
    # One sample: kfac's own fit is the answer. Several: fit K-FAC factors at each, then
    # average them, eigendecompose and (EK-FAC) correct the eigenvalues in the shared basis.
    single = len(samples) == 1
    fits = [
        fit_kfac(
            task,
            data,
            state=state,
            kind=kind if single else "kfac",  # type: ignore[arg-type]
            fisher=fisher,  # type: ignore[arg-type]
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        for _, state in samples
    ]
    if single:
        return KFACSpectrum(fits[0])
    layers = []
    for j, first in enumerate(fits[0].layers):
        a = sum(w * f.layers[j].a_factor.to(f64) for (w, _), f in zip(samples, fits))
        g = sum(w * f.layers[j].g_factor.to(f64) for (w, _), f in zip(samples, fits))
        assert isinstance(a, torch.Tensor) and isinstance(g, torch.Tensor)
        layers.append(
            KFACLayer.from_factors(first.module, first.weight, first.bias, first.weight_shape, a, g)
        )
    if kind == "ekfac":
        corrected = [torch.zeros_like(layer.eigenvalues) for layer in layers]
        for w, state in samples:
            lams = fit_ekfac_eigenvalues(
                task,
                data,
                layers,
                state=state,
                fisher=fisher,  # type: ignore[arg-type]
                batch_size=batch_size,
                seed=eigen_pass_seed(seed),
                progress=progress,
            )
            for acc, lam in zip(corrected, lams):
                acc += w * lam
        for layer, acc in zip(layers, corrected):
            layer.eigenvalues = acc
    for layer in layers:
        for name in ("a_factor", "g_factor", "q_a", "q_g", "eigenvalues"):
            setattr(layer, name, getattr(layer, name).to(task.working_dtype))
    return KFACSpectrum(KFACCurvature(task, layers, kind=kind, fisher=fisher))
