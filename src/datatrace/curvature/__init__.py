"""Curvature of the mean training loss as linear operators (DESIGN.md §3).

- :mod:`datatrace.curvature.operators`: the :class:`LinearOperator` interface and the exact
  operators (Hessian, GGN, empirical Fisher, dense, Gram/kernel, callable).
- :mod:`datatrace.curvature.kfac`: K-FAC / EK-FAC layers and the :class:`KFACCurvature`
  operator; :mod:`datatrace.curvature.kfac_fit` fits them (covariance and eigenvalue passes),
  :mod:`datatrace.curvature.kfac_labels` draws the Fisher's labels.

Every operator has ``inverse(damping)`` and ``solve(b, damping)``; the inverses are computed
by :mod:`datatrace.solvers`.
"""

from datatrace.curvature.kfac import (
    HEURISTIC_DAMPING,
    Damping,
    FisherKind,
    KFACCurvature,
    KFACKind,
    KFACLayer,
    Projections,
    check_curvature_examples,
    check_damping,
    check_fisher_samples,
    check_relative_damping,
    compute_dtype,
    curvature_subset,
    eigen_pass_seed,
    factored_damping,
    layer_damping,
)
from datatrace.curvature.kfac_fit import fit_ekfac_eigenvalues, fit_kfac, fit_kfac_layers
from datatrace.curvature.operators import (
    CallableOperator,
    DenseOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KernelOperator,
    LinearOperator,
    layer_blocks,
)

__all__ = [
    "HEURISTIC_DAMPING",
    "CallableOperator",
    "Damping",
    "DenseOperator",
    "FisherKind",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KFACCurvature",
    "KFACKind",
    "KFACLayer",
    "KernelOperator",
    "LinearOperator",
    "Projections",
    "check_curvature_examples",
    "check_damping",
    "check_fisher_samples",
    "check_relative_damping",
    "compute_dtype",
    "curvature_subset",
    "eigen_pass_seed",
    "factored_damping",
    "fit_ekfac_eigenvalues",
    "fit_kfac",
    "fit_kfac_layers",
    "layer_blocks",
    "layer_damping",
]
