"""The shared attribution loop (DESIGN.md §1, §4).

A method declares three things: how it featurizes training examples, how it transforms query
features, and how the two combine (an inner product, by default). The loop owns everything
else: batching, ensemble members and their checkpoints, projections, the on-disk store with
resume, streaming over train shards, top-k and self-attribution.

For every member ``m``: ``scores_m = transform_m(Q_m) @ F_m^T`` where ``F_m`` holds the train
features and ``Q_m`` the query features; members are then aggregated (mean by default).

With ``groups=`` the units are groups of training examples (:mod:`datatrace.group`): the loop
visits the training set in group order, whole groups per chunk, and a method's train features
become group features: ``_features`` returns projected gradients of each group's summed
objective (one row per group), added up over the batches of a group that spans several.
Train features must therefore be linear in the example's gradient; a non-linear step (e.g.
Grad-Cos's normalisation) belongs in ``_finish_train_features``, applied to whole units.

Recomputed train features: a method may declare (:meth:`Attributor._recomputes_train_features`)
that a fit keeps no train features at all. ``fit`` then featurizes nothing, and every
scoring pass (``attribute``, ``topk``, ``self_attribute``, per-module scores) recomputes each
block from its training batch (or chunk of groups) at the member's state: the same batches,
blocks and unit offsets the stored shards would have, so the scores are the same, for one
more gradient pass per scoring call instead of the memory or disk the features take.

Under ``torchrun`` (:mod:`datatrace.distributed`, docs/distributed.md) each rank featurizes a
contiguous slice of the batches (global shard indices), the features are shared so every rank
fits the same state, and each rank scores its slice of the shards; every rank returns the
full result. Queries must be the same on every rank.

Devices and dtypes (DESIGN.md §6, :mod:`datatrace.devices`): the loop runs on the task's
model's device (``device=`` moves the model there, in place, when ``fit`` starts) and moves
every batch to it. Features are computed in the model's dtype and kept (in memory and in the
store) in ``feature_dtype`` (default: the model's dtype); they are upcast to the task's
working dtype (float32 for half-precision models) before any curvature, kernel or score, so
methods never see half-precision features. Scores are returned on the model's device in the
working dtype.

The pieces: :mod:`datatrace.methods.config` (settings every method shares),
:mod:`datatrace.methods.context` (what a method sees of a member),
:mod:`datatrace.methods.hooks` (what a method overrides), :mod:`datatrace.methods.loop` (the
shared loop), :mod:`datatrace.methods.registry` (ids to classes); this module holds the
public :class:`Attributor` and re-exports the names methods import.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from typing_extensions import Self

from datatrace import distributed
from datatrace._checks import finite_or_raise
from datatrace._progress import progress_bar
from datatrace.data import as_data, iter_batches, num_batches, num_examples
from datatrace.devices import resolve_device
from datatrace.ensemble import member_fingerprint, member_states, resolve_members
from datatrace.errors import ConfigError, DataError
from datatrace.group import Grouping, check_groups_spec, resolve_groups
from datatrace.methods.config import RESULT_NEUTRAL, MethodConfig
from datatrace.methods.context import FeatureForm, FormChoice, FormDemand, MemberContext, StateT
from datatrace.methods.loop import SharedLoop
from datatrace.methods.registry import (
    METHODS,
    make_attributor,
    register,
    register_method,
    unregister_method,
)
from datatrace.projection import make_projector
from datatrace.scores import Scores, TopK
from datatrace.store import Store, fingerprint_batch
from datatrace.task import Member, Task

__all__ = [
    "METHODS",
    "Attributor",
    "FeatureForm",
    "FormChoice",
    "FormDemand",
    "MemberContext",
    "MethodConfig",
    "finite_or_raise",
    "make_attributor",
    "register",
    "register_method",
    "unregister_method",
]

_PROBE_EXAMPLES = 4  # training examples whose losses and outputs identify the model's code


class Attributor(SharedLoop[StateT]):
    """Base class of every attribution method (see the module docstring).

    Subclasses set ``method_id`` and ``Config``, declare their per-member state (a frozen
    dataclass, the type argument: ``Attributor[MyState]``) and implement
    :meth:`~datatrace.methods.hooks.MethodHooks._fit_member`, which returns it. Traits the
    bench and the tests read are class attributes: ``supports_groups``, ``replays_training``,
    ``reads_trajectory``, ``target_kind`` and :meth:`layer_params_only`; the train-feature
    forms a method scores (:meth:`~datatrace.methods.hooks.MethodHooks.feature_forms`) are
    its declared needs, from which the loop decides each fit's form (``ctx.form``).

    Args:
        task: the :class:`~datatrace.task.Task`.
        members: ensemble members (DESIGN.md §4); default: the task's model.
        store: a store directory for features and fitted state (resumable).
        shard_bytes: target bytes of one store shard of train features (default
            :data:`datatrace.store.SHARD_BYTES`, 64 MiB): the loop packs the features of
            consecutive training examples, computed ``batch_size`` at a time, into shards of
            this size, so the shard layout does not depend on the batch size. A killed ``fit``
            resumes from its last complete shard. Not a method setting: changing it reuses
            the store, recomputing the shards (their example ranges change).
        overwrite: if true, a ``store`` written for another config, model, training set or
            format version (or a corrupt one) is cleared at ``fit`` and recomputed, instead
            of refused; a store that matches is still resumed. Like ``device``, not a method
            setting: it never enters a store's config.
        groups: attribute to groups of training examples (:mod:`datatrace.group`).
        device: where to run: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a
            ``torch.device`` (checked here). ``fit`` moves the task's model there **in
            place**, and later calls move it back if it was moved elsewhere. Default: the
            model's device at ``fit``; the fitted state stays there, and moving the model
            afterwards is refused. Not a method setting: it never enters a store's config,
            so a store written on a GPU is reused on the CPU and vice versa.
        **settings: the method's :attr:`Config` fields (e.g. ``feature_dtype``).

    Example:
        >>> from datatrace import GradDotAttributor, Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> attr = GradDotAttributor(Task(model), device="cpu", feature_dtype="bfloat16")
        >>> attr.fit(train).attribute(train).values.dtype
        torch.float32
    """

    supports_groups: ClassVar[bool] = True
    # A method that replays the recorded training run (``unrolled``) needs its recipe
    # (``recipe=``) and keeps no train features, so it has no store to resume; the
    # conformance suites build it from a recorded run (tests/methods/test_unrolled.py).
    replays_training: ClassVar[bool] = False
    # A method that reads every checkpoint of a member's trajectory (TracIn, Source); the
    # others read the final weights only.
    reads_trajectory: ClassVar[bool] = False
    # The target the method's features are defined for, and that a task built for it
    # should measure (``Task(target=...)``): ``"margin"`` for TRAK (its output function),
    # ``"loss"`` for the others.
    target_kind: ClassVar[str] = "loss"

    @classmethod
    def layer_params_only(cls, settings: Mapping[str, Any]) -> bool:
        """Whether the method, with these settings, describes Linear/Conv layers only
        (K-FAC factors): on a model with other parameters it attributes through the
        layers' parameters (``Task(module_types=...)``), as kronfluence does."""
        return False

    def __init__(
        self,
        task: Task,
        *,
        members: Sequence[Any] | None = None,
        store: str | Path | None = None,
        shard_bytes: int | None = None,
        overwrite: bool = False,
        groups: Any = None,
        device: str | torch.device | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigError(
                f"the first argument must be a datatrace.Task; got {type(task).__name__}."
            )
        valid = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} got unknown setting(s) {unknown}; valid settings: {valid}."
            )
        self.task = task
        self.name = self.method_id  # the registry id it was built under (make_attributor sets it)
        self._device_arg = resolve_device(device)  # moves the model in fit, not here
        self._device: torch.device | None = None  # where the fitted state lives
        self.config = self.Config(**settings)
        if self.config.projector != "none":  # validate projector settings now, not in fit()
            make_projector(self.config.projector, self.config.proj_dim, seed=self.config.seed)
        self._members_arg = members
        if groups is not None and not self.supports_groups:
            raise ConfigError(
                f"{type(self).__name__} cannot attribute to groups; got groups={groups!r}. Drop "
                "groups=, or sum its per-example scores over each group."
            )
        self._groups_arg = check_groups_spec(groups)  # validated now, resolved in fit
        self._grouping: Grouping | None = None
        self._n_units = 0
        self._store_path = Path(store) if store is not None else None
        if shard_bytes is not None and (
            isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1
        ):
            raise ConfigError(
                f"shard_bytes must be an integer >= 1 (bytes per store shard) or None; got "
                f"{shard_bytes!r}."
            )
        self._shard_bytes = shard_bytes
        if not isinstance(overwrite, bool):
            raise ConfigError(f"overwrite must be True or False; got {overwrite!r}.")
        if overwrite and store is None:
            raise ConfigError(
                "overwrite=True clears a stale store= directory, but no store= was given; pass "
                "store=<directory> as well, or drop overwrite=."
            )
        self._overwrite = overwrite
        self._contexts: list[MemberContext[StateT]] = []
        self._shard_rows: dict[int, int] = {}
        self._recompute = False  # set by fit: train features recomputed when scoring
        self._train: Any = None
        self._n_train = 0
        self.store: Store | None = None
        # fit decides each member's train-feature form; what rules out the only form the
        # settings admit (groups=, a projector, the engine, the model's layers) fails now
        self._feature_form(self.task)

    # ------------------------------------------------------------------ public API
    def fit(self, train: Any) -> Self:
        """Featurize ``train`` for every member and do the per-train-set work once.

        With ``device=`` the task's model is first moved there in place. ``train`` may live
        on any device: batches are moved to the model's.
        """
        if self._device_arg is not None:
            self.task.to(self._device_arg)
        self._device = self.task.device
        with self.task.moving_batches():
            self._fit(train)
        return self

    def _fit(self, train: Any) -> None:
        self.task.check_eval_mode()
        train = as_data(train)  # e.g. a datasets.Dataset, with rows as tensors, once
        n = num_examples(train)
        if n == 0:
            raise DataError("the training set is empty; attribution needs at least one example.")
        self.task.check_data(train, self.config.batch_size, "training")
        members = resolve_members(self.task, self._members_arg)
        self._train, self._n_train = train, n
        self._grouping = resolve_groups(self._groups_arg, train, self.task)
        self._n_units = n if self._grouping is None else self._grouping.n_groups
        if distributed.is_distributed():
            distributed.check_same(
                (n, self._n_units, num_batches(train, self.config.batch_size), len(members)),
                "the training sets (examples, units, batches, members)",
                "pass the same training data, groups= and members= on every rank.",
            )
        if self._store_path is not None:
            self.store = distributed.open_store(
                self._store_path,
                config=self._store_config(),
                fingerprints=self._fingerprints(members),
                overwrite=self._overwrite,
                probes=self._probes(members, train),
                probe_rtol=self._probe_rtol(),
            )
        try:
            self._fit_members(members, train)
        finally:
            if self.store is not None:
                self.store.close()  # the writer lock: reads go on, other processes may write

    def attribute(self, queries: Any) -> Scores:
        """Scores ``(n_query, n_units)``; positive = training on the unit improves the query.

        Units are training examples, or groups (``unit_ids`` = group ids) with ``groups=``.
        ``values`` are on the model's device, in the task's working dtype (the model's dtype,
        float32 for a half-precision model); ``unit_ids`` and ``query_ids`` are on the CPU.
        """
        ids, blocks = [], []
        with self._fitted_device():
            for unit_ids, block in self._score_blocks(queries, local=True):
                ids.append(unit_ids)
                blocks.append(block)
        values, unit_ids = distributed.gather_score_blocks(blocks, ids)
        return Scores(values.to(self.task.device), unit_ids, None, self.name, self.describe())

    def topk(self, queries: Any, k: int) -> TopK:
        """Top-``k`` proponents/opponents per query, streaming over train shards."""
        with self._fitted_device():
            return distributed.topk_blocks(self._score_blocks(queries, local=True), k)

    def self_attribute(self) -> torch.Tensor:
        """``(n_units,)`` self-influence of each training unit (mislabel detection), on the
        model's device in the working dtype."""
        self._check_fitted()
        self._check_cost(self._n_units)
        with self._fitted_device():
            task = self.task
            total = torch.zeros(0, dtype=task.working_dtype, device=task.device)
            for m, member_ctx in enumerate(self._contexts):
                # self-scores may apply curvature (influence): in the member's scope
                with self._member_scope(member_ctx) as ctx:
                    blocks = progress_bar(
                        self._iter_train_features(ctx, local=True),
                        desc=self._phase("self-influence", ctx),
                        enabled=self.config.progress,
                        total=self._count_train_blocks(ctx, local=True),
                        unit="block",
                    )
                    parts = [
                        self._self_scores(ctx, block, start).to(total) for start, block in blocks
                    ]
                part = torch.cat(parts) if parts else total
                total = part if m == 0 else total + part
        finite_or_raise(total, "self-attribution scores", 0)
        # this rank's units (a contiguous run, maybe empty), gathered in rank order
        return distributed.all_gather_rows(total).to(self.task.device) / len(self._contexts)

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the method and its settings."""
        out = self._store_config()
        out["config"] = self.config.to_json()
        return out

    @property
    def recomputes_train_features(self) -> bool:
        """Whether the last ``fit`` kept no train features (in memory or in the store), so
        that each scoring call recomputes them batch by batch."""
        return self._recompute

    @property
    def grouping(self) -> Grouping | None:
        """The fitted grouping (None without ``groups=`` or before ``fit``)."""
        return self._grouping

    # ------------------------------------------------------------------ loop internals
    def _store_config(self) -> dict[str, Any]:
        config = self.config.to_json()
        for name in RESULT_NEUTRAL:  # a store written at batch size 64 serves 32 too
            config.pop(name, None)
        out = {"method": self.name, "config": config, "task": self.task.config()}
        if self._grouping is not None:
            out["groups"] = self._grouping.describe()
        return out

    def _fingerprints(self, members: list[Member]) -> dict[str, str]:
        # the sizes: a shrunk training set must not score against the old shards' units
        fps = {"n_train": str(self._n_train), "n_units": str(self._n_units)}
        for i, m in enumerate(members):
            fps[f"member{i}"] = member_fingerprint(self.task, m)
        return fps

    def _probes(self, members: list[Member], train: Any) -> dict[str, list[float]]:
        """Per member: the training loss, query objective and output sums of the first
        training examples, at the member's final state (compared with tolerance).

        Weights fingerprint the parameters, not the code: a changed forward function (ReLU
        to Tanh), loss (even under the same ``__name__``), target or ``batch_to_inputs``
        changes these numbers while the weights stay the same.
        """
        batch = next(iter(iter_batches(train, _PROBE_EXAMPLES)))
        # named after its inputs: other first examples give a probe that is not compared
        # (their shard is recomputed anyway) but replaces the stored one
        inputs = fingerprint_batch(batch)[:16]
        out = {}
        for i, member in enumerate(members):
            with self._member_task(member) as task, torch.no_grad():
                state = member_states(task, member)[-1][1]
                split = task.split_batch(batch)
                outputs = task.outputs(state, split)
                rows = outputs.detach().to(torch.float64).reshape(outputs.shape[0], -1)
                values = [task.loss_from_outputs(outputs, split), rows.sum(1), rows.pow(2).sum(1)]
                # a target that cannot take training batches is still named in the config
                with contextlib.suppress(Exception):
                    values.append(task.query_objective_from_outputs(outputs, split))
            out[f"member{i}-{inputs}"] = torch.cat(
                [v.detach().double().reshape(-1) for v in values]
            ).tolist()
        return out

    def _probe_rtol(self) -> float:
        """Probe tolerance: stores move between devices, whose arithmetic differs slightly."""
        return min(1e-2, max(1e-6, 1000 * torch.finfo(self.task.dtype).eps))
