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
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader
from typing_extensions import Self

from datatrace import distributed
from datatrace._progress import progress_bar
from datatrace.data import (
    Batch,
    as_data,
    batch_size_of,
    iter_batch_range,
    iter_batches,
    num_batches,
    num_examples,
)
from datatrace.devices import FEATURE_DTYPES, check_feature_dtype, resolve_device
from datatrace.ensemble import member_fingerprint, member_scope, member_states, resolve_members
from datatrace.errors import (
    ConfigError,
    CostWarning,
    DataError,
    ModelError,
    NotFittedError,
    NumericalError,
    warn,
)
from datatrace.gradients import (
    PerSampleGrads,
    compute_group_grads,
    compute_per_sample_grads,
    group_members,
)
from datatrace.group import Grouping, check_groups_spec, resolve_groups, take_examples
from datatrace.projection import Projector, ProjectorKind, make_projector
from datatrace.scores import Scores, TopK
from datatrace.store import (
    RowsFingerprint,
    Store,
    fingerprint_batch,
    fingerprint_tensors,
    rows_per_shard,
)
from datatrace.task import Checkpoint, Member, Task

__all__ = ["METHODS", "Attributor", "MemberContext", "MethodConfig", "make_attributor", "register"]

# settings that do not change results: left out of a store's config, so changing them reuses it
_RESULT_NEUTRAL = ("batch_size", "progress")
_PROBE_EXAMPLES = 4  # training examples whose losses and outputs identify the model's code
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method shares.

    Attributes:
        batch_size: examples per batch when datatrace batches the data itself.
        engine: per-sample gradient engine: ``"auto"`` (hooks for Linear/Conv2d, functional
            for the rest), ``"hooks"`` or ``"functional"``.
        projector: random projection of gradients: ``"none"``, ``"gaussian"``,
            ``"rademacher"``, ``"sjlt"`` or ``"factored"`` (per-layer, LoGra-style).
        proj_dim: projected dimension (for ``"factored"``: features per layer, a perfect square).
        seed: seed of the projections (combined with the member index).
        progress: progress bars on the long phases (featurization, curvature passes, solver
            iterations, scoring, self-influence): True, False, or None (default) to show
            them where stderr is a terminal. ``DATATRACE_PROGRESS=0`` (or ``TQDM_DISABLE``)
            turns them off everywhere (docs/conventions.md). A display option: it never
            enters a store's config and configs equal but for it compare equal.
        feature_dtype: dtype in which train features are kept, in memory and in store
            shards: ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"`` (a
            ``torch.dtype`` is accepted and stored by name) or None (default: the model's
            dtype). Features are upcast to the working dtype when scored; a half type halves
            their memory and bytes stored (docs/devices.md gives its LDS change).
    """

    batch_size: int = 64
    engine: Literal["auto", "hooks", "functional"] = "auto"
    projector: ProjectorKind = "none"
    proj_dim: int = 1024
    seed: int = 0
    progress: bool | None = field(default=None, compare=False)
    feature_dtype: Literal["float16", "bfloat16", "float32", "float64"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {self.batch_size!r}.")
        if self.engine not in ("auto", "hooks", "functional"):
            raise ConfigError(
                f"engine must be 'auto', 'hooks' or 'functional'; got {self.engine!r}."
            )
        if self.projector not in ("none", "gaussian", "rademacher", "sjlt", "factored"):
            raise ConfigError(
                f"projector must be one of 'none', 'gaussian', 'rademacher', 'sjlt', 'factored'; "
                f"got {self.projector!r}."
            )
        if not isinstance(self.proj_dim, int) or self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be an integer >= 1; got {self.proj_dim!r}.")
        if self.progress not in (None, True, False):
            raise ConfigError(f"progress must be True, False or None; got {self.progress!r}.")
        # frozen: store the normalised name (a torch.dtype is not JSON)
        object.__setattr__(self, "feature_dtype", check_feature_dtype(self.feature_dtype))

    def to_json(self) -> dict[str, Any]:
        """JSON-able settings; ``type(self)(**to_json())`` rebuilds an equal config.

        ``progress`` is left out: it changes what is shown, not what is computed.
        """
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        del out["progress"]
        if out["feature_dtype"] is None:
            # left out at its default, so stores written before the setting existed still match
            del out["feature_dtype"]
        return out


@dataclass
class MemberContext:
    """What a method sees of one ensemble member."""

    index: int
    member: Member
    checkpoints: list[Checkpoint | None]
    states: list[dict[str, torch.Tensor]]
    projector: Projector | None
    fitted: dict[str, Any] = field(default_factory=dict)
    features: list[torch.Tensor] = field(default_factory=list)  # in-memory train shards
    # (G, k) batch indices of each group's members while a grouped train batch is featurized
    unit_members: torch.Tensor | None = None
    # training-set indices of the examples of the train batch being featurized
    batch_indices: torch.Tensor | None = None
    # rows of each per-example store shard (set when a store's shards are written or resumed)
    rows_per_shard: int | None = None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The member's final state."""
        return self.states[-1]


class Attributor(ABC):
    """Base class of every attribution method (see the module docstring).

    Subclasses set ``method_id`` and ``Config`` and implement :meth:`_fit_member`. A method
    that cannot attribute to groups sets ``supports_groups = False``; one that replays the
    training run, ``replays_training = True``.

    Args:
        task: the :class:`~datatrace.task.Task`.
        members: ensemble members (DESIGN.md §4); default: the task's model.
        store: a store directory for features and fitted state (resumable).
        shard_bytes: target bytes of one store shard of train features (default
            :data:`datatrace.store.SHARD_BYTES`, 128 MiB): the loop packs the features of
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

    method_id: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    supports_groups: ClassVar[bool] = True
    # A method that replays the recorded training run (``unrolled``) needs its recipe
    # (``recipe=``) and keeps no train features, so it has no store to resume; the
    # conformance suites build it from a recorded run (tests/methods/test_unrolled.py).
    replays_training: ClassVar[bool] = False
    # A method that reads every checkpoint of a member's trajectory (TracIn, Source); the
    # others read the final weights only.
    reads_trajectory: ClassVar[bool] = False

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
        self._contexts: list[MemberContext] = []
        self._recompute = False  # set by fit: train features recomputed when scoring
        self._active_member: Member | None = None  # the member whose scope is entered
        self._train: Any = None
        self._n_train = 0
        self.store: Store | None = None

    # ------------------------------------------------------------------ hooks for methods
    def _features(
        self, ctx: MemberContext, batch: Batch, which: str, state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per-unit gradients of ``which`` at ``state``, projected by the member's projector.

        Per-sample gradients, or while a grouped train batch is featurized, the gradients of
        each group's summed objective (one row per group; see the module docstring).
        """
        return self._project(ctx, self._unit_grads(ctx, batch, which, state))

    def _project(self, ctx: MemberContext, psg: PerSampleGrads) -> torch.Tensor:
        """Rows of ``psg``, projected by the member's projector (flattened without one)."""
        if ctx.projector is None:
            return psg.flat()
        return ctx.projector.project(psg)

    def _train_features(self, ctx: MemberContext, batch: Batch) -> torch.Tensor:
        """``(B, d)`` features of training examples (default: training-loss gradients)."""
        return self._features(ctx, batch, "loss", ctx.state)

    def _query_features(self, ctx: MemberContext, batch: Batch) -> torch.Tensor:
        """``(B, d)`` features of queries (default: gradients of the query objective)."""
        return self._features(ctx, batch, "query", ctx.state)

    def _unit_grads(
        self, ctx: MemberContext, batch: Batch, which: str, state: Mapping[str, torch.Tensor]
    ) -> PerSampleGrads:
        """Unprojected per-sample gradients, or per-group ones while groups are featurized."""
        if ctx.unit_members is None:
            return compute_per_sample_grads(
                self.task, batch, state=state, which=which, engine=self.config.engine
            )
        return compute_group_grads(
            self.task, batch, ctx.unit_members, state=state, which=which, engine=self.config.engine
        )

    def _finish_train_features(self, ctx: MemberContext, features: torch.Tensor) -> torch.Tensor:
        """Non-linear step on complete units' train features (default: none)."""
        return features

    def _join_query_features(self, ctx: MemberContext, feats: list[torch.Tensor]) -> torch.Tensor:
        """One tensor of query features from the batches' (default: concatenated rows)."""
        return torch.cat(feats, 0)

    @abstractmethod
    def _fit_member(self, ctx: MemberContext) -> None:
        """Per-train-set work after featurization (curvature, kernels); fills ``ctx.fitted``."""

    def _transform_queries(self, ctx: MemberContext, q: torch.Tensor) -> torch.Tensor:
        """Map query features to the space train features are scored in (default: identity)."""
        return q

    def _combine(
        self, ctx: MemberContext, q: torch.Tensor, train: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Scores ``(n_query, n_block)`` of transformed queries against a train feature block."""
        return q @ train.T

    def _aggregate(self, blocks: list[torch.Tensor], start: int) -> torch.Tensor:
        """Combine members' score blocks (default: mean)."""
        return torch.stack(blocks).mean(0)

    def _self_scores(self, ctx: MemberContext, train: torch.Tensor, start: int) -> torch.Tensor:
        """Self-attribution of a train feature block (default: its own transformed inner product)."""
        return (self._transform_queries(ctx, train) * train).sum(1)

    def _cost_warning(self, n_rhs: int | None) -> str | None:
        """A one-line estimate of work about to start, to issue as a ``CostWarning``, or None.

        Called by :meth:`fit` once the training set and members are resolved, before any
        featurization (``n_rhs`` None), and by every scoring call before its queries are
        featurized, with the number of right-hand sides (queries; units for
        :meth:`self_attribute`). Default: never (methods whose cost can explode override it).
        """
        return None

    def _check_cost(self, n_rhs: int | None) -> None:
        message = self._cost_warning(n_rhs)
        if message is not None:
            warn(message, CostWarning)

    def _recomputes_train_features(self, members: Sequence[Member]) -> bool:
        """Whether this fit keeps no train features, scoring recomputing them (default: no).

        Called by :meth:`fit` once the training set, groups, members and store are resolved.
        When True, ``fit`` featurizes nothing (so :meth:`_fit_member` must not read train
        features) and :meth:`_iter_train_features` recomputes each block from its training
        batch at the member's state (see the module docstring).
        """
        return False

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

    def _fit_members(self, members: list[Member], train: Any) -> None:
        self._recompute = self._recomputes_train_features(members)
        _log.info(
            "%s: fit on %d training examples (%d units, %d member(s))%s",
            self.name,
            self._n_train,
            self._n_units,
            len(members),
            "; train features recomputed at each scoring call" if self._recompute else "",
        )
        self._contexts = []
        self._check_cost(None)
        for index, member in enumerate(members):
            with self._member_task(member):
                pairs = member_states(self.task, member)
                for checkpoint, state in pairs:
                    where = "the model" if checkpoint is None else f"checkpoint {checkpoint.step}"
                    self.task.check_finite_state(state, f"{where} (member {index})")
                projector = None
                if self.config.projector != "none":
                    projector = make_projector(
                        self.config.projector,
                        self.config.proj_dim,
                        seed=self.config.seed,
                        member=index,
                    )
                ctx = MemberContext(
                    index, member, [c for c, _ in pairs], [s for _, s in pairs], projector
                )
                if not self._recompute:
                    self._featurize_train(ctx, train)
                self._fit_member(ctx)
            self._contexts.append(ctx)

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
            for m, ctx in enumerate(self._contexts):
                with self._member_task(ctx.member):  # self-scores may apply curvature (influence)
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
    def _check_fitted(self) -> None:
        if not self._contexts or self._device is None:
            raise NotFittedError(
                f"{type(self).__name__}.attribute/self_attribute was called before fit(); call "
                "attributor.fit(train) first."
            )

    @contextmanager
    def _fitted_device(self) -> Iterator[None]:
        """Inside: the model is on the device the fitted state lives on, batches move to it.

        With ``device=`` a model moved elsewhere since ``fit`` is moved back (in place);
        without it, that is refused: features and curvature cannot follow it silently.
        """
        self._check_fitted()
        assert self._device is not None
        if self.task.device != self._device:
            if self._device_arg is None:
                raise ModelError(
                    f"the model is on {self.task.device} but {type(self).__name__} was fitted on "
                    f"{self._device}, where its features and curvature live; move the model back "
                    f"(model.to({str(self._device)!r})), fit again, or pass device= to the "
                    "attributor to have it moved."
                )
            self.task.to(self._device)
        with self.task.moving_batches():
            yield

    @property
    def feature_dtype(self) -> torch.dtype:
        """The dtype train features are kept in (``feature_dtype``, else the model's)."""
        name = self.config.feature_dtype
        return self.task.dtype if name is None else FEATURE_DTYPES[name]

    def _store_config(self) -> dict[str, Any]:
        config = self.config.to_json()
        for name in _RESULT_NEUTRAL:  # a store written at batch size 64 serves 32 too
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
            with self._member_task(member), torch.no_grad():
                task = self.task
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

    @contextmanager
    def _member_task(self, member: Member) -> Iterator[None]:
        """Inside: ``self.task`` is the member's effective model (dropout masks, LoRA adapter).

        Re-entering the scope of the member already entered changes nothing (a dropout
        member's masks must not be applied twice).
        """
        if self._active_member is member:
            yield
            return
        base, outer = self.task, self._active_member
        with member_scope(base, member) as effective:
            self.task, self._active_member = effective, member
            try:
                yield
            finally:
                self.task, self._active_member = base, outer

    def _train_batches(self, local: bool) -> Iterator[tuple[int, int, Batch]]:
        """``(shard index, first example, batch)`` of each training batch (one shard each).

        With ``local=True`` this rank's contiguous slice of the batches (all of them in one
        process); shard indices stay global, so the store's layout does not depend on the
        world size.
        """
        count = num_batches(self._train, self.config.batch_size)
        lo, hi = distributed.local_range(count) if local else (0, count)
        batches = iter_batch_range(self._train, self.config.batch_size, lo, hi)
        for b, (offset, batch) in enumerate(batches, start=lo):
            yield b, offset, batch

    def _batch_train_features(self, ctx: MemberContext, offset: int, batch: Batch) -> torch.Tensor:
        """The rows of one per-example shard: train features of the batch at ``offset``."""
        try:
            ctx.batch_indices = torch.arange(offset, offset + batch_size_of(batch))
        except DataError:  # a batch whose size cannot be read: no indices
            ctx.batch_indices = None
        try:
            return self._unit_train_features(ctx, batch)
        finally:
            ctx.batch_indices = None

    def _featurize_train(self, ctx: MemberContext, train: Any) -> None:
        if self._grouping is not None:
            self._featurize_train_groups(ctx, train, self._grouping)
            return
        if self.store is not None:
            self._featurize_train_shards(ctx, self.store)
            self._share_train_features(ctx)
            return
        lo, hi = distributed.local_range(num_batches(train, self.config.batch_size))
        it = progress_bar(
            self._train_batches(local=True),
            desc=f"{self.name}: train features (member {ctx.index})",
            enabled=self.config.progress,
            total=hi - lo,
            unit="batch",
        )
        for _, offset, batch in it:
            ctx.features.append(self._batch_train_features(ctx, offset, batch))
        self._share_train_features(ctx)

    def _featurize_train_shards(self, ctx: MemberContext, store: Store) -> None:
        """Train features into store shards of about ``shard_bytes`` each.

        Shard ``s`` holds the rows of examples ``s * R .. (s + 1) * R - 1``, ``R`` rows of
        ``shard_bytes`` (from the row size of a stored shard, else of the first batch's
        features), whatever the batch size: the features are computed ``batch_size`` examples
        at a time, a batch cut by a shard boundary is featurized once and its rows split, and
        a shard is written once full. Resume granularity is the shard: a complete shard whose
        examples hash as recorded is skipped (its inputs are read, not featurized); a batch
        reaching into an incomplete shard is featurized whole, so a resumed run's shards are
        bit-identical to an uninterrupted run's.
        """
        kind = f"train-m{ctx.index}"
        offsets = self._batch_offsets()
        last: dict[int, torch.Tensor] = {}  # the latest featurized batch, by batch index

        def features(j: int, offset: int, batch: Batch) -> torch.Tensor:
            if j not in last:
                last.clear()
                last[j] = self._batch_train_features(ctx, offset, batch)
            return last[j]

        def probe() -> int:  # rank 0: bytes per row, from the store or the first batch
            row_bytes = store.row_bytes(kind)
            if row_bytes is None:
                _, offset, batch = next(self._train_batches_between(offsets, 0, 1))
                feats = features(0, offset, batch)
                row_bytes = feats[:1].numel() * feats.element_size()
            return row_bytes

        me = distributed.rank()
        row_bytes = distributed.run_collectively(lambda: probe() if me == 0 else 0)
        rows = rows_per_shard(distributed.broadcast_object(row_bytes), self._shard_bytes)
        ctx.rows_per_shard = rows
        n = offsets[-1]
        lo, hi = distributed.local_range(-(-n // rows))
        it = progress_bar(
            range(lo, hi),
            desc=f"{self.name}: train feature shards (member {ctx.index})",
            enabled=self.config.progress,
            unit="shard",
        )
        reused = 0
        for s in it:
            first, stop = s * rows, min(n, (s + 1) * rows)
            if store.has_shard(kind, s):  # complete: still ours if its examples are the same
                fp = RowsFingerprint()
                for _, offset, batch in self._train_batches_between(offsets, first, stop):
                    fp.update(_rows_of(batch, max(first, offset) - offset, stop - offset))
                if store.has_shard(kind, s, fp.hexdigest()):
                    reused += 1
                    continue
            fp, parts = RowsFingerprint(), []
            for j, offset, batch in self._train_batches_between(offsets, first, stop):
                a, b = max(first, offset) - offset, stop - offset  # rows of this shard
                fp.update(_rows_of(batch, a, b))
                parts.append(features(j, offset, batch)[a:b])
            block = parts[0] if len(parts) == 1 else torch.cat(parts)
            store.write_shard(kind, s, block, fp.hexdigest())
        if reused:
            _log.info(
                "%s: member %d: %d of %d train feature shards reused from the store at %s",
                self.name,
                ctx.index,
                reused,
                hi - lo,
                self._store_path,
            )

    def _batch_offsets(self) -> list[int]:
        """First example of every training batch, then the number of examples."""
        train = self._train
        if isinstance(train, DataLoader):
            sizes = [len(b) for b in train.batch_sampler]  # type: ignore[union-attr]
            out = [0]
            for size in sizes:
                out.append(out[-1] + size)
            return out
        n = num_examples(train)
        return [*range(0, n, self.config.batch_size), n]

    def _train_batches_between(
        self, offsets: list[int], first: int, stop: int
    ) -> Iterator[tuple[int, int, Batch]]:
        """``(batch index, first example, batch)`` of the batches holding examples
        ``first .. stop - 1`` (``offsets`` from :meth:`_batch_offsets`)."""
        lo = bisect.bisect_right(offsets, first) - 1
        hi = bisect.bisect_left(offsets, stop)
        batches = iter_batch_range(self._train, self.config.batch_size, lo, hi)
        for j, (offset, batch) in enumerate(batches, start=lo):
            yield j, offset, batch

    def _share_train_features(self, ctx: MemberContext) -> None:
        """Distributed: give every rank every shard, so all of them fit the same state.

        With a store, rank 0 merges the ranks' journals and the others reload the manifest;
        in memory, the blocks are all-gathered (every rank then holds all train features).
        """
        if not distributed.is_distributed():
            return
        if self.store is not None:
            distributed.sync_store(self.store)
        else:
            ctx.features = distributed.all_gather_blocks(ctx.features)

    def _unit_train_features(self, ctx: MemberContext, batch: Batch) -> torch.Tensor:
        feats = self._finish_train_features(ctx, self._train_features(ctx, batch)).detach()
        return self._to_feature_dtype(feats)

    def _to_feature_dtype(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats`` in the storage dtype; refuses float16 overflow rather than storing inf."""
        out = feats.to(self.feature_dtype)
        narrowed = out.dtype == torch.float16 and feats.dtype != torch.float16
        if narrowed and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(feats).all()):
            raise NumericalError(
                f"train features reach {float(feats.abs().max()):.3g}, beyond float16's range "
                "(65504), so feature_dtype='float16' would store inf; use "
                "feature_dtype='bfloat16' (float32's range) or None."
            )
        return out

    def _featurize_train_groups(self, ctx: MemberContext, train: Any, grouping: Grouping) -> None:
        """Group features, one chunk of whole groups (one shard) at a time.

        A chunk (one shard) holds about ``batch_size`` groups (``batch_size`` x the mean
        group size examples), as many rows as a per-example shard; its forward/backward
        passes take ``batch_size`` examples at a time (larger batches were slower, ~1.3x at
        16,384 examples: their activations leave the caches), a group cut by a batch
        boundary getting the sum of its two partial features.
        """
        kind = f"train-m{ctx.index}"
        chunks = list(self._group_chunks(grouping, local=True))
        it = progress_bar(
            chunks,
            desc=f"{self.name}: group features (member {ctx.index})",
            enabled=self.config.progress,
            unit="chunk",
        )
        for c, lo, hi, index_batches in it:
            batches = [take_examples(train, idx) for idx in index_batches]
            fp = ""
            if self.store is not None:
                h = hashlib.sha256(f"groups {lo}:{hi}".encode())
                for idx, batch in zip(index_batches, batches):
                    h.update(fingerprint_batch(batch).encode())
                    h.update(fingerprint_tensors([grouping.labels[idx]]).encode())
                fp = h.hexdigest()
                if self.store.has_shard(kind, c, fp):
                    continue
            feats = self._chunk_train_features(ctx, grouping, lo, hi, index_batches, batches)
            if self.store is not None:
                self.store.write_shard(kind, c, feats, fp)
            else:
                ctx.features.append(feats)
        self._share_train_features(ctx)

    def _group_chunks(
        self, grouping: Grouping, local: bool
    ) -> Iterator[tuple[int, int, int, list[torch.Tensor]]]:
        """``(shard index, first group, stop group, index batches)`` of each chunk of whole
        groups (one shard each); with ``local=True`` this rank's slice (global indices)."""
        mean_size = -(-grouping.n_train // grouping.n_groups)
        chunks = list(grouping.chunks(self.config.batch_size * mean_size, self.config.batch_size))
        first, last = distributed.local_range(len(chunks)) if local else (0, len(chunks))
        for c in range(first, last):
            yield (c, *chunks[c])

    def _chunk_train_features(
        self,
        ctx: MemberContext,
        grouping: Grouping,
        lo: int,
        hi: int,
        index_batches: Sequence[torch.Tensor],
        batches: Sequence[Batch],
    ) -> torch.Tensor:
        """The rows of one group shard: features of groups ``lo:hi``, partial sums added."""
        feats: torch.Tensor | None = None
        try:
            for idx, batch in zip(index_batches, batches):
                present, local = torch.unique(grouping.labels[idx], return_inverse=True)
                ctx.unit_members = group_members(local, int(present.numel()))
                ctx.batch_indices = idx
                # a group's partial sums in the working dtype, not in half precision
                part = self._train_features(ctx, batch).detach().to(self.task.working_dtype)
                if feats is None:
                    feats = part.new_zeros(hi - lo, part.shape[1])
                feats.index_add_(0, (present - lo).to(part.device), part)
        finally:
            ctx.unit_members = ctx.batch_indices = None
        assert feats is not None
        return self._to_feature_dtype(self._finish_train_features(ctx, feats).detach())

    def _iter_train_features(
        self, ctx: MemberContext, local: bool = False
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first unit, block)`` of the train features, in order, on the model's device and
        upcast to the working dtype.

        With ``local=True`` under a distributed group, only this rank's contiguous slice of
        the blocks (the shards it featurized), still with global unit offsets. After a fit
        that kept no train features, the blocks are recomputed.
        """
        if self._recompute:
            yield from self._recomputed_train_features(ctx, local)
            return
        kind, store = f"train-m{ctx.index}", None if ctx.features else self.store
        device, dtype = self.task.device, self.task.working_dtype
        if store is None:
            count = len(ctx.features)
            lo, hi = distributed.local_range(count) if local else (0, count)
            start = 0
            for i, block in enumerate(ctx.features):
                if lo <= i < hi:
                    yield start, block.to(device=device, dtype=dtype)
                start += block.shape[0]
            return
        # exactly the shards this training set has (a store may hold more, e.g. written with
        # another shard size); skipped ones are not read, their sizes are in the manifest
        count = self._shard_count(ctx)
        lo, hi = distributed.local_range(count) if local else (0, count)
        start = 0
        for i in range(count):
            if lo <= i < hi:
                block = store.read_shard(kind, i)
                yield start, block.to(device=device, dtype=dtype)
            start += store.shard_rows(kind, i)

    def _shard_count(self, ctx: MemberContext) -> int:
        """How many train-feature shards (of ``rows_per_shard`` examples, or chunks of groups)
        a fit writes."""
        if self._grouping is None:
            assert ctx.rows_per_shard is not None  # set by _featurize_train_shards
            return -(-self._n_units // ctx.rows_per_shard)
        return sum(1 for _ in self._group_chunks(self._grouping, local=False))

    def _count_train_blocks(self, ctx: MemberContext, local: bool) -> int | None:
        """How many blocks :meth:`_iter_train_features` yields (None: not known cheaply)."""
        if self._recompute:
            if self._grouping is not None:
                return None
            count = num_batches(self._train, self.config.batch_size)
        elif ctx.features or self.store is None:
            count = len(ctx.features)
        else:
            count = len(self.store.shard_indices(f"train-m{ctx.index}"))
        lo, hi = distributed.local_range(count) if local else (0, count)
        return hi - lo

    def _phase(self, what: str, ctx: MemberContext | None = None) -> str:
        """A bar's description: method id, phase, member, and a note when recomputing."""
        desc = f"{self.name}: {what}"
        if ctx is not None and len(self._contexts) > 1:
            desc += f" (member {ctx.index})"
        if self._recompute and what in ("scoring", "self-influence"):
            desc += " (recomputing train features)"
        return desc

    def _recomputed_train_features(
        self, ctx: MemberContext, local: bool
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """:meth:`_iter_train_features` of a fit that kept none: each shard's rows computed
        from its batch (or chunk of groups), at the member's state, when it is reached."""
        device, dtype = self.task.device, self.task.working_dtype
        if self._grouping is None:  # the bars are the consumers' (scoring, self-influence)
            for _, offset, batch in self._train_batches(local):
                with self._recomputing(ctx):
                    block = self._batch_train_features(ctx, offset, batch)
                yield offset, block.to(device=device, dtype=dtype)
            return
        grouping = self._grouping
        for _, lo, hi, index_batches in self._group_chunks(grouping, local):
            batches = [take_examples(self._train, idx) for idx in index_batches]
            with self._recomputing(ctx):
                block = self._chunk_train_features(ctx, grouping, lo, hi, index_batches, batches)
            yield lo, block.to(device=device, dtype=dtype)

    @contextmanager
    def _recomputing(self, ctx: MemberContext) -> Iterator[None]:
        """Inside: the member's effective task, batches moved to the model's device.

        Entered and left around each recomputed block, never across a ``yield``: the
        blocks of several members are interleaved (``_score_blocks`` zips them).
        """
        with self._member_task(ctx.member), self.task.moving_batches():
            yield

    def _all_train_features(self, ctx: MemberContext) -> torch.Tensor:
        return torch.cat([b for _, b in self._iter_train_features(ctx)], 0)

    def _transformed_queries(self, queries: Any) -> list[torch.Tensor]:
        self._check_fitted()
        self.task.check_eval_mode()
        distributed.check_same_queries(queries, self.config.batch_size)
        n_queries = _count_examples(queries)
        if n_queries is not None:
            self._check_cost(n_queries)
        out = []
        with self._fitted_device():
            self.task.check_data(queries, self.config.batch_size, "query")
            dtype = self.task.working_dtype
            for ctx in self._contexts:
                with self._member_task(ctx.member):
                    batches = progress_bar(
                        iter_batches(queries, self.config.batch_size),
                        desc=self._phase("query features", ctx),
                        enabled=self.config.progress,
                        total=_count_batches(queries, self.config.batch_size),
                        unit="batch",
                    )
                    feats = [self._query_features(ctx, b).detach().to(dtype) for b in batches]
                    joined = self._join_query_features(ctx, feats)
                    out.append(self._transform_queries(ctx, joined))
        return out

    def _score_blocks(
        self, queries: Any, local: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        qs = self._transformed_queries(queries)
        iters = [self._iter_train_features(ctx, local) for ctx in self._contexts]
        bar = progress_bar(
            zip(*iters),
            desc=self._phase("scoring"),
            enabled=self.config.progress,
            total=self._count_train_blocks(self._contexts[0], local),
            unit="block",
        )
        for parts in bar:
            start = parts[0][0]
            blocks = [
                self._combine(ctx, q, block, start)
                for ctx, q, (_, block) in zip(self._contexts, qs, parts)
            ]
            size = blocks[0].shape[1]
            ids = torch.arange(start, start + size)
            if self._grouping is not None:
                ids = self._grouping.ids[start : start + size]
            yield ids, finite_or_raise(self._aggregate(blocks, start), "scores", start)


def finite_or_raise(values: torch.Tensor, what: str, start: int) -> torch.Tensor:
    """``values``, unless they hold NaN/inf: never returned silently (``NumericalError``)."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return values
    bad = (~finite).nonzero()[0].tolist()
    where = f"unit {start + bad[-1]}" + (f" of query {bad[0]}" if len(bad) == 2 else "")
    raise NumericalError(
        f"the {what} hold {int((~finite).sum())} NaN/inf value(s) (first at {where}) although "
        "the data and weights are finite: the gradients or the curvature solve overflowed. "
        "Raise damping=, use float64 (model.double() and data), or rescale the inputs."
    )


def _count_examples(data: Any) -> int | None:
    """Examples in ``data`` (None where they cannot be counted)."""
    try:
        return num_examples(data)
    except DataError:
        return None


def _count_batches(data: Any, batch_size: int) -> int | None:
    """Batches of ``data`` for a bar's total (None where they cannot be counted: the
    batching itself then says what is wrong with the data)."""
    try:
        return num_batches(data, batch_size)
    except DataError:
        return None


MethodEntry = tuple[type[Attributor], dict[str, Any]]
METHODS: dict[str, MethodEntry] = {}


def register(method_id: str, **defaults: Any) -> Any:
    """Class decorator: register an attributor under ``method_id`` with default settings."""

    def deco(cls: type[Attributor]) -> type[Attributor]:
        METHODS[method_id] = (cls, defaults)
        return cls

    return deco


def make_attributor(method_id: str, task: Task, **kwargs: Any) -> Attributor:
    """Build the attributor registered as ``method_id`` (DESIGN.md §8 ids)."""
    if method_id not in METHODS:
        raise ConfigError(f"unknown method {method_id!r}; registered methods: {sorted(METHODS)}.")
    cls, defaults = METHODS[method_id]
    obj = cls(task, **{**defaults, **kwargs})
    obj.name = method_id
    return obj


def _rows_of(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of a batch (a tensor, a tuple/list or a dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return type(batch)(t[start:stop] for t in batch)
