"""Inverse-curvature solvers: ``x ≈ (A + λI)⁻¹ b`` for any curvature operator ``A``.

Influence functions (Koh & Liang 2017, "Understanding black-box predictions via influence
functions", eq. 2) need inverse-Hessian-vector products. Every solver works on any
:class:`~datatrace.curvature.LinearOperator`; ``λ`` is the ``damping`` (DESIGN.md §8).

- ``explicit``: materialise ``A``, invert through its eigendecomposition; an empirical Fisher
  ``(1/n) GᵀG`` with ``λ > 0`` through a float64 Cholesky factorisation of the smaller of its
  two Grams (``dim x dim``, or ``n x n`` with the Woodbury identity: :class:`GramInverse`).
- ``cg``: conjugate gradients (Koh & Liang 2017 §3), vectorised over right-hand sides.
- ``lissa``: Agarwal, Bullins & Hazan 2017 ("Second-order stochastic optimization for machine
  learning in linear time", LiSSA, Alg. 1) in Koh & Liang's scaled form:
  ``x_{t+1} = b + (I - (A + λI)/s) x_t``, result ``x_T / s``.
- ``arnoldi``: top-``rank`` eigenpairs by Arnoldi iteration (Schioppa, Zablotskaia, Vilar &
  Sokolov 2022, "Scaling up influence functions", Alg. 2), then ``U diag(1/(sigma + λ)) Uᵀ b``.
- closed-form inverses of operators known by a factorisation: a Gram/kernel's Cholesky
  factor (:meth:`GramInverse.from_gram`, TRAK), an eigendecomposition (:class:`SpectralInverse`,
  :class:`DenseSpectrum`, Source's matrix functions) and K-FAC/EK-FAC's per-layer damped
  eigenvalues (:func:`inverse_eigenvalues`, :class:`KFACInverse`, LoGra). The curvature
  operators' ``inverse(damping)`` methods are built on these; no method inverts anything itself.
- ``datainf``: Kwon, Wu, Wu & Zou 2024 ("DataInf: efficiently estimating data influence in
  LoRA-tuned LLMs and diffusion models", eq. 5): the mean of the per-example inverses
  ``(g_i g_iᵀ + λI)⁻¹`` in place of the inverse of the mean, in closed form (Sherman-Morrison).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from datatrace._progress import progress_bar
from datatrace.curvature.operators import FisherOperator, LinearOperator, as_columns
from datatrace.errors import ConfigError, NumericalError

if TYPE_CHECKING:
    from datatrace.curvature.kfac import KFACCurvature, KFACLayer

__all__ = [
    "SOLVERS",
    "ArnoldiSolver",
    "CGInfo",
    "CGSolver",
    "DataInfSolver",
    "DenseSpectrum",
    "ExplicitSolver",
    "GramInverse",
    "InverseOperator",
    "KFACInverse",
    "LiSSASolver",
    "Solver",
    "SpectralInverse",
    "inverse_eigenvalues",
    "make_solver",
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
    tol = float(torch.finfo(shifted.dtype).eps) * max(float(shifted.max()), 1e-300)
    if not bool((shifted > tol).all()):
        raise NumericalError(
            f"K-FAC layer {name!r} is singular with damping {damping}: "
            f"{int((shifted <= tol).sum())} eigenvalue(s) of F + λI are ~0; increase damping "
            "(or use 'heuristic')."
        )
    return 1.0 / shifted


class KFACInverse(InverseOperator):
    """``(F + λ_l I)⁻¹`` per layer ``l``: ``Q_G ((Q_Gᵀ M Q_A) / (Λ + λ_l)) Q_Aᵀ``.

    Built by :meth:`datatrace.curvature.KFACCurvature.inverse`.

    Attributes:
        layer_damping: ``{module: λ_l}``.
        damping: the smallest ``λ_l``.

    Example:
        >>> from datatrace import Task
        >>> from datatrace.curvature import fit_kfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
        >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> inv = fit_kfac(Task(model), data).inverse("heuristic")
        >>> inv.apply(torch.ones(15, dtype=torch.float64)).shape
        torch.Size([15])
    """

    def __init__(self, curvature: KFACCurvature, layer_damping: Mapping[str, float]) -> None:
        super().__init__(
            curvature.dim, curvature.dtype, curvature.device, min(layer_damping.values())
        )
        self.curvature = curvature
        self.layer_damping = dict(layer_damping)
        self._inv = {
            layer.module: inverse_eigenvalues(
                layer.eigenvalues, self.layer_damping[layer.module], layer.module
            )
            for layer in curvature.layers
        }

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


# ----------------------------------------------------------------------------- solvers
class Solver(ABC):
    """Settings of an inverse-curvature method; :meth:`prepare` does the per-operator work.

    Subclasses are frozen dataclasses whose ``__post_init__`` validates the settings, so that
    ``make_solver(s.name, **s.config())`` rebuilds an equal solver.
    """

    name: ClassVar[str]

    def prepare(
        self, op: LinearOperator, damping: float, *, progress: bool | None = False
    ) -> InverseOperator:
        """Factor or wrap ``op + damping * I`` for repeated :meth:`InverseOperator.apply`.

        ``progress``: bars over this preparation (a dense operator's columns, Arnoldi steps)
        and each later solve's iterations (CG, LiSSA): True, False or None (where stderr is
        a terminal); ``DATATRACE_PROGRESS=0`` turns them off (docs/conventions.md).
        """
        if not isinstance(op, LinearOperator):
            raise ConfigError(
                f"{type(self).__name__}.prepare needs a LinearOperator from datatrace.curvature; "
                f"got {type(op).__name__}."
            )
        _check_number("damping", damping, strict=False)
        inverse = self._prepare(op, float(damping), progress)
        inverse.progress = progress
        return inverse

    @abstractmethod
    def _prepare(
        self, op: LinearOperator, damping: float, progress: bool | None = False
    ) -> InverseOperator: ...

    def config(self) -> dict[str, Any]:
        """JSON-able settings (for store manifests)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ExplicitSolver(Solver):
    """Materialise ``A`` and invert ``A + λI`` exactly.

    In general through its eigendecomposition: works for indefinite but nonsingular
    ``A + λI`` (e.g. a Hessian away from a minimum) and raises
    :class:`~datatrace.errors.NumericalError` when it is singular; ``dim`` operator products
    and ``O(dim³)`` time, small models only. An empirical Fisher
    (:class:`~datatrace.curvature.FisherOperator`, PSD) with ``λ > 0`` is instead factored by
    :class:`GramInverse` (Cholesky in float64, several times cheaper than ``eigh``), through
    the ``n x n`` Gram of its rows when ``n < dim``: ``O(n² dim)``, so it also inverts
    unprojected or group Fishers of large models.

    Attributes:
        form: ``"auto"`` (the above), ``"eigh"`` (always the eigendecomposition), or
            ``"primal"`` / ``"dual"`` (force that Gram; Fisher operators with ``λ > 0`` only).

    Example:
        >>> from datatrace.curvature import DenseOperator
        >>> inv = ExplicitSolver().prepare(DenseOperator(torch.diag(torch.tensor([1.0, 3.0]))), 1.0)
        >>> inv.apply(torch.ones(2))
        tensor([0.5000, 0.2500])
    """

    name: ClassVar[str] = "explicit"
    form: Literal["auto", "eigh", "primal", "dual"] = "auto"

    def __post_init__(self) -> None:
        if self.form not in ("auto", "eigh", "primal", "dual"):
            raise ConfigError(
                f"ExplicitSolver.form must be 'auto', 'eigh', 'primal' or 'dual'; got {self.form!r}."
            )

    def _prepare(
        self, op: LinearOperator, damping: float, progress: bool | None = False
    ) -> InverseOperator:
        gram_ok = isinstance(op, FisherOperator) and damping > 0
        if self.form in ("primal", "dual") and not gram_ok:
            raise ConfigError(
                f"ExplicitSolver(form={self.form!r}) factors an empirical Fisher's Gram; it needs "
                f"a FisherOperator and damping > 0, got {type(op).__name__} with damping={damping}."
                " Use form='auto' or 'eigh'."
            )
        if gram_ok and self.form != "eigh":
            assert isinstance(op, FisherOperator)
            try:
                return GramInverse(op.grads, damping, scale=1.0 / op.n, form=self.form)
            except NumericalError:
                if self.form != "auto":
                    raise
                # λ below the Gram's rounding: the eigendecomposition says whether it is singular
        dense = op.to_dense(progress=progress)
        evals, evecs = torch.linalg.eigh((dense + dense.T) / 2)
        order = evals.abs().argsort(descending=True)
        return SpectralInverse(evals[order], evecs[:, order], damping)


@dataclass(frozen=True)
class CGSolver(Solver):
    """Conjugate gradients on ``(A + λI) x = b``, one operator product per iteration.

    Columns of a ``(dim, k)`` right-hand side run together, each with its own step sizes;
    iteration stops when every ``||r|| < rtol * ||b||``. The last solve's convergence is on the
    inverse's ``.info`` (:class:`CGInfo`). ``A + λI`` must be positive definite.

    Attributes:
        max_iter: most iterations (>= 1).
        rtol: relative residual tolerance (> 0).

    Example:
        >>> from datatrace.curvature import DenseOperator
        >>> inv = CGSolver(max_iter=10).prepare(DenseOperator(torch.diag(torch.tensor([1.0, 3.0]))), 1.0)
        >>> inv.apply(torch.ones(2))
        tensor([0.5000, 0.2500])
    """

    name: ClassVar[str] = "cg"
    max_iter: int = 100
    rtol: float = 1e-10

    def __post_init__(self) -> None:
        _check_int("CGSolver.max_iter", self.max_iter, 1)
        _check_number("CGSolver.rtol", self.rtol)

    def _prepare(
        self, op: LinearOperator, damping: float, progress: bool | None = False
    ) -> InverseOperator:
        return _CGInverse(op, damping, self.max_iter, float(self.rtol))


@dataclass(frozen=True)
class LiSSASolver(Solver):
    """LiSSA (Agarwal et al. 2017): ``x_{t+1} = b + (I - (A + λI)/scale) x_t``, result ``x/scale``.

    Converges (at rate ``1 - λ_min/scale``) when the eigenvalues of ``A + λI`` lie in
    ``(0, 2 * scale)``; Koh & Liang's (damping ``d``, scale ``s``) is ``λ = d * s``.
    Deterministic given the operator: ``repeats > 1`` only helps a stochastic one.

    Attributes:
        depth: recursion steps (>= 1), one operator product each.
        scale: ``s`` (> 0); default ``1.1 x`` the top eigenvalue of ``A + λI`` by power iteration.
        repeats: independent recursions averaged (>= 1).
        power_iter: power-iteration steps used to estimate the default scale (>= 1).

    Example:
        >>> from datatrace.curvature import DenseOperator
        >>> inv = LiSSASolver(depth=200).prepare(DenseOperator(torch.diag(torch.tensor([1.0, 3.0]))), 1.0)
        >>> torch.allclose(inv.apply(torch.ones(2)), torch.tensor([0.5, 0.25]))
        True
    """

    name: ClassVar[str] = "lissa"
    depth: int = 1000
    scale: float | None = None
    repeats: int = 1
    power_iter: int = 20

    def __post_init__(self) -> None:
        _check_int("LiSSASolver.depth", self.depth, 1)
        if self.scale is not None:
            _check_number("LiSSASolver.scale", self.scale)
        _check_int("LiSSASolver.repeats", self.repeats, 1)
        _check_int("LiSSASolver.power_iter", self.power_iter, 1)

    def _prepare(
        self, op: LinearOperator, damping: float, progress: bool | None = False
    ) -> InverseOperator:
        scale = self.scale
        if scale is None:
            scale = 1.1 * _top_eigenvalue(op, damping, self.power_iter)
        return _LiSSAInverse(op, damping, self.depth, float(scale), self.repeats)


def _top_eigenvalue(op: LinearOperator, damping: float, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.dim, generator=gen, dtype=op.dtype).to(op.device)
    v = v / v.norm()
    est = 0.0
    for _ in range(steps):
        w = op.matvec(v) + damping * v
        est = float(v @ w)  # Rayleigh quotient: never above the top eigenvalue
        norm = float(w.norm())
        if norm == 0.0:
            break
        v = w / norm
    if not est > 0:
        raise NumericalError(
            f"power iteration found no positive curvature in A + λI (estimate {est:.3e}); LiSSA "
            "needs a positive-definite operator: increase damping or pass scale=."
        )
    return est


@dataclass(frozen=True)
class ArnoldiSolver(Solver):
    """Top-``rank`` eigenpairs by Arnoldi iteration (Schioppa et al. 2022), then their inverse.

    ``n_iter`` Arnoldi steps from a seeded Gaussian start, fully re-orthogonalised (restarted
    if the Krylov space becomes invariant); the ``rank`` Ritz pairs of largest ``|sigma|`` give
    ``U diag(1/(sigma + λ)) Uᵀ``: the inverse on the top eigenspace, as in the paper, exact when
    ``rank == dim``. Ritz values within rounding noise of zero (``|sigma| <= dim * eps *
    max|sigma|``, the rule :class:`SpectralInverse` uses) are dropped like the directions outside the kept space, so fewer than
    ``rank`` pairs may be kept (with ``rank == dim`` they are kept as exact zeros); the
    eigenpairs are on the returned :class:`SpectralInverse`.

    Attributes:
        rank: eigenpairs kept (>= 1, <= the operator's dim).
        n_iter: Arnoldi steps (>= rank); default ``min(dim, 2 * rank + 10)``.
        seed: seed of the start vector.

    Example:
        >>> from datatrace.curvature import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)))
        >>> inv = ArnoldiSolver(rank=2).prepare(op, damping=0.0)
        >>> inv.eigenvalues
        tensor([4., 2.], dtype=torch.float64)
    """

    name: ClassVar[str] = "arnoldi"
    rank: int = 20
    n_iter: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("ArnoldiSolver.rank", self.rank, 1)
        if self.n_iter is not None:
            _check_int("ArnoldiSolver.n_iter", self.n_iter, self.rank)
        _check_int("ArnoldiSolver.seed", self.seed, 0)

    def _prepare(
        self, op: LinearOperator, damping: float, progress: bool | None = False
    ) -> InverseOperator:
        if self.rank > op.dim:
            raise ConfigError(
                f"ArnoldiSolver.rank={self.rank} exceeds the operator's dim {op.dim}; use rank <= {op.dim}."
            )
        steps = min(op.dim, self.n_iter if self.n_iter is not None else 2 * self.rank + 10)
        q, h = _arnoldi(op, steps, self.seed, progress)
        ritz, vecs = torch.linalg.eigh((h + h.T) / 2)
        top = ritz.abs().argsort(descending=True)[: self.rank]
        # Ritz values at the rounding level of the largest are null directions measured as
        # noise (in float32 they can sit near -λ and make A + λI look singular). With
        # rank < dim they are dropped like every direction outside the kept eigenspace (a
        # lower rank); with rank == dim (the exact inverse) they are set to exactly 0.
        tol = op.dim * float(torch.finfo(op.dtype).eps) * float(ritz.abs().max())
        noise = ritz.abs() <= tol
        if self.rank == op.dim:
            ritz = ritz.masked_fill(noise, 0.0)
        else:
            top = top[~noise[top]]
        if top.numel() == 0:
            raise NumericalError(
                "Arnoldi found no eigenvalue of the curvature above rounding noise; the operator "
                "is (numerically) zero. Check the model and data, or use another solver."
            )
        return SpectralInverse(ritz[top], q @ vecs[:, top], damping)


def _arnoldi(
    op: LinearOperator, steps: int, seed: int, progress: bool | None = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``Q`` (dim, steps) and ``H = Qᵀ A Q`` (steps, steps), upper Hessenberg."""
    gen = torch.Generator().manual_seed(seed)

    def fresh() -> torch.Tensor:
        return torch.randn(op.dim, generator=gen, dtype=op.dtype).to(op.device)

    q = torch.zeros(op.dim, steps, dtype=op.dtype, device=op.device)
    h = torch.zeros(steps, steps, dtype=op.dtype, device=op.device)
    v = fresh()
    q[:, 0] = v / v.norm()
    eps = float(torch.finfo(op.dtype).eps)
    for j in progress_bar(range(steps), desc="Arnoldi iterations", enabled=progress, unit="iter"):
        w = op.matvec(q[:, j])
        norm_aq = float(w.norm())
        basis = q[:, : j + 1]
        for _ in range(2):  # "twice is enough" (Kahan, Parlett): orthogonal to rounding
            coef = basis.T @ w
            h[: j + 1, j] += coef
            w = w - basis @ coef
        if j + 1 == steps:
            break
        norm = float(w.norm())
        if norm > 10 * op.dim * eps * max(norm_aq, 1.0):
            h[j + 1, j] = norm
            q[:, j + 1] = w / norm
            continue
        # Invariant subspace found: continue from a new direction (h[j+1, j] stays 0).
        for _ in range(5):
            v = fresh()
            for _ in range(2):
                v = v - basis @ (basis.T @ v)
            if float(v.norm()) > 1e-3:
                break
        q[:, j + 1] = v / v.norm()
    return q, h


@dataclass(frozen=True)
class DataInfSolver(Solver):
    """DataInf (Kwon et al. 2024): ``(1/n) Σ_i (g_i g_iᵀ + λI)⁻¹`` in closed form, per block.

    By Sherman-Morrison, ``(1/n) Σ_i (g_i g_iᵀ + λI)⁻¹ v = (1/(nλ)) Σ_i (v - g_i (g_iᵀ v) /
    (λ + ||g_i||²))``. This swaps the mean and the inverse of the damped empirical Fisher, so
    it approximates ``(F + λI)⁻¹`` (well for small ``||g_i||²/λ``). Block-diagonal over the
    operator's ``blocks`` (one per layer, as in the paper) or one block. Needs a
    :class:`~datatrace.curvature.FisherOperator` and ``damping > 0``.

    Example:
        >>> from datatrace.curvature import FisherOperator
        >>> inv = DataInfSolver().prepare(FisherOperator(torch.tensor([[1.0, 0.0]])), damping=1.0)
        >>> inv.apply(torch.ones(2))
        tensor([0.5000, 1.0000])
    """

    name: ClassVar[str] = "datainf"

    def _prepare(
        self, op: LinearOperator, damping: float, progress: bool | None = False
    ) -> InverseOperator:
        if not isinstance(op, FisherOperator):
            raise ConfigError(
                f"DataInfSolver needs a FisherOperator (it inverts each per-example gradient); got "
                f"{type(op).__name__}. Build one with FisherOperator(grads) or "
                "FisherOperator.from_task(task, data), or choose another solver."
            )
        if not damping > 0:
            raise ConfigError(f"DataInfSolver needs damping > 0 (it divides by λ); got {damping}.")
        return _DataInfInverse(op, damping)


SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls for cls in (ExplicitSolver, CGSolver, LiSSASolver, ArnoldiSolver, DataInfSolver)
}


def make_solver(name: str, **kwargs: Any) -> Solver:
    """Build a registered solver by id (``explicit``, ``cg``, ``lissa``, ``arnoldi``, ``datainf``).

    Example:
        >>> make_solver("arnoldi", rank=5)
        ArnoldiSolver(rank=5, n_iter=None, seed=0)
    """
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}.")
    try:
        return SOLVERS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad settings {sorted(kwargs)} for solver {name!r}: {exc}.") from exc
