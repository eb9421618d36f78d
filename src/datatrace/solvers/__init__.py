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

from datatrace.solvers.inverses import (
    CGInfo,
    DenseSpectrum,
    GramInverse,
    InverseOperator,
    KFACInverse,
    SpectralInverse,
    inverse_eigenvalues,
)
from datatrace.solvers.registry import (
    SOLVERS,
    ArnoldiSolver,
    CGSolver,
    DataInfSolver,
    ExplicitSolver,
    LiSSASolver,
    Solver,
    make_solver,
)

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
