"""The solvers: settings of an inverse-curvature method, registered by name
(:data:`SOLVERS`, :func:`make_solver`); :meth:`Solver.prepare` builds the inverse operator."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from datatrace._progress import progress_bar
from datatrace.curvature.operators import FisherOperator, LinearOperator
from datatrace.errors import ConfigError, NumericalError

if TYPE_CHECKING:
    pass

from datatrace.solvers.inverses import (
    GramInverse,
    InverseOperator,
    SpectralInverse,
    _CGInverse,
    _check_int,
    _check_number,
    _DataInfInverse,
    _LiSSAInverse,
)

__all__ = [
    "SOLVERS",
    "ArnoldiSolver",
    "CGSolver",
    "DataInfSolver",
    "ExplicitSolver",
    "LiSSASolver",
    "Solver",
    "make_solver",
]


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
