"""The settings of influence functions (:class:`InfluenceConfig`) and the rules between them.

Kept apart from :mod:`datatrace.methods.influence` (the attributor) so that a setting's
meaning and its validation read in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from datatrace.curvature import (
    HEURISTIC_DAMPING,
    check_curvature_examples,
    check_damping,
    check_fisher_samples,
    check_relative_damping,
)
from datatrace.errors import ConfigError
from datatrace.methods.config import Applies, MethodConfig
from datatrace.solvers import SOLVERS

__all__ = ["KFAC_KINDS", "InfluenceConfig"]

KFAC_KINDS = ("kfac", "ekfac")


def _kfac(config: InfluenceConfig) -> bool:
    return config.curvature in KFAC_KINDS


_KFAC = "curvature='kfac' or 'ekfac'"


@dataclass(frozen=True)
class InfluenceConfig(MethodConfig):
    """Influence-function settings.

    Attributes:
        solver: inverse solver id: ``"explicit"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``,
            ``"datainf"``. With K-FAC/EK-FAC, ``"explicit"`` is the closed-form inverse in the
            Kronecker eigenbasis; the others run on the K-FAC operator.
        curvature: ``"ggn"`` (Gauss-Newton / true Fisher), ``"hessian"`` (exact),
            ``"fisher"`` (empirical Fisher of the train features; works with projections),
            ``"kfac"`` or ``"ekfac"`` (:mod:`datatrace.curvature.kfac`; Linear/Conv2d parameters only).
        damping: λ added to the curvature (of the mean loss), >= 0. With K-FAC/EK-FAC and the
            explicit solver also ``"heuristic"`` (0.1 x each layer's mean eigenvalue) or a
            ``{module: λ}`` dict.
        solver_options: keyword arguments of the solver (e.g. ``{"max_iter": 200}``).
        fisher: K-FAC/EK-FAC only: ``"empirical"`` (training labels; the default: the
            benchmark's choice on the digits settings, deterministic and one backward pass),
            ``"true"`` (labels sampled from the model, seeded by ``seed``; kronfluence's
            default) or ``"exact"`` (closed-form expectation; small outputs).
        train_features: how training gradients reach the scores (all give the same
            scores; only the cost differs):

            - ``"factored"``: each example's layer inputs and output gradients, computed in
              ``fit``, kept (in memory or in the store) and contracted with preconditioned
              queries; needs every tracked parameter in a Linear/Conv2d layer and no groups.
            - ``"gradients"``: flattened per-sample (or per-group) gradients, kept.
            - ``"recompute"``: nothing kept; each scoring call recomputes the training
              gradients batch by batch, as layer factors (flattened gradients with
              ``groups=``, ``engine="functional"`` or parameters outside Linear/Conv2d
              layers). Not with ``curvature="fisher"``, which is built from kept gradients.
            - ``"auto"`` (default): with K-FAC/EK-FAC (no groups, hook engine) layer factors,
              kept when ``n_members x n_train x row bytes <= TRAIN_FEATURE_BUDGET`` (2 GiB)
              and recomputed otherwise, where a row is the stored row of the first training
              example (per layer ``T (I' + O)`` numbers, or ``O I'`` where that is smaller,
              in ``feature_dtype``); otherwise kept gradients. Keeping costs memory or disk
              once; recomputing costs one gradient pass per scoring call.
        query_rank: factored path only (``"factored"``, ``"recompute"`` or ``"auto"`` with
            K-FAC/EK-FAC): rank of the truncated SVD of each layer's preconditioned query
            gradient (None: exact).
        fisher_samples: K-FAC/EK-FAC with ``fisher="true"``: labels sampled per example,
            their Fisher contributions averaged (less sampling noise).
        curvature_examples: K-FAC/EK-FAC only: the training examples that fit the curvature
            (the covariance and eigenvalue passes touch only them; scores still cover every
            training example). An integer is a count (at most ``n_train``), a float in
            (0, 1] a fraction of the training set (rounded, at least 1); None (default) or
            the whole set fits on every example. The subset is a random one seeded by
            ``seed`` (member i: ``seed + 7919 i``), read in training-set order
            (:func:`datatrace.curvature.curvature_subset`): not the first examples, which are a
            biased sample of data ordered by class, source or time. Each curvature pass then
            costs that fraction of a full pass (kronfluence's ``covariance_max_examples``
            and ``lambda_max_examples``, which take the first examples).
        eigenvalue_examples: EK-FAC only: the examples of the eigenvalue pass, a count or
            fraction of the training set as ``curvature_examples`` and at most as many: the
            first of the same seeded permutation, so a subset of the curvature examples
            (None, default: all of them). EK-FAC's eigenvalues in a fixed Kronecker basis
            settle on fewer examples than the factors that define the basis (on pydoc-gpt2,
            5-10% of the chunks after factors from 30%; docs/methods/influence.md).
        relative_damping: K-FAC/EK-FAC with ``damping="heuristic"``: each layer's λ as a
            multiple of its mean eigenvalue (default 0.1; as TRAK's ``relative_damping``).
            0.01 scored best on digits-mlp's validation queries with ``factored_damping``
            (docs/methods/influence.md).
        factored_damping: K-FAC with the explicit solver only: split each layer's damping λ
            over its two Kronecker factors, ``(G + δ_G I)⁻¹ ⊗ (A + δ_A I)⁻¹`` with
            ``δ_G δ_A = λ`` (Martens & Grosse 2015, §6.3;
            :func:`datatrace.curvature.factored_damping`), instead of ``(G ⊗ A + λ I)⁻¹``
            (False, default). It damps each direction by more where the curvature is
            larger, and it keeps a gradient's rank: queries of one position per example
            (MLPs, pooled classifiers) are then scored against the training factors by two
            small inner products per layer instead of a product with each layer's matrix
            (digits-mlp: docs/methods/influence.md).
    """

    solver: str = "cg"
    curvature: Literal["ggn", "hessian", "fisher", "kfac", "ekfac"] = "ggn"
    damping: float | str | dict[str, float] = 1e-3
    solver_options: dict[str, Any] = field(default_factory=dict)
    fisher: Literal["true", "empirical", "exact"] = "empirical"
    train_features: Literal["auto", "factored", "gradients", "recompute"] = "auto"
    query_rank: int | None = None
    fisher_samples: int = 1
    curvature_examples: int | float | None = None
    eigenvalue_examples: int | float | None = None
    relative_damping: float = HEURISTIC_DAMPING
    factored_damping: bool = False

    # settings that only some curvatures, solvers or feature paths read, and values only
    # some of them take (MethodConfig.APPLIES): __post_init__ checks each field alone
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        **MethodConfig.APPLIES,
        "fisher": Applies(
            _kfac,
            _KFAC,
            on=("curvature",),
            hint="(curvature='ggn' is the exact true Fisher, 'fisher' the empirical one.)",
        ),
        "fisher_samples": Applies(
            lambda c: _kfac(c) and c.fisher == "true",
            f"{_KFAC} and fisher='true'",
            on=("curvature", "fisher"),
            hint="(It samples labels, which only fisher='true' does.)",
        ),
        "curvature_examples": Applies(_kfac, _KFAC, on=("curvature",)),
        "eigenvalue_examples": Applies(
            lambda c: c.curvature == "ekfac",
            "curvature='ekfac'",
            on=("curvature",),
            hint="(K-FAC has no eigenvalue pass; curvature_examples sets its one pass.)",
        ),
        "relative_damping": Applies(
            lambda c: _kfac(c) and c.solver == "explicit" and c.damping == "heuristic",
            f"{_KFAC}, solver='explicit' and damping='heuristic'",
            on=("curvature", "solver", "damping"),
            hint="(It scales the heuristic damping; a number or dict damping is absolute.)",
        ),
        "factored_damping": Applies(
            lambda c: c.curvature == "kfac" and c.solver == "explicit",
            "curvature='kfac' and solver='explicit'",
            on=("curvature", "solver"),
            hint="(It inverts each Kronecker factor in closed form; EK-FAC's corrected "
            "eigenvalues are no Kronecker product.)",
        ),
        "damping": Applies(
            lambda c: _kfac(c) and c.solver == "explicit",
            f"{_KFAC} and solver='explicit'",
            on=("curvature", "solver"),
            hint="(A per-layer damping is K-FAC's closed-form inverse; for another solver or "
            "curvature pass a number, e.g. damping=1e-3.)",
            values=lambda v: not isinstance(v, (int, float)),
        ),
        "solver": Applies(
            lambda c: c.curvature == "fisher",
            "curvature='fisher'",
            on=("curvature",),
            hint="(The DataInf solver inverts the empirical Fisher of per-sample gradients.)",
            values=lambda v: v == "datainf",
        ),
        "projector": Applies(
            lambda c: c.curvature == "fisher",
            "curvature='fisher'",
            on=("curvature",),
            hint="(The other curvatures act on the full parameter space.)",
        ),
        "train_features": Applies(
            lambda c: c.curvature != "fisher",
            "a curvature other than 'fisher'",
            on=("curvature",),
            hint="(curvature='fisher' is built from kept training gradients: "
            "train_features='gradients' or 'auto'.)",
            values=lambda v: v in ("factored", "recompute"),
        ),
        "engine": Applies(
            lambda c: c.train_features != "factored",
            "train_features other than 'factored'",
            on=("train_features",),
            hint="(train_features='factored' contracts the hook engine's layer factors with "
            "preconditioned queries: use train_features='gradients'.)",
            values=lambda v: v == "functional",
        ),
        "query_rank": Applies(
            lambda c: c.factored,
            "the factored training-score path",
            on=("train_features", "curvature", "engine"),
            hint="(train_features='factored' or 'recompute', or 'auto' with curvature='kfac' "
            "or 'ekfac'.)",
        ),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}.")
        if self.curvature not in ("ggn", "hessian", "fisher", *KFAC_KINDS):
            raise ConfigError(
                f"curvature must be 'ggn', 'hessian', 'fisher', 'kfac' or 'ekfac'; got "
                f"{self.curvature!r}."
            )
        check_damping(self.damping)
        check_relative_damping(self.relative_damping)
        if self.fisher not in ("true", "empirical", "exact"):
            raise ConfigError(
                f"fisher must be 'true', 'empirical' or 'exact'; got {self.fisher!r}."
            )
        check_fisher_samples(self.fisher_samples)
        check_curvature_examples(self.curvature_examples)
        check_curvature_examples(self.eigenvalue_examples, "eigenvalue_examples")
        eigen, curv = self.eigenvalue_examples, self.curvature_examples
        if eigen is not None and curv is not None and type(eigen) is type(curv) and eigen > curv:
            raise ConfigError(
                f"eigenvalue_examples={eigen!r} exceeds curvature_examples={curv!r}; the "
                "eigenvalue pass reads a subset of the curvature examples."
            )
        if not isinstance(self.factored_damping, bool):
            raise ConfigError(
                f"factored_damping must be True or False; got {self.factored_damping!r}."
            )
        if self.train_features not in ("auto", "factored", "gradients", "recompute"):
            raise ConfigError(
                f"train_features must be 'auto', 'factored', 'gradients' or 'recompute'; got "
                f"{self.train_features!r}."
            )
        if self.query_rank is not None and (
            isinstance(self.query_rank, bool)
            or not isinstance(self.query_rank, int)
            or self.query_rank < 1
        ):
            raise ConfigError(
                f"query_rank must be None or an integer >= 1; got {self.query_rank!r}."
            )

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        defaults = {
            "curvature_examples": None,
            "eigenvalue_examples": None,
            "relative_damping": HEURISTIC_DAMPING,
            "factored_damping": False,
        }
        for name, default in defaults.items():
            if type(out[name]) is type(default) and out[name] == default:
                # left out at its default: stores written before the setting still match
                del out[name]
        return out

    @property
    def factored(self) -> bool:
        """Whether training scores use layer factors (before ``groups=`` and the task's
        layers are known: :class:`InfluenceAttributor` may still fall back to gradients)."""
        if self.train_features == "auto":
            return self.curvature in KFAC_KINDS and self.engine != "functional"
        if self.train_features == "recompute":
            return self.engine != "functional"
        return self.train_features == "factored"
