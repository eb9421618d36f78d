"""Inverse operators ``B -> (A + λI)⁻¹ B``: closed forms (eigenpairs, Gram Cholesky, K-FAC's
per-layer eigenvalues, DataInf's Sherman-Morrison) and the iterations of CG and LiSSA.

:mod:`datatrace.solvers` documents the methods and their papers; the
:class:`~datatrace.solvers.Solver` classes there build these.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from datatrace._progress import progress_bar
from datatrace.curvature.kfac import factored_damping
from datatrace.curvature.operators import FisherOperator, LinearOperator, as_columns
from datatrace.errors import ConfigError, NumericalError

if TYPE_CHECKING:
    from datatrace.curvature.kfac import KFACCurvature, KFACLayer

__all__ = [
    "CGInfo",
    "DenseSpectrum",
    "GramInverse",
    "InverseOperator",
    "KFACInverse",
    "SpectralInverse",
    "inverse_eigenvalues",
]


def _check_int(label: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{label} must be an integer >= {low}; got {value!r}.")


def _check_number(label: str, value: Any, low: float = 0.0, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value < math.inf
    if not (ok and (value > low if strict else value >= low)):
        raise ConfigError(
            f"{label} must be a finite number {'>' if strict else '>='} {low:g}; got {value!r}."
        )


# ----------------------------------------------------------------------------- inverses
class InverseOperator(ABC):
    """``B -> ≈ (A + λI)⁻¹ B`` for a prepared curvature ``A`` and damping ``λ``.

    Attributes:
        dim: size of the vectors (``dtype``, ``device``: those it returns).
        damping: the ``λ`` it was prepared with.
        progress: a bar over the iterations of each solve (iterative solvers): True, False
            or None (where stderr is a terminal); set by :meth:`Solver.prepare`.

    Example:
        >>> from datatrace.curvature import DenseOperator
        >>> from datatrace.solvers import ExplicitSolver
        >>> ExplicitSolver().prepare(DenseOperator(torch.eye(2)), 3.0).apply(torch.ones(2, 1))
        tensor([[0.2500],
                [0.2500]])
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, damping: float) -> None:
        self.dim, self.dtype, self.device, self.damping = dim, dtype, device, damping
        self.progress: bool | None = False

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        """Solve for ``b`` of shape ``(dim,)`` or ``(dim, k)``; returns the same shape."""
        out = self._apply(as_columns(b, self, f"{type(self).__name__}.apply"))
        return out.squeeze(1) if b.ndim == 1 else out

    @abstractmethod
    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        """Solve for ``b`` of shape ``(dim, k)``."""


class SpectralInverse(InverseOperator):
    """``U diag(1/(sigma + λ)) Uᵀ`` from (some) eigenpairs ``(sigma, U)`` of the curvature.

    Attributes:
        eigenvalues: ``(r,)`` eigenvalues ``sigma`` of the undamped operator, largest magnitude first.
        eigenvectors: ``(dim, r)`` orthonormal columns ``U``.

    Example:
        >>> inv = SpectralInverse(torch.tensor([2.0]), torch.tensor([[1.0], [0.0]]), damping=2.0)
        >>> inv.apply(torch.tensor([1.0, 1.0]))
        tensor([0.2500, 0.0000])
    """

    def __init__(
        self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, damping: float
    ) -> None:
        v = eigenvectors
        super().__init__(int(v.shape[0]), v.dtype, v.device, damping)
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        shifted = eigenvalues + damping
        scale = max(float(shifted.abs().max()), float(torch.finfo(self.dtype).tiny))
        tol = self.dim * float(torch.finfo(self.dtype).eps) * scale
        small = shifted.abs() <= tol
        if bool(small.any()):
            raise NumericalError(
                f"the damped curvature is singular: {int(small.sum())} eigenvalue(s) of A + λI are "
                f"within {tol:.2e} of 0 (damping={damping}); increase damping."
            )
        self._inv = 1.0 / shifted

    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        u = self.eigenvectors
        return u @ (self._inv.unsqueeze(1) * (u.T @ b))


GramForm = Literal["auto", "primal", "dual"]


class GramInverse(InverseOperator):
    """``(c GᵀG + λI)⁻¹`` for rows ``G`` (``n x dim``), ``c > 0`` and ``λ > 0``, by Cholesky.

    ``"primal"`` factors the ``dim x dim`` matrix ``c GᵀG + λI``; ``"dual"`` factors the
    ``n x n`` matrix ``GGᵀ + (λ/c) I`` and applies the Woodbury identity

        (c GᵀG + λI)⁻¹ b = (b - Gᵀ (GGᵀ + (λ/c) I)⁻¹ G b) / λ,

    so ``dim`` may be far above ``n`` (group features, an unprojected Fisher). ``"auto"``
    takes the smaller Gram: dual when ``n < dim``. Products with ``G`` run in its dtype; the
    Gram is factored and solved in float64, results are returned in ``G``'s dtype. Cost:
    ``O(min(n, dim)² max(n, dim))`` to prepare, ``O(min(n, dim) max(n, dim))`` per right-hand
    side in the dual form (``O(dim²)`` in the primal one).

    Args:
        rows: ``G``, ``(n, dim)``, kept (not copied) by the dual form.
        damping: ``λ > 0``.
        scale: ``c > 0`` (``1/n`` for the empirical Fisher ``(1/n) GᵀG``).
        form: ``"auto"``, ``"primal"`` or ``"dual"``.

    Attributes:
        factor: the float64 Cholesky factor of the damped Gram that was factored.

    Raises:
        NumericalError: if the damped Gram is not positive definite in float64 (λ far below
            the rounding of ``G``'s products).

    Example:
        >>> g = torch.tensor([[1.0, 0.0, 0.0]])
        >>> GramInverse(g, damping=1.0).apply(torch.ones(3))     # dual: n=1 < dim=3
        tensor([0.5000, 1.0000, 1.0000])
    """

    def __init__(
        self, rows: torch.Tensor, damping: float, scale: float = 1.0, form: GramForm = "auto"
    ) -> None:
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[0] < 1:
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ConfigError(f"GramInverse needs (n, dim) rows with n >= 1; got {shape}.")
        _check_number("GramInverse damping", damping)
        _check_number("GramInverse scale", scale)
        if form not in ("auto", "primal", "dual"):
            raise ConfigError(f"form must be 'auto', 'primal' or 'dual'; got {form!r}.")
        super().__init__(int(rows.shape[1]), rows.dtype, rows.device, float(damping))
        n = int(rows.shape[0])
        self.form = ("dual" if n < self.dim else "primal") if form == "auto" else form
        self.scale = float(scale)
        if self.form == "dual":
            self._rows: torch.Tensor | None = rows
            gram = (rows @ rows.T).double()
            shift = self.damping / self.scale
        else:
            self._rows = None
            gram = (rows.T @ rows).double() * self.scale
            shift = self.damping
        self.factor = self._factor(gram, shift)

    def _factor(self, gram: torch.Tensor, shift: float) -> torch.Tensor:
        gram.diagonal().add_(shift)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            raise NumericalError(
                f"the damped Gram ({self.form}, {gram.shape[0]} x {gram.shape[0]}) is not "
                f"positive definite at damping={self.damping:.3g}: the damping is below the "
                "rounding of the features' products; increase damping."
            )
        return chol

    @classmethod
    def from_gram(cls, gram: torch.Tensor, damping: float) -> GramInverse:
        """``(K + λI)⁻¹`` of a PSD Gram/kernel ``K`` accumulated elsewhere, ``λ >= 0``.

        The primal form for rows that were streamed and never held (TRAK's kernel ``ΦᵀΦ``):
        ``K + λI`` is factored by Cholesky in float64 (``K`` is not modified); results come
        back in ``K``'s dtype. The Cholesky factor is :attr:`factor`.

        Example:
            >>> GramInverse.from_gram(torch.eye(2), damping=1.0).apply(torch.ones(2))
            tensor([0.5000, 0.5000])
        """
        if not isinstance(gram, torch.Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
            raise ConfigError(f"GramInverse.from_gram needs a square 2-D Gram; got {shape}.")
        _check_number("GramInverse damping", damping, strict=False)
        inv = cls.__new__(cls)
        InverseOperator.__init__(inv, int(gram.shape[0]), gram.dtype, gram.device, float(damping))
        inv.form, inv.scale, inv._rows = "primal", 1.0, None
        inv.factor = inv._factor(gram.to(torch.float64, copy=True), inv.damping)
        return inv

    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return torch.cholesky_solve(b.double(), self.factor).to(self.dtype)
        g = self._rows
        coef = torch.cholesky_solve((g @ b).double(), self.factor).to(g.dtype)
        return ((b.double() - (g.T @ coef).double()) / self.damping).to(self.dtype)


def inverse_eigenvalues(eigenvalues: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``1 / (Λ + λ)`` of eigenvalues ``Λ`` of a PSD curvature block (a K-FAC layer ``name``).

    Raises:
        NumericalError: some eigenvalue of ``F + λI`` is ~0 (e.g. zero damping, rank-deficient).

    Example:
        >>> inverse_eigenvalues(torch.tensor([1.0, 3.0]), 1.0, "fc")
        tensor([0.5000, 0.2500])
    """
    shifted = eigenvalues + damping
    # The eigenvalues come from float64 sums and eigendecompositions, and keeping them in
    # float32 rounds each one relative to itself: float64's resolution is what says whether
    # F + λI is singular. (Float32's refused kronfluence's default 1e-8 on GPT-2's attention
    # layers, where it scores best.)
    tol = float(torch.finfo(torch.float64).eps) * max(float(shifted.max()), 1e-300)
    if not bool((shifted > tol).all()):
        raise NumericalError(
            f"K-FAC layer {name!r} is singular with damping {damping}: "
            f"{int((shifted <= tol).sum())} eigenvalue(s) of F + λI are ~0; increase damping "
            "(or use 'heuristic')."
        )
    return 1.0 / shifted


class KFACInverse(InverseOperator):
    """``(F + λ_l I)⁻¹`` per layer ``l``: ``Q_G ((Q_Gᵀ M Q_A) / (Λ + λ_l)) Q_Aᵀ``.

    With ``factored`` (K-FAC only), ``(G + δ_G I)⁻¹ M (A + δ_A I)⁻¹`` instead: the damped
    eigenvalues are the outer product ``1 / (λ_G + δ_G) 1 / (λ_A + δ_A)ᵀ`` with ``λ_l`` split
    by :func:`datatrace.curvature.factored_damping`, so the inverse maps a rank-``r`` matrix
    ``sum g aᵀ`` to one of rank ``r``, ``sum (G + δ_G I)⁻¹ g ((A + δ_A I)⁻¹ a)ᵀ``: the two
    factor inverses are :attr:`kronecker`.

    Built by :meth:`datatrace.curvature.KFACCurvature.inverse`.

    Attributes:
        layer_damping: ``{module: λ_l}``.
        damping: the smallest ``λ_l``.
        factored: whether the damping is split over the factors.
        kronecker: with ``factored``, ``{module: ((G + δ_G I)⁻¹, (A + δ_A I)⁻¹)}`` (float64).

    Example:
        >>> from datatrace import Task
        >>> from datatrace.curvature import fit_kfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
        >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> inv = fit_kfac(Task(model), data).inverse("heuristic")
        >>> inv.apply(torch.ones(15, dtype=torch.float64)).shape
        torch.Size([15])
    """

    def __init__(
        self,
        curvature: KFACCurvature,
        layer_damping: Mapping[str, float],
        *,
        factored: bool = False,
    ) -> None:
        super().__init__(
            curvature.dim, curvature.dtype, curvature.device, min(layer_damping.values())
        )
        self.curvature = curvature
        self.layer_damping = dict(layer_damping)
        self.factored = factored
        self.kronecker: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv = {}
        for layer in curvature.layers:
            damping = self.layer_damping[layer.module]
            if not factored:
                self._inv[layer.module] = inverse_eigenvalues(
                    layer.eigenvalues, damping, layer.module
                )
                continue
            inv_g, inv_a = (
                inverse_eigenvalues(lam, d, layer.module)
                for lam, d in zip(layer.factor_eigenvalues(), factored_damping(layer, damping))
            )
            self._inv[layer.module] = inv_g.unsqueeze(1) * inv_a.unsqueeze(0)
            q_g, q_a = layer.q_g.to(torch.float64), layer.q_a.to(torch.float64)
            self.kronecker[layer.module] = ((q_g * inv_g) @ q_g.T, (q_a * inv_a) @ q_a.T)

    def apply_matrices(self, mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply the inverse to per-layer ``(k, O, I')`` gradient matrices."""
        return self.curvature.apply_spectral(mats, self._layer_inverse)

    def _layer_inverse(self, layer: KFACLayer) -> torch.Tensor:
        return self._inv[layer.module]

    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        c = self.curvature
        return c.from_matrices(self.apply_matrices(c.to_matrices(b.T))).T


class DenseSpectrum:
    """``Q f(Λ) Qᵀ`` for any function ``f`` of a symmetric matrix's eigenvalues, e.g. its inverse.

    The eigendecomposition is computed and applied in float64 (Source's propagation and
    response maps of a dense GGN/Hessian); results come back in the input's dtype.

    Args:
        matrix: ``(dim, dim)`` symmetric matrix (symmetrised as ``(M + Mᵀ)/2``).

    Example:
        >>> spec = DenseSpectrum(torch.diag(torch.tensor([1.0, 3.0])))
        >>> spec.apply(torch.ones(1, 2), lambda lam: 1.0 / (lam + 1.0))
        tensor([[0.5000, 0.2500]])
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        m = matrix.to(torch.float64)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh((m + m.T) / 2)

    def apply(self, v: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``(k, dim)`` rows times ``Q fn(Λ) Qᵀ``."""
        q = self.eigenvectors
        rotated = v.to(torch.float64) @ q
        return ((rotated * fn(self.eigenvalues)) @ q.T).to(v.dtype)

    def inverse(self, damping: float) -> SpectralInverse:
        """``(M + λI)⁻¹`` on the eigenpairs (float64)."""
        return SpectralInverse(self.eigenvalues, self.eigenvectors, damping)


@dataclass
class CGInfo:
    """Convergence of the last :class:`CGSolver` solve.

    Attributes:
        iterations: iterations run (the slowest column's).
        relative_residual: largest ``||b - A x|| / ||b||`` over the columns.
        converged: whether every column met ``rtol``.

    Example:
        >>> from datatrace.curvature import DenseOperator
        >>> from datatrace.solvers import CGSolver
        >>> inv = CGSolver().prepare(DenseOperator(torch.eye(2)), 0.0)
        >>> _ = inv.apply(torch.ones(2)); inv.info.iterations
        1
    """

    iterations: int
    relative_residual: float
    converged: bool


class _CGInverse(InverseOperator):
    def __init__(self, op: LinearOperator, damping: float, max_iter: int, rtol: float) -> None:
        super().__init__(op.dim, op.dtype, op.device, damping)
        self.op, self.max_iter, self.rtol = op, max_iter, rtol
        self.info: CGInfo | None = None

    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(0)
        target = self.rtol * rs.sqrt()
        active = rs.sqrt() > target  # zero right-hand sides are solved by x = 0
        it = 0
        bar = progress_bar(
            desc=f"CG iterations ({b.shape[1]} right-hand sides)",
            enabled=self.progress,
            total=self.max_iter,
            leave=False,
            unit="iter",
        )
        while bool(active.any()) and it < self.max_iter:
            idx = active.nonzero().squeeze(1)
            # Each column keeps its own step sizes; only unconverged columns cost a product.
            pa = p[:, idx]
            ap = self.op.matvec(pa) + self.damping * pa
            curv = (pa * ap).sum(0)
            if not bool((curv > 0).all()):  # also catches NaN from a broken operator
                raise NumericalError(
                    f"CG met a direction of non-positive curvature (pᵀ(A + λI)p = {float(curv.min()):.3e}) "
                    f"with damping={self.damping}; CG needs a positive-definite operator: increase "
                    "damping, use a GGN/Fisher operator, or use the explicit or arnoldi solver."
                )
            alpha = rs[idx] / curv
            x[:, idx] += alpha * pa
            r[:, idx] -= alpha * ap
            rs_new = (r[:, idx] ** 2).sum(0)
            p[:, idx] = r[:, idx] + (rs_new / rs[idx]) * pa
            rs[idx] = rs_new
            active[idx] = rs_new.sqrt() > target[idx]
            it += 1
            bar.update(1)
        bar.close()
        norm_b = (b * b).sum(0).sqrt().clamp_min(torch.finfo(b.dtype).tiny)
        rel = float(((r * r).sum(0).sqrt() / norm_b).max())
        self.info = CGInfo(it, rel, not bool(active.any()))
        return x


class _LiSSAInverse(InverseOperator):
    def __init__(
        self, op: LinearOperator, damping: float, depth: int, scale: float, repeats: int
    ) -> None:
        super().__init__(op.dim, op.dtype, op.device, damping)
        self.op, self.depth, self.scale, self.repeats = op, depth, scale, repeats

    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(b)
        bar = progress_bar(
            desc=f"LiSSA iterations ({b.shape[1]} right-hand sides)",
            enabled=self.progress,
            total=self.repeats * self.depth,
            leave=False,
            unit="iter",
        )
        for _ in range(self.repeats):
            x = b.clone()
            for _ in range(self.depth):
                x = b + x - (self.op.matvec(x) + self.damping * x) / self.scale
                bar.update(1)
            total += x / self.scale
        bar.close()
        out = total / self.repeats
        if not bool(torch.isfinite(out).all()):
            raise NumericalError(
                f"LiSSA diverged (scale={self.scale:.3e}, damping={self.damping}); the recursion "
                "needs 0 < eigenvalues of A + λI < 2 * scale: increase scale or damping."
            )
        return out


class _DataInfInverse(InverseOperator):
    def __init__(self, op: FisherOperator, damping: float) -> None:
        super().__init__(op.dim, op.dtype, op.device, damping)
        self.grads, self.n = op.grads, op.n
        self.blocks = op.blocks or [slice(0, op.dim)]
        # Sherman-Morrison weight 1 / (λ + ||g_i||²) of each example, per block.
        self._coef = [1.0 / (damping + (self.grads[:, s] ** 2).sum(1)) for s in self.blocks]

    def _apply(self, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(b)
        for s, coef in zip(self.blocks, self._coef):
            g = self.grads[:, s]
            proj = coef.unsqueeze(1) * (g @ b[s])  # (n, k): (g_iᵀ v) / (λ + ||g_i||²)
            out[s] = (b[s] - g.T @ proj / self.n) / self.damping
        return out
