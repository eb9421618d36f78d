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

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datatrace.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACCurvature,
    LinearOperator,
    check_damping,
    curvature_subset,
    fit_kfac,
)
from datatrace.data import Batch, subset_examples
from datatrace.errors import ConfigError
from datatrace.gradients import compute_per_sample_grads
from datatrace.gradients.factored import (
    FactorCodec,
    ParamLayout,
    factored_modules,
)
from datatrace.group import take_examples
from datatrace.methods.base import MemberContext, MethodConfig, register
from datatrace.methods.context import FormChoice, FormDemand
from datatrace.methods.influence_config import KFAC_KINDS, InfluenceConfig
from datatrace.methods.influence_scoring import InfluenceScoring, InfluenceState
from datatrace.methods.per_module import (
    module_param_spans,
    per_module_scores,
    per_token_scores,
    train_token_terms,
)
from datatrace.scores import Scores
from datatrace.solvers import InverseOperator, make_solver
from datatrace.task import Member, Task

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
class InfluenceAttributor(InfluenceScoring):
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

    @classmethod
    def feature_forms(cls, config: MethodConfig) -> tuple[FormChoice, ...]:
        """Factored where the config asks for it (``train_features="factored"``,
        ``query_rank``) or allows it (``"recompute"``, ``"auto"`` with K-FAC/EK-FAC), else
        flat or projected gradients (see :class:`InfluenceConfig`)."""
        assert isinstance(config, InfluenceConfig)
        if config.train_features == "factored" or config.query_rank is not None:
            return ("factored",)
        return ("factored", "flat") if config.factored else ("flat",)

    @classmethod
    def form_demand(cls, config: MethodConfig) -> FormDemand:
        assert isinstance(config, InfluenceConfig)
        auto = (
            "use train_features='auto' or 'recompute' (flat gradients where factors cannot be used)"
        )
        if config.query_rank is None:
            return FormDemand("train_features='factored'", auto)
        fix = "drop query_rank" + (f" and {auto}" if config.train_features == "factored" else "")
        return FormDemand(f"query_rank={config.query_rank}", fix)

    def __init__(self, task: Any, **kwargs: Any) -> None:
        super().__init__(task, **kwargs)
        self._solver = make_solver(self.config.solver, **self.config.solver_options)
        cfg = self.config
        if cfg.curvature in KFAC_KINDS:
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
        if cfg.train_features != "auto" or "factored" not in self.feature_forms(cfg):
            return cfg.train_features == "recompute"
        budget, itemsize = TRAIN_FEATURE_BUDGET, self.feature_dtype.itemsize
        count = len(members) * self._n_train
        # its tracked layers (a LoRA member's adapters), in the form the loop gives them
        with self._member_task(members[0]) as task:
            if self._feature_form(task)[0] != "factored":
                return False
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
        eigen = self._eigenvalue_subset(subset, seed)
        # factors of another subset are not these
        salt = (
            b"" if subset is None else b"curvature-subset:" + subset.numpy().astype("<i8").tobytes()
        )
        if eigen is not None:
            salt += b"eigenvalue-subset:" + eigen.numpy().astype("<i8").tobytes()
        names = [
            f"L{j}-{f}"
            for j in range(len(factored_modules(ctx.task)))
            for f in KFACCurvature.FIELDS
        ]

        def fit() -> dict[str, torch.Tensor]:
            train = (
                self._train
                if subset is None
                else subset_examples(self._train, subset, cfg.batch_size)
            )
            return fit_kfac(
                ctx.task,
                train,
                eigenvalue_data=(
                    None if eigen is None else subset_examples(self._train, eigen, cfg.batch_size)
                ),
                state=ctx.state,
                kind=cfg.curvature,  # type: ignore[arg-type]
                fisher=cfg.fisher,
                batch_size=cfg.batch_size,
                seed=seed,
                fisher_samples=cfg.fisher_samples,
                progress=cfg.progress,
            ).to_arrays()

        # "v2": eigenvalues from a fresh-label pass (factors stored before that are not reused)
        arrays = self._cached_arrays(ctx, "kfac-v2", names, fit, salt)
        return KFACCurvature.from_arrays(ctx.task, arrays, kind=cfg.curvature, fisher=cfg.fisher)

    def _eigenvalue_subset(self, subset: torch.Tensor | None, seed: int) -> torch.Tensor | None:
        """Training-set indices of EK-FAC's eigenvalue pass, when fewer than the curvature
        examples (``subset``, None: all): the same permutation's first, so nested in them."""
        cfg = self.config
        if cfg.eigenvalue_examples is None:
            return None
        eigen = curvature_subset(self._n_train, cfg.eigenvalue_examples, seed)
        n_eigen = self._n_train if eigen is None else len(eigen)
        n_curv = self._n_train if subset is None else len(subset)
        if n_eigen > n_curv:
            raise ConfigError(
                f"eigenvalue_examples={cfg.eigenvalue_examples!r} selects {n_eigen:,} of the "
                f"{self._n_train:,} training examples, more than the {n_curv:,} of "
                f"curvature_examples={cfg.curvature_examples!r}; the eigenvalue pass reads a "
                "subset of the curvature examples: lower eigenvalue_examples or raise "
                "curvature_examples."
            )
        return None if n_eigen == n_curv else eigen

    def _fit_member(self, ctx: MemberContext[InfluenceState]) -> InfluenceState:
        op = self._operator(ctx)
        inverse: InverseOperator
        if isinstance(op, KFACCurvature) and self.config.solver == "explicit":
            inverse = op.inverse(
                self.config.damping,  # type: ignore[arg-type]
                factored=self.config.factored_damping,
                relative_damping=self.config.relative_damping,
            )
        else:
            inverse = self._solver.prepare(
                op,
                float(self.config.damping),  # type: ignore[arg-type]
                progress=self.config.progress,
            )
        return InfluenceState(inverse=inverse)

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
        if rank is not None:  # factored features, packed rows [L_1, R_1, ..., L_L, R_L]
            spans, pos = {}, 0
            for slot in ParamLayout(self.task).slots:
                width = min(rank, slot.out_features, slot.in_width) * (
                    slot.out_features + slot.in_width
                )
                spans[slot.module] = [slice(pos, pos + width)]
                pos += width
        with self._plain_queries():
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
        if any(c.form != "factored" for c in self._contexts):
            raise ConfigError(
                "per-token training scores need curvature 'kfac' or 'ekfac' with factored "
                "train features and no groups= (they split each example's layer factors by "
                f"position); got curvature={self.config.curvature!r}, "
                f"train_features={self.config.train_features!r}, groups={self._groups_arg!r}."
            )
        with self._plain_queries():
            qs = self._transformed_queries(queries)
        total: torch.Tensor | None = None
        for member_ctx, q in zip(self._contexts, qs):
            with self._member_scope(member_ctx) as ctx:
                psg = compute_per_sample_grads(ctx.task, train, state=ctx.state, engine="hooks")
                part = train_token_terms(ctx.factor_layout(), psg, q, self.config.query_rank)
                total = part if total is None else total + part
        assert total is not None
        return total / len(self._contexts)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
