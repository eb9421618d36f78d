"""Influence functions (Koh & Liang, 2017) with interchangeable inverse-curvature solvers.

Upweighting training example i by ε moves the optimum by ``-H^{-1} ∇L_i ε`` where ``H`` is
the curvature of the mean training loss. Removing i (ε = -1/n) therefore changes the query
objective ``f_q`` (loss-like) by ``∇f_q^T (H + λI)^{-1} ∇L_i / n``; training on i is the
reverse of removing it, so

    score[q, i] = ∇f_q^T (H + λI)^{-1} ∇L_i / n,

in units of the target's change (leave-one-out scale; positive = proponent). ``H`` is the
GGN (default), the exact Hessian, the empirical Fisher of the (optionally projected)
gradients, or K-FAC / EK-FAC (:mod:`datatrace.curvature.kfac`; Grosse et al. 2023, "Studying large
language model generalization with influence functions", eq. 20-22); any solver in
:mod:`datatrace.solvers` inverts it, and ``solver="explicit"`` inverts K-FAC/EK-FAC in closed
form in its Kronecker eigenbasis.

Factored training scores (``train_features="factored"``, the default with K-FAC/EK-FAC): a
Linear/Conv2d layer's preconditioned query gradient is a matrix ``P_q`` (``O x I'``) and
example n's gradient is ``sum_t g_{n,t} a_{n,t}ᵀ``, so

    score[q, n] = sum_layers sum_t g_{n,t}ᵀ P_q a_{n,t} / n

is contracted from stored layer inputs ``a`` and output gradients ``g`` (``T (I' + O)``
numbers per layer; a layer where that exceeds ``O I'``, e.g. a conv with many patches, stores
its gradient matrix instead). Against many queries (``k T >= I'``) a block of training
examples has its layer gradients formed transiently, the faster order of the same
contraction; nothing of size ``n_train x n_params`` is formed or stored. ``query_rank=r``
replaces each ``P_q`` by its best rank-r approximation (truncated SVD): ``r (O + I')`` per
position instead of ``O I'``.

Recomputed training scores (``train_features="recompute"``; kronfluence's way): ``fit``
keeps the curvature only, nothing per example in memory or in the store, and every scoring
call (``attribute``, ``topk``, ``self_attribute``) recomputes each training batch's layer
factors at the member's state and contracts them with ``P_q`` as above (the shared loop
streams them: :meth:`~datatrace.methods.base.Attributor._recomputes_train_features`). Scores
equal the stored path's; the cost moves from memory/disk to one more gradient pass over the
training set per scoring call. ``train_features="auto"`` (the default) stores the factors
when they take at most :data:`TRAIN_FEATURE_BUDGET` bytes (2 GiB) and recomputes them
otherwise; see :class:`InfluenceConfig`.

With ``groups=`` the train gradient of a group is its summed-loss gradient, so its score
is the sum of its members' scores (removing the group moves the optimum by the sum); the GGN
and Hessian stay those of the whole training set. With ``curvature="fisher"`` the Fisher is
built from the group gradients (``(1/n) Σ_g G_g G_gᵀ``), an approximation of GGDA's kind.
Cost: one per-sample gradient per example plus the solver's curvature products per query.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from datatrace import distributed
from datatrace.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACCurvature,
    LinearOperator,
    check_curvature_examples,
    check_damping,
    check_fisher_samples,
    curvature_subset,
    fit_kfac,
)
from datatrace.data import Batch, as_data, iter_batches
from datatrace.errors import ConfigError, ConvergenceWarning, warn
from datatrace.gradients import compute_per_sample_grads
from datatrace.gradients.factored import (
    FactorCodec,
    ParamLayout,
    covers_tracked,
    factored_modules,
)
from datatrace.gradients.hooks import _outer_sum
from datatrace.group import take_examples
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.methods.per_module import (
    module_param_spans,
    per_module_scores,
    per_token_scores,
)
from datatrace.scores import Scores
from datatrace.solvers import SOLVERS, InverseOperator, make_solver
from datatrace.store import fingerprint_batch
from datatrace.task import Member, Task

KFAC_KINDS = ("kfac", "ekfac")

TRAIN_FEATURE_BUDGET = 2 * 2**30
"""Bytes of factored train features (all members) above which ``train_features="auto"``
recomputes them at scoring time instead of storing them (docs/methods/influence.md)."""

COST_WARNING_WORK = 1e11
"""Estimated multiply-adds above which a setting draws a ``CostWarning`` (about a minute on
a CPU core: the README's first self-influence with ``solver="cg"``, 2.4e11, took 112 s)."""

COST_WARNING_BYTES = 2**30
"""Estimated bytes of a dense curvature (or Arnoldi basis) above which it draws one."""

__all__ = [
    "COST_WARNING_BYTES",
    "COST_WARNING_WORK",
    "TRAIN_FEATURE_BUDGET",
    "InfluenceAttributor",
    "InfluenceConfig",
]


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
        if not isinstance(self.damping, (int, float)) and not (
            self.curvature in KFAC_KINDS and self.solver == "explicit"
        ):
            raise ConfigError(
                f"damping={self.damping!r} (per layer) needs curvature='kfac' or 'ekfac' with "
                f"solver='explicit'; got curvature={self.curvature!r}, solver={self.solver!r}. "
                "Pass a number."
            )
        if self.fisher not in ("true", "empirical", "exact"):
            raise ConfigError(
                f"fisher must be 'true', 'empirical' or 'exact'; got {self.fisher!r}."
            )
        check_fisher_samples(self.fisher_samples, self.fisher)
        if self.fisher_samples > 1 and self.curvature not in KFAC_KINDS:
            raise ConfigError(
                f"fisher_samples={self.fisher_samples} applies to curvature='kfac'/'ekfac' only; "
                f"got curvature={self.curvature!r}."
            )
        check_curvature_examples(self.curvature_examples)
        if self.curvature_examples is not None and self.curvature not in KFAC_KINDS:
            raise ConfigError(
                f"curvature_examples={self.curvature_examples!r} applies to curvature='kfac'/"
                f"'ekfac' only; got curvature={self.curvature!r}."
            )
        if self.fisher != "empirical" and self.curvature not in KFAC_KINDS:
            raise ConfigError(
                f"fisher={self.fisher!r} applies to curvature='kfac'/'ekfac' only; got "
                f"curvature={self.curvature!r} (use curvature='ggn' for the exact true Fisher, "
                "'fisher' for the empirical one)."
            )
        if self.curvature != "fisher" and self.projector != "none":
            raise ConfigError(
                f"curvature={self.curvature!r} acts on the full parameter space, but projector="
                f"{self.projector!r}; use projector='none', or curvature='fisher' with a projection."
            )
        if self.solver == "datainf" and self.curvature != "fisher":
            raise ConfigError(
                f"the DataInf solver inverts the empirical Fisher of per-sample gradients; got "
                f"curvature={self.curvature!r}. Set curvature='fisher'."
            )
        if self.train_features not in ("auto", "factored", "gradients", "recompute"):
            raise ConfigError(
                f"train_features must be 'auto', 'factored', 'gradients' or 'recompute'; got "
                f"{self.train_features!r}."
            )
        if self.train_features == "recompute" and self.curvature == "fisher":
            raise ConfigError(
                "train_features='recompute' keeps no training gradients, but curvature='fisher' "
                "is built from them; use train_features='gradients' (or 'auto'), or another "
                "curvature."
            )
        if self.train_features == "factored" and (
            self.curvature == "fisher" or self.engine == "functional"
        ):
            raise ConfigError(
                f"train_features='factored' contracts hook factors with preconditioned queries; "
                f"it needs curvature != 'fisher' and engine != 'functional' (got curvature="
                f"{self.curvature!r}, engine={self.engine!r}). Use train_features='gradients'."
            )
        if self.query_rank is not None:
            if isinstance(self.query_rank, bool) or not isinstance(self.query_rank, int):
                raise ConfigError(
                    f"query_rank must be None or an integer >= 1; got {self.query_rank!r}."
                )
            if self.query_rank < 1:
                raise ConfigError(
                    f"query_rank must be None or an integer >= 1; got {self.query_rank!r}."
                )
            if not self.factored:
                raise ConfigError(
                    f"query_rank={self.query_rank} compresses the factored training-score path; "
                    "set train_features='factored' or 'recompute' (with curvature 'kfac'/'ekfac' "
                    "the default 'auto' is factored)."
                )

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if out["curvature_examples"] is None:
            # left out at its default, so stores written before the setting existed still match
            del out["curvature_examples"]
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


@dataclass(frozen=True)
class InfluenceState:
    """Influence's state of one member.

    Attributes:
        layout: the member's layer layout (factored train features only; None otherwise),
            fixed in the member's scope before its features.
        inverse: ``(H + λI)^{-1}`` as the solver prepared it (None while featurizing).
    """

    layout: ParamLayout | None = None
    inverse: InverseOperator | None = None

    def solve(self) -> InverseOperator:
        """The prepared inverse (set by ``_fit_member``)."""
        assert self.inverse is not None
        return self.inverse

    def factors(self) -> ParamLayout:
        """The layer layout of factored train features."""
        assert self.layout is not None
        return self.layout


@register("influence")
@register("if-explicit", solver="explicit")
@register("if-cg", solver="cg")
@register("if-lissa", solver="lissa")
@register("if-arnoldi", solver="arnoldi")
@register("if-datainf", solver="datainf", curvature="fisher", damping=1e-2)
# K-FAC/EK-FAC ids default to the benchmark's choice on validation queries (digits-mlp and
# digits-cnn, docs/benchmarks.md): empirical Fisher, per-layer heuristic damping
@register("if-kfac", solver="explicit", curvature="kfac", damping="heuristic")
@register("if-ekfac", solver="explicit", curvature="ekfac", damping="heuristic")
class InfluenceAttributor(Attributor[InfluenceState]):
    """Influence functions with any solver and curvature.

    Cost warning: the exact and iterative solvers on the full GGN or Hessian cost a power of
    the parameter count ``P``, so before the work starts a :class:`~datatrace.CostWarning`
    gives the estimate where it exceeds :data:`COST_WARNING_WORK` (1e11 multiply-adds,
    about a minute on a CPU core) or :data:`COST_WARNING_BYTES` (1 GiB). The estimates
    (``n`` training examples, ``k`` right-hand sides: queries, or ``n`` units for
    :meth:`self_attribute`; ``b`` bytes per number):

    - ``solver="explicit"`` (``if-explicit``) on ``"ggn"``/``"hessian"``: a dense ``P x P``
      matrix from ``P`` curvature products and its eigendecomposition, ``n P² + P³``
      multiply-adds and ``3 P² b`` bytes, at ``fit``; on ``"fisher"`` the same with ``P``
      the feature dimension, unless the smaller Gram is factored (``damping > 0``):
      ``m² max(n, P)`` with ``m = min(n, P)``, ``8 m²`` bytes;
    - ``solver="arnoldi"`` on ``"ggn"``/``"hessian"``: ``n_iter`` products, ``n_iter n P``,
      and a ``P x n_iter`` basis, per member at ``fit``;
    - ``solver="cg"`` / ``"lissa"`` (``if-cg``, ``if-lissa``) on ``"ggn"``/``"hessian"``:
      up to ``max_iter`` (``depth x repeats``) products per right-hand side, ``iterations x
      n x k x P`` per member, at each scoring call (CG usually stops earlier: an upper bound).

    K-FAC/EK-FAC curvatures never warn: their cost is a few passes over the data.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).double().eval()
        >>> train = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> attr = InfluenceAttributor(Task(model), solver="explicit", damping=1e-2)
        >>> attr.fit(train).attribute((train[0][:2], train[1][:2])).shape
        (2, 16)
        >>> ekfac = InfluenceAttributor(Task(model), curvature="ekfac", solver="explicit",
        ...                             damping="heuristic", fisher="exact")
        >>> ekfac.fit(train).attribute((train[0][:2], train[1][:2])).shape
        (2, 16)
    """

    method_id = "influence"

    @classmethod
    def layer_params_only(cls, settings: Mapping[str, Any]) -> bool:
        return settings.get("curvature") in KFAC_KINDS

    Config = InfluenceConfig
    config: InfluenceConfig

    def __init__(self, task: Any, **kwargs: Any) -> None:
        super().__init__(task, **kwargs)
        self._solver = make_solver(self.config.solver, **self.config.solver_options)
        # member index -> (preconditioned query block, its per-layer split): see _query_matrices
        self._query_cache: dict[int, tuple[torch.Tensor, Any]] = {}
        cfg = self.config
        if cfg.train_features == "factored" and self._groups_arg is not None:
            raise ConfigError(
                "train_features='factored' keeps each example's layer factors, which cannot be "
                "summed into a group's gradient; with groups= use train_features='gradients' "
                "(or 'auto'), or 'recompute' (group gradients recomputed when scoring)."
            )
        # factored training scores: not for groups, whose features are summed gradients, and
        # recomputed ones only where the hook engine covers every tracked parameter
        self._factored = cfg.factored and self._groups_arg is None
        if cfg.train_features == "recompute" and self._factored:
            self._factored = covers_tracked(self.task)
        if cfg.query_rank is not None and not self._factored:
            why = (
                "groups= turns it off"
                if self._groups_arg is not None
                else ("a tracked parameter is outside Linear/Conv2d layers")
            )
            raise ConfigError(
                f"query_rank={cfg.query_rank} compresses the factored training-score path, but "
                f"{why}; drop query_rank, or groups= / the other parameters."
            )
        if cfg.curvature in KFAC_KINDS or self._factored:
            # refuse parameters outside Linear/Conv2d (and a per-layer damping that does not
            # name every layer) now, not in fit
            modules = list(factored_modules(self.task))
            if isinstance(cfg.damping, dict):
                check_damping(cfg.damping, modules)

    def _cost_warning(self, n_rhs: int | None) -> str | None:
        """The class docstring's estimates, as one line, where they exceed the thresholds."""
        cfg = self.config
        dense = cfg.curvature in ("ggn", "hessian")
        if cfg.curvature in KFAC_KINDS or not (dense or cfg.solver == "explicit"):
            return None
        n, p = self._n_train, self.task.num_tracked
        itemsize = self.task.working_dtype.itemsize
        what = f"{self.name} (solver={cfg.solver!r}, curvature={cfg.curvature!r})"
        alternative = (
            "if-ekfac (curvature='ekfac', solver='explicit') needs a few passes over the data "
            "instead; silence this with warnings.filterwarnings('ignore', "
            "category=datatrace.CostWarning)"
        )
        if n_rhs is None and cfg.solver == "explicit":
            dim = cfg.proj_dim if cfg.projector != "none" else p
            gram = cfg.curvature == "fisher" and float(cfg.damping) > 0  # type: ignore[arg-type]
            gram = gram and self._solver.config().get("form") != "eigh"
            rows = n if dense else self._n_units  # products per column: examples, or Fisher rows
            if gram:
                m = min(rows, dim)
                work, nbytes = m * m * max(rows, dim), 8 * m * m
                shape = f"the {m:,} x {m:,} Gram of its features"
            else:
                work, nbytes = rows * dim**2 + dim**3, 3 * dim**2 * itemsize
                shape = f"a dense {dim:,} x {dim:,} curvature and its eigendecomposition"
        elif n_rhs is None and cfg.solver == "arnoldi" and dense:
            opts = self._solver.config()
            steps = min(opts["n_iter"] or 2 * opts["rank"] + 10, p)
            work, nbytes = steps * n * p, steps * p * itemsize
            shape = f"{steps} curvature products over {n:,} examples and a {p:,} x {steps} basis"
        elif n_rhs is not None and cfg.solver in ("cg", "lissa") and dense:
            opts = self._solver.config()
            iters = opts["max_iter"] if cfg.solver == "cg" else opts["depth"] * opts["repeats"]
            work, nbytes = max(1, len(self._contexts)) * iters * n * n_rhs * p, 0
            shape = (
                f"up to {iters} curvature products over {n:,} examples for each of {n_rhs:,} "
                "right-hand sides"
            )
        else:
            return None
        if work <= COST_WARNING_WORK and nbytes <= COST_WARNING_BYTES:
            return None
        return (
            f"{what} on {p:,} parameters needs {shape}: about {work:.1e} multiply-adds"
            + (f" and {_gib(nbytes)}" if nbytes else "")
            + f" (minutes or more); {alternative}."
        )

    def _recomputes_train_features(self, members: Sequence[Member]) -> bool:
        """``"recompute"``, or ``"auto"`` over its budget (see :class:`InfluenceConfig`)."""
        cfg = self.config
        if cfg.train_features != "auto" or not self._factored:
            return cfg.train_features == "recompute"
        budget, itemsize = TRAIN_FEATURE_BUDGET, self.feature_dtype.itemsize
        count = len(members) * self._n_train
        # its tracked layers (a LoRA member's adapters)
        with self._member_task(members[0]) as task:
            # a layer's part of a row is at most its O I' gradient: when rows of every
            # parameter (and the per-layer position counts) fit, no example is measured
            n_layers = len(ParamLayout(task).slots)
            if count * (task.num_tracked + n_layers) * itemsize <= budget:
                return False
            return count * self._factored_row_width(task) * itemsize > budget

    def _factored_row_width(self, task: Task) -> int:
        """Numbers in the stored factored row of the first training example."""
        first = take_examples(self._train, torch.arange(1))
        with task.moving_batches():
            psg = compute_per_sample_grads(task, first, engine="hooks")
        return int(FactorCodec(ParamLayout(task)).encode(psg.factors).shape[1])

    def _operator(self, ctx: MemberContext[InfluenceState]) -> LinearOperator:
        cfg = self.config
        if cfg.curvature == "fisher":
            grads = self._all_train_features(ctx)
            if self._grouping is not None:
                # group rows: (1/n_train) Σ_g G_g G_gᵀ, the per-example Fisher's scale when the
                # members' gradients are uncorrelated (equal to it for singleton groups)
                grads = grads * (self._n_units / self._n_train) ** 0.5
            blocks = None
            if ctx.projector is None:
                blocks, start = [], 0
                for p in ctx.task.tracked_params().values():
                    blocks.append(slice(start, start + p.numel()))
                    start += p.numel()
            return FisherOperator(grads, blocks=blocks)
        if cfg.curvature in KFAC_KINDS:
            return self._kfac(ctx)
        op_cls = GGNOperator if cfg.curvature == "ggn" else HessianOperator
        return op_cls(ctx.task, self._train, state=ctx.state, batch_size=cfg.batch_size)

    def _kfac(self, ctx: MemberContext[InfluenceState]) -> KFACCurvature:
        """Fit K-FAC/EK-FAC, or reload its factors from the store (keyed by the train data)."""
        cfg = self.config
        seed = cfg.seed + 7919 * ctx.index  # member 0 samples as the plain method does
        subset = curvature_subset(self._n_train, cfg.curvature_examples, seed)
        prefix = ""
        if self.store is not None:
            h = hashlib.sha256()
            for batch in iter_batches(self._train, cfg.batch_size):
                h.update(fingerprint_batch(batch).encode())
            if subset is not None:  # factors of another subset are not these
                h.update(b"curvature-subset:" + subset.numpy().astype("<i8").tobytes())
            # "v2": eigenvalues from a fresh-label pass (factors stored before that are not reused)
            prefix = f"kfac-v2-m{ctx.index}-{h.hexdigest()[:16]}-"
            names = [
                f"L{j}-{f}"
                for j in range(len(factored_modules(ctx.task)))
                for f in KFACCurvature.FIELDS
            ]
            if all(self.store.has_array(prefix + n) for n in names):
                arrays = {n: self.store.read_array(prefix + n, mmap=False) for n in names}
                return KFACCurvature.from_arrays(
                    ctx.task, arrays, kind=cfg.curvature, fisher=cfg.fisher
                )
        curv = fit_kfac(
            ctx.task,
            self._train if subset is None else _examples(self._train, subset, cfg.batch_size),
            state=ctx.state,
            kind=cfg.curvature,  # type: ignore[arg-type]
            fisher=cfg.fisher,
            batch_size=cfg.batch_size,
            seed=seed,
            fisher_samples=cfg.fisher_samples,
            progress=cfg.progress,
        )
        if self.store is not None and distributed.rank() == 0:  # rank 0 owns the arrays
            for name, t in curv.to_arrays().items():
                self.store.write_array(prefix + name, t)
        return curv

    def _prepare_member(self, ctx: MemberContext[InfluenceState]) -> InfluenceState:
        return InfluenceState(layout=ParamLayout(ctx.task) if self._factored else None)

    def _fit_member(self, ctx: MemberContext[InfluenceState]) -> InfluenceState:
        op = self._operator(ctx)
        inverse: InverseOperator
        if isinstance(op, KFACCurvature) and self.config.solver == "explicit":
            inverse = op.inverse(self.config.damping)  # type: ignore[arg-type]
        else:
            inverse = self._solver.prepare(
                op,
                float(self.config.damping),  # type: ignore[arg-type]
                progress=self.config.progress,
            )
        return replace(ctx.fitted, inverse=inverse)

    def _transform_queries(
        self, ctx: MemberContext[InfluenceState], q: torch.Tensor
    ) -> torch.Tensor:
        inverse = ctx.fitted.solve()
        out = inverse.apply(q.T).T / self._n_train
        if self._factored and self.config.query_rank is not None:
            out = _pack_low_rank(ctx.fitted.factors(), out, self.config.query_rank)
        info = getattr(inverse, "info", None)
        if info is not None and not info.converged:
            warn(
                f"CG stopped after {info.iterations} iterations with relative residual "
                f"{info.relative_residual:.2e}; scores are approximate. Raise "
                "solver_options={'max_iter': ...} or damping.",
                ConvergenceWarning,
            )
        return out

    def _score_blocks(
        self, queries: Any, local: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from super()._score_blocks(queries, local)
        finally:  # the per-layer query split lives for one attribute call
            self._query_cache.clear()

    # ------------------------------------------------------------------ factored path
    def _query_matrices(
        self, ctx: MemberContext[InfluenceState], q: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, list[torch.Tensor] | None]:
        """The preconditioned queries ``q`` split per layer (low-rank pairs or full matrices),
        split once per query block: ``_combine`` meets the same ``q`` for every train block."""
        cached = self._query_cache.get(ctx.index)
        if cached is not None and cached[0] is q:
            return cached[1]
        layout = ctx.fitted.factors()
        rank = self.config.query_rank
        split = (
            (_unpack_low_rank(layout, q, rank), None)
            if rank is not None
            else (None, [m.contiguous() for m in layout.to_matrices(q)])
        )
        self._query_cache[ctx.index] = (q, split)
        return split

    def _train_features(self, ctx: MemberContext[InfluenceState], batch: Batch) -> torch.Tensor:
        if not self._factored:
            return super()._train_features(ctx, batch)
        psg = compute_per_sample_grads(ctx.task, batch, state=ctx.state, engine="hooks")
        return FactorCodec(ctx.fitted.factors()).encode(psg.factors)

    def _combine(
        self, ctx: MemberContext[InfluenceState], q: torch.Tensor, train: torch.Tensor, start: int
    ) -> torch.Tensor:
        if not self._factored:
            return super()._combine(ctx, q, train, start)
        queries, full = self._query_matrices(ctx, q)
        total = q.new_zeros(q.shape[0], train.shape[0])
        for j, part in enumerate(FactorCodec(ctx.fitted.factors()).decode(train)):
            if full is not None:
                total += _contract(full[j], part)
            else:
                assert queries is not None
                total += _contract_low_rank(*queries[j], part)
        return total

    def _self_scores(
        self, ctx: MemberContext[InfluenceState], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        if not self._factored:
            return super()._self_scores(ctx, train, start)
        layout = ctx.fitted.factors()
        mats = [
            _outer_sum(part[1], part[0]) if len(part) == 2 else part[0]
            for part in FactorCodec(layout).decode(train)
        ]
        grads = layout.from_matrices(mats)
        pre = ctx.fitted.solve().apply(grads.T).T / self._n_train
        return (pre * grads).sum(1)

    # ------------------------------------------------------------------ per-module scores
    def attribute_per_module(self, queries: Any) -> dict[str, Scores]:
        """``{module: Scores}``: each module's term of the scores; they sum to :meth:`attribute`.

        Module ``m``'s term is ``∇L_{i,m}ᵀ [(H + λI)⁻¹ ∇f_q]_m / n`` (its parameters' part of
        the inner product). With K-FAC/EK-FAC, whose inverse is block-diagonal over layers, it
        is exactly the influence computed with module ``m``'s parameters alone; with a dense
        curvature (GGN, Hessian) the preconditioned query still couples the modules.

        Raises:
            ConfigError: with a projection (projected columns belong to no module).
        """
        if self.config.projector != "none":
            raise ConfigError(
                f"per-module scores split gradients by parameter; projector="
                f"{self.config.projector!r} mixes all modules into each column. Use "
                "projector='none' (K-FAC/EK-FAC need none)."
            )
        params = self.task.tracked_params()
        spans = module_param_spans(list(params), [p.numel() for p in params.values()])
        rank = self.config.query_rank
        if self._factored and rank is not None:  # packed rows [L_1, R_1, ..., L_L, R_L]
            spans, pos = {}, 0
            for slot in ParamLayout(self.task).slots:
                width = min(rank, slot.out_features, slot.in_width) * (
                    slot.out_features + slot.in_width
                )
                spans[slot.module] = [slice(pos, pos + width)]
                pos += width
        return per_module_scores(self, queries, spans)

    def attribute_per_token(self, queries: Any) -> torch.Tensor:
        """``(n_query, T, n_units)`` scores per predicted query token (language models); they
        sum over tokens to :meth:`attribute`. See :func:`datatrace.methods.per_module.per_token_scores`."""
        return per_token_scores(self, queries)

    def attribute_train_tokens(self, queries: Any, train: Batch) -> torch.Tensor:
        """``(n_query, n_examples, T)`` scores of each position of some training examples.

        Entry ``[q, n, t]`` is ``sum_layers g_{n,t}ᵀ P_q a_{n,t}``: the part of example n's
        score that its position ``t`` carries (its layer inputs and output gradients there);
        summed over ``t`` it is ``attribute(queries)`` at that example. Positions the loss
        ignores (label -100, attention mask 0) score 0. Pass the examples to inspect, e.g. a
        query's top proponents, as one batch; they are re-featurized, nothing is stored.

        Raises:
            ConfigError: not K-FAC/EK-FAC with factored train features, with groups, or layers
                whose positions differ (conv patches are not tokens).
        """
        self._check_fitted()
        if not self._factored or self._grouping is not None:
            raise ConfigError(
                "per-token training scores need curvature 'kfac' or 'ekfac' with factored "
                "train features and no groups= (they split each example's layer factors by "
                f"position); got curvature={self.config.curvature!r}, "
                f"train_features={self.config.train_features!r}, groups={self._groups_arg!r}."
            )
        qs = self._transformed_queries(queries)
        total: torch.Tensor | None = None
        for member_ctx, q in zip(self._contexts, qs):
            with self._member_scope(member_ctx) as ctx:
                layout = ctx.fitted.factors()
                rank = self.config.query_rank
                psg = compute_per_sample_grads(ctx.task, train, state=ctx.state, engine="hooks")
                by_module = {f.module: f for f in psg.factors}
                lengths = {by_module[m].a.shape[1] for m in layout.modules}
                if len(lengths) != 1:
                    raise ConfigError(
                        f"per-token training scores need every tracked layer applied once per "
                        f"token; the layers have {sorted(lengths)} positions per example."
                    )
                mats = None if rank is not None else layout.to_matrices(q)
                low = _unpack_low_rank(layout, q, rank) if rank is not None else None
                part = None
                for j, m in enumerate(layout.modules):
                    f = by_module[m]
                    a, g = f.a.to(q.dtype), f.g.to(q.dtype)
                    if low is None:
                        assert mats is not None
                        term = torch.einsum("koi,bti,bto->kbt", mats[j], a, g)
                    else:
                        left, right = low[j]
                        gl = torch.einsum("bto,kor->kbtr", g, left)
                        term = (gl * torch.einsum("bti,kri->kbtr", a, right)).sum(3)
                    part = term if part is None else part + term
                assert part is not None
                total = part if total is None else total + part
        assert total is not None
        return total / len(self._contexts)


def _examples(data: Any, indices: torch.Tensor, batch_size: int) -> Any:
    """The examples ``indices`` of ``data``, in that order, as data the K-FAC passes read.

    Tensors are indexed (a copy of the subset); a dataset, or a loader's dataset, is wrapped
    in a :class:`~torch.utils.data.Subset`, so only the subset's examples are ever loaded.
    """
    data = as_data(data)
    rows = indices.tolist()
    if isinstance(data, DataLoader):
        return DataLoader(
            Subset(data.dataset, rows),
            batch_size=data.batch_size or batch_size,
            shuffle=False,
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
        )
    if isinstance(data, Dataset):
        return Subset(data, rows)
    return take_examples(data, indices)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


_CHUNK = 1 << 24  # elements of the (queries, O, B, T) intermediate per step


def _contract(p: torch.Tensor, part: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``sum_t g_tᵀ P_q a_t`` (or ``<P_q, D_n>``) for ``P`` (k, O, I'): ``(k, B)``.

    Two equivalent orders: ``(P a) · g`` holds a ``(k, O, B, T)`` intermediate (chunked over
    queries), forming the block's gradients holds ``(B, O, I')`` and is one matrix product.
    The first is taken while ``k T < I'`` (fewer queries than inputs), the second otherwise.
    """
    k, o, i = p.shape
    if len(part) == 1:
        return p.reshape(k, -1) @ part[0].reshape(part[0].shape[0], -1).T
    a, g = part
    b, t = a.shape[0], a.shape[1]
    if k * t >= i:
        return p.reshape(k, -1) @ _outer_sum(g, a).reshape(b, -1).T
    out = p.new_empty(k, b)
    step = max(1, _CHUNK // max(1, o * b * t))
    g_obt = g.permute(2, 0, 1)
    for s in range(0, k, step):
        pa = (p[s : s + step].reshape(-1, i) @ a.reshape(b * t, i).T).reshape(-1, o, b, t)
        out[s : s + step] = (pa * g_obt).sum((1, 3))
    return out


def _contract_low_rank(
    left: torch.Tensor, right: torch.Tensor, part: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """As :func:`_contract` for ``P = L R`` with ``L`` (k, O, r), ``R`` (k, r, I')."""
    if len(part) == 1:
        return _contract(left @ right, part)
    a, g = part
    gl = torch.einsum("bto,kor->kbtr", g, left)
    ra = torch.einsum("bti,kri->kbtr", a, right)
    return (gl * ra).sum((2, 3))


def _pack_low_rank(layout: ParamLayout, pre: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows ``[L_1, R_1, ..., L_L, R_L]`` of each layer's truncated SVD ``P ≈ L R``."""
    parts = []
    for p in layout.to_matrices(pre):
        u, sv, vh = torch.linalg.svd(p, full_matrices=False)
        r = min(rank, sv.shape[1])
        parts += [(u[:, :, :r] * sv[:, None, :r]).flatten(1), vh[:, :r, :].flatten(1)]
    return torch.cat(parts, 1)


def _unpack_low_rank(
    layout: ParamLayout, packed: torch.Tensor, rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    k, pos, out = packed.shape[0], 0, []
    for slot in layout.slots:
        o, i = slot.out_features, slot.in_width
        r = min(rank, o, i)
        left = packed[:, pos : pos + o * r].reshape(k, o, r)
        right = packed[:, pos + o * r : pos + r * (o + i)].reshape(k, r, i)
        out.append((left, right))
        pos += r * (o + i)
    return out
