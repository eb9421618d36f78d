"""Exact unrolled attribution: metagradients through the replayed training run.

Give every training example ``i`` a weight ``w_i`` in the loss of every step that trains on
it (:mod:`datatrace.replay`: ``J_t(θ; w) = Σ_{i ∈ B_t} w_i ℓ_i(θ) / |B_t|``), replay the
recorded run ``s_{t+1} = Φ_t(s_t, w)`` (weights and optimizer state ``s``) and differentiate
the query objective at the end with respect to the weights, at ``w = 1``:

    score[q, i] = -∂f_q(θ_T(w)) / ∂w_i |_{w=1}
                = -Σ_{t : i ∈ B_t} (1 / |B_t|) ⟨∂Φ_t/∂g, λ_{t+1}⟩ᵀ ∇ℓ_i(θ_t)

where ``f_q = -direction · target`` is the loss-like query objective and ``λ_{t+1}`` the
adjoint of ``s_{t+1}`` (``λ_T = ∇f_q(θ_T)``, ``λ_t = (∂Φ_t/∂s_t)ᵀ λ_{t+1}``). No
approximation is made: the Hessian-vector products of every step and the optimizer's
Jacobian (momentum, Adam's moments and normalisation) are differentiated exactly. This is the
metagradient of MAGIC (Ilyas & Engstrom, 2025, "MAGIC: Near-Optimal Data Attribution for Deep
Learning"), computed by reverse-mode differentiation through the optimizer as in Maclaurin,
Duvenaud & Adams (2015, "Gradient-based Hyperparameter Optimization through Reversible
Learning"); Source (``source``) approximates the same quantity in closed form.

Sign and scale (DESIGN.md §1): the score is the first-order *decrease* of the query objective
when example ``i`` is up-weighted from 0 to 1 in every batch it appears in, with each
batch's denominator ``|B_t|`` held fixed; positive = proponent.

Where to linearise (``weight=w0``, default 1). The derivative can be taken at any common
weight ``w = w0 · 1``: the run is replayed with every example's loss weight at ``w0`` (a
different, equally deterministic trajectory) and differentiated there. A subset ``S`` is
then predicted by ``f_q(1_S) ≈ f_q(w0 · 1) + Σ_i ∂f_q/∂w_i (1_S - w0)_i``, whose ranking
over subsets is that of ``Σ_{i ∈ S} score[q, i]``. The first-order error is smallest where
``w0`` is the mean of the ablated weights: ``w0 = 1`` for dropping a few examples, ``w0 =
0.5`` for random halves (``J_t`` is linear in ``w``, so every step's loss at weight 0.5 is the
mean over random halves ``S`` of the loss ``J_t(θ; 1_S)`` of the run without the other half).
The replay is checked against the recorded weights at ``w0 = 1`` first; the run at ``w0``
uses the same verified steps.

Memory: reverse mode needs the state of every step. The replay keeps the state (weights and
optimizer slots) at every ``K``-th step (``K = segment_steps``, default ``ceil(sqrt(T))``),
then walks the segments backwards: each segment is recomputed forward from its saved state
with the graph kept (``create_graph``: the per-step gradients become differentiable), and
the adjoints of all queries are pulled back through it, ``batch_size`` queries at a time
(``vmap`` over the adjoints, or one by one with ``query_batching="loop"``), the segment's
graph shared by every query chunk. Peak memory: ``T/K + 1`` saved states plus one segment's
graph (``K`` steps) plus the adjoints (``n_query x`` state size) and scores
(``n_query x n_train``). Time: about one training run to replay and check, one more (with
double-backward graphs, ~2-3x) to recompute, and the backward passes (~2-3x a training step
each) per query chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from datatrace import distributed
from datatrace.data import iter_batches, take_examples
from datatrace.errors import ConfigError, ModelError
from datatrace.methods.base import (
    Attributor,
    MemberContext,
    MethodConfig,
    finite_or_raise,
    register,
)
from datatrace.methods.config import Applies, no_projection, unused
from datatrace.replay import Replay, ReplayState, TrainingRecipe
from datatrace.task import Member, Task

__all__ = ["UnrolledAttributor", "UnrolledConfig"]


@dataclass(frozen=True)
class UnrolledConfig(MethodConfig):
    """Settings of exact unrolled attribution.

    Attributes:
        segment_steps: optimizer steps per recomputed segment ``K``; None: ``ceil(sqrt(T))``
            (memory ``O(sqrt(T))`` states). ``K >= T`` keeps the whole run's graph (plain
            reverse mode, no recomputation).
        replay_tolerance: the largest accepted ``max |θ_replay - θ_recorded| / max |θ_recorded|``
            over the trained parameters; 0 (default) demands the recorded final weights bit
            for bit (what a CPU replay gives). Raise it only for runs whose kernels are not
            bitwise reproducible (GPU atomics); the scores are then exact for the replayed run.
        query_batching: ``"vmap"`` pulls ``batch_size`` query adjoints back at once
            (``is_grads_batched``); ``"loop"`` one by one (less memory, slower).
        weight: every example's loss weight ``w0`` at which the metagradient is taken,
            ``-∂f_q/∂w_i`` at ``w = w0 · 1`` (finite, >= 0). 1 (default): the recorded run,
            right for dropping a few examples. 0.5: the centre of random half-subset
            ablations, the run replayed with every loss weight halved (a different
            trajectory; the replay is first checked at weight 1 against the recorded
            weights). See the module docstring.
    """

    segment_steps: int | None = None
    replay_tolerance: float = 0.0
    query_batching: Literal["vmap", "loop"] = "vmap"
    weight: float = 1.0

    # shared settings this method never reads (MethodConfig.APPLIES)
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        **MethodConfig.APPLIES,
        **no_projection("it differentiates the replayed run exactly and projects nothing"),
        "engine": unused("it differentiates the replayed run, with no per-sample gradients"),
        "seed": unused("it samples nothing (the recipe holds every step's seed)"),
        "feature_dtype": unused("it keeps no train features"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segment_steps is not None and (
            isinstance(self.segment_steps, bool)
            or not isinstance(self.segment_steps, int)
            or self.segment_steps < 1
        ):
            raise ConfigError(
                f"segment_steps must be an int >= 1 or None; got {self.segment_steps!r}."
            )
        tol = self.replay_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ConfigError(f"replay_tolerance must be a finite number >= 0; got {tol!r}.")
        if self.query_batching not in ("vmap", "loop"):
            raise ConfigError(
                f"query_batching must be 'vmap' or 'loop'; got {self.query_batching!r}."
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
            raise ConfigError(
                f"weight must be a finite number >= 0 (the loss weight of every example at "
                f"which the metagradient is taken: 1 the recorded run, 0.5 the centre of "
                f"half-subset ablations); got {w!r}."
            )


@dataclass(frozen=True)
class UnrolledState:
    """The replayed run of one member.

    Attributes:
        replay: the replay of the member's recipe.
        saved: the replay states kept every ``segment_steps`` steps, by step.
        final: the replayed final state.
        segment_steps: steps per recomputed segment ``K``.
    """

    replay: Replay
    saved: dict[int, ReplayState]
    final: ReplayState
    segment_steps: int


@register("unrolled")
class UnrolledAttributor(Attributor[UnrolledState]):
    """Exact unrolled attribution: metagradients of the query through the replayed run.

    Args:
        task: the task; its model is the run's final model (eval mode).
        recipe: the recorded run (:class:`~datatrace.replay.TrainingRecipe`; record it with
            :class:`~datatrace.recording.CheckpointRecorder`), or one per ensemble member.
        **kwargs: :class:`UnrolledConfig` fields and the shared attributor arguments.

    Example:
        >>> import torch.nn.functional as F
        >>> from datatrace.recording import CheckpointRecorder
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3).double()
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> recorder = CheckpointRecorder()
        >>> recorder.attach(model, opt)
        >>> for idx in torch.arange(8).split(4) * 3:
        ...     opt.zero_grad(); F.cross_entropy(model(x[idx]), y[idx]).backward(); opt.step()
        ...     recorder.record_step(idx)
        >>> recipe = recorder.recipe(model.eval())
        >>> attr = UnrolledAttributor(Task(model), recipe=recipe).fit((x, y))
        >>> attr.attribute((x[:2], y[:2])).shape
        (2, 8)
    """

    method_id = "unrolled"
    Config = UnrolledConfig
    config: UnrolledConfig
    # Group scores would be sums of example scores (the metagradient is linear in the
    # weights), but the shared group loop works on train features, which this method has none of.
    supports_groups = False
    replays_training = True

    def __init__(
        self,
        task: Task,
        *,
        recipe: TrainingRecipe | Sequence[TrainingRecipe] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task, **kwargs)
        if self._store_path is not None:
            raise ConfigError(
                f"unrolled keeps no train features to store (its fitted state is "
                f"O(sqrt(steps)) replay states in memory); got store={str(self._store_path)!r}. "
                "Drop store=."
            )
        if recipe is None:
            raise ConfigError(
                "unrolled replays the training run and needs its recipe: pass recipe= (a "
                "datatrace.replay.TrainingRecipe, recorded in your loop with "
                "CheckpointRecorder.attach/record_step/recipe, or from a bench setting's "
                "train_recipe())."
            )
        recipes = [recipe] if isinstance(recipe, TrainingRecipe) else list(recipe)
        bad = [type(r).__name__ for r in recipes if not isinstance(r, TrainingRecipe)]
        if bad or not recipes:
            raise ConfigError(
                f"recipe= must be a TrainingRecipe or a non-empty sequence of them (one per "
                f"member); got {bad or 'an empty sequence'}."
            )
        self._recipes = recipes

    def _store_config(self) -> dict[str, Any]:
        # the scores' config says which run they differentiate (no tensors)
        return {**super()._store_config(), "recipes": [r.to_json() for r in self._recipes]}

    # ------------------------------------------------------------------ fit: replay and check
    def _recomputes_train_features(self, members: Sequence[Member]) -> bool:
        if len(self._recipes) != len(members):
            raise ConfigError(
                f"got {len(self._recipes)} recipe(s) for {len(members)} member(s); pass one "
                "recipe per member (the run that produced it)."
            )
        return True  # there are no train features: scores come from the reverse pass

    def _fit_member(self, ctx: MemberContext[UnrolledState]) -> UnrolledState:
        recipe = self._recipes[ctx.index]
        replay = Replay(ctx.task, recipe, self._train)
        steps = recipe.num_steps
        every = self.config.segment_steps or max(1, math.isqrt(max(steps - 1, 0)) + 1)
        final = replay.run(keep_every=every)
        # The check is on the recorded run (every weight 1). A run at another weight is a
        # different trajectory, replayed by the same (now verified) steps.
        self._check_replay(ctx, recipe, replay, final)
        if self.config.weight != 1:
            final = replay.run(keep_every=every, weights=self._weights(ctx.task))
        return UnrolledState(replay=replay, saved=replay.kept, final=final, segment_steps=every)

    def _weights(self, task: Task) -> torch.Tensor:
        """``(n_train,)``: every example's loss weight at the point of differentiation."""
        return torch.full(
            (self._n_train,), float(self.config.weight), dtype=task.dtype, device=task.device
        )

    def _check_replay(
        self,
        ctx: MemberContext[UnrolledState],
        recipe: TrainingRecipe,
        replay: Replay,
        final: ReplayState,
    ) -> None:
        """Refuse a replay whose final weights are not the recorded ones (or the model's)."""
        replayed = replay.state_dict(final)
        refs = [("the model being attributed", ctx.state)]
        if recipe.final_state is not None:
            refs.insert(0, ("the recipe's recorded final weights", dict(recipe.final_state)))
        tol = self.config.replay_tolerance
        for what, ref in refs:
            worst, where, scale = 0.0, "", 0.0
            for name, value in replayed.items():
                if name not in ref:
                    raise ModelError(f"{what} lack {name!r}, which the replayed model has.")
                r = ref[name].to(device=value.device, dtype=value.dtype)
                if not value.is_floating_point():
                    if not torch.equal(value, r):
                        worst, where = math.inf, name
                    continue
                diff = float((value.detach() - r).abs().max()) if value.numel() else 0.0
                scale = max(scale, float(r.abs().max()) if r.numel() else 0.0)
                if diff > worst:
                    worst, where = diff, name
            relative = worst / scale if scale > 0 else worst
            if relative > tol or math.isnan(relative):
                raise ModelError(
                    f"replaying the recipe ({recipe.num_steps} steps, "
                    f"{recipe.optimizer.kind}) does not reproduce {what} (member {ctx.index}): "
                    f"{where!r} differs by up to {worst:.3g} (relative {relative:.3g}, "
                    f"replay_tolerance={tol:g}). The run must be replayable as recorded: the "
                    "same initial weights, per-step indices and learning rates, the task's loss "
                    f"with reduction={recipe.reduction!r}, no gradient clipping or accumulation, "
                    "seeds for dropout/augmentation, deterministic kernels. If only float "
                    "rounding differs (e.g. GPU kernels), pass replay_tolerance=."
                )

    # ------------------------------------------------------------------ scoring
    def _score_blocks(
        self, queries: Any, local: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_fitted()
        self.task.check_eval_mode()
        distributed.check_same_queries(queries, self.config.batch_size)
        self.task.check_data(queries, self.config.batch_size, "query")
        per_member = []
        for member_ctx in self._contexts:
            with self._member_scope(member_ctx) as ctx:
                per_member.append(self._metagradient_scores(ctx, queries))
        values = self._aggregate(per_member, 0)
        bounds = list(range(0, self._n_train, self.config.batch_size))
        lo, hi = distributed.local_range(len(bounds)) if local else (0, len(bounds))
        for start in bounds[lo:hi]:
            stop = min(start + self.config.batch_size, self._n_train)
            yield torch.arange(start, stop), finite_or_raise(values[:, start:stop], "scores", start)

    def self_attribute(self) -> torch.Tensor:
        """``(n_train,)``: each training example's score for itself as the query.

        One reverse pass with every training example as a query (the cost of
        ``attribute(train)``).
        """
        self._check_fitted()
        n = self._n_train
        with self._fitted_device():
            rows = take_examples(self._train, torch.arange(n))
            values = torch.cat([v for _, v in self._score_blocks(rows)], 1)
        return values.diagonal().clone()

    def _metagradient_scores(self, ctx: MemberContext[UnrolledState], queries: Any) -> torch.Tensor:
        """``(n_query, n_train)`` scores ``-∂f_q/∂w_i`` by checkpointed reverse mode."""
        replay, saved = ctx.fitted.replay, ctx.fitted.saved
        final, every = ctx.fitted.final, ctx.fitted.segment_steps
        task = ctx.task
        dtype = task.working_dtype
        chunks = [
            self._query_adjoint(task, replay, final, b)
            for b in iter_batches(queries, self.config.batch_size)
        ]
        sizes = [int(c[0].shape[0]) for c in chunks]
        out = torch.zeros(sum(sizes), self._n_train, dtype=dtype, device=task.device)
        offsets = [sum(sizes[:c]) for c in range(len(sizes))]
        for start in sorted(saved, reverse=True):
            stop = min(start + every, replay.recipe.num_steps)
            leaves = [t.detach().requires_grad_(True) for t in saved[start].tensors()]
            weights = self._weights(task).requires_grad_(True)
            with torch.enable_grad():
                state = saved[start].with_tensors(leaves)
                for _ in range(start, stop):
                    state = replay.step(state, weights, create_graph=True)
                outputs = state.tensors()
                for c, adjoint in enumerate(chunks):
                    grads = self._pull_back(
                        outputs, [*leaves, weights], adjoint, retain=c < len(chunks) - 1
                    )
                    chunks[c] = grads[:-1]
                    out[offsets[c] : offsets[c] + sizes[c]] -= grads[-1].to(dtype)
        return out

    def _query_adjoint(
        self, task: Task, replay: Replay, final: ReplayState, batch: Any
    ) -> list[torch.Tensor]:
        """``∇f_q`` at the replayed final state for each query of ``batch``, in the layout of
        :meth:`ReplayState.tensors` (zero for the optimizer slots)."""
        params = [p.detach().requires_grad_(True) for p in final.params]
        full = {**replay.frozen, **dict(zip(replay.recipe.params, params))}
        with torch.enable_grad():
            split = task.split_batch(batch)
            objective = task.query_objective_from_outputs(task.outputs(full, split), split)
            q = objective.shape[0]
            eye = torch.eye(q, dtype=objective.dtype, device=objective.device)
            if self.config.query_batching == "vmap":
                grads = torch.autograd.grad(
                    objective,
                    params,
                    eye,
                    is_grads_batched=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            else:
                rows = [
                    torch.autograd.grad(
                        objective,
                        params,
                        e,
                        retain_graph=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                    for e in eye
                ]
                grads = tuple(torch.stack(r) for r in zip(*rows))
        slots = [
            torch.zeros(q, *t.shape, dtype=t.dtype, device=t.device)
            for t in final.tensors()[len(params) :]
        ]
        return [g.detach() for g in grads] + slots

    def _pull_back(
        self,
        outputs: list[torch.Tensor],
        inputs: list[torch.Tensor],
        adjoint: list[torch.Tensor],
        retain: bool,
    ) -> list[torch.Tensor]:
        """``(∂outputs/∂inputs)ᵀ adjoint`` for each of the ``q`` stacked adjoints."""
        if self.config.query_batching == "vmap":
            grads = torch.autograd.grad(
                outputs,
                inputs,
                adjoint,
                retain_graph=retain,
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
            return [g.detach() for g in grads]
        q = adjoint[0].shape[0]
        rows = [
            torch.autograd.grad(
                outputs,
                inputs,
                [a[j] for a in adjoint],
                retain_graph=retain or j < q - 1,
                allow_unused=True,
                materialize_grads=True,
            )
            for j in range(q)
        ]
        return [torch.stack([r[k] for r in rows]).detach() for k in range(len(inputs))]
