"""The :class:`Setting` base class and its data and evaluation types.

A setting (DESIGN.md §7) is everything a benchmark needs to train a model and ask what its
training data did: a data builder (train split, validation and test queries), a model
builder, a deterministic training recipe that can train on any subset of the training
examples, the target to attribute and how to measure it. Settings are frozen dataclasses
whose fields are the whole recipe; they round-trip through JSON and hash to the key under
which their ground truth is cached.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from datatrace._checks import check_int
from datatrace.data import Batch, iter_batches, num_examples
from datatrace.data import take_examples as take  # rows of a batch, for the recipes
from datatrace.errors import ConfigError, DataError
from datatrace.replay import TrainingRecipe
from datatrace.store import fingerprint_batch
from datatrace.task import Checkpoint, Task

__all__ = ["Evaluation", "Setting", "SettingData", "take"]

TaskKind = Literal["classification", "language-modelling"]
Size = Literal["full", "small"]
DType = Literal["float32", "float64"]
QuerySplit = Literal["val", "test", "all"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- batches
def _concat(batches: Sequence[Batch]) -> Batch:
    first = batches[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    return tuple(torch.cat(parts) for parts in zip(*batches))


@dataclass(frozen=True)
class SettingData:
    """The examples of a setting, fixed by its fields (and ``split_seed``).

    Attributes:
        train: the training examples, a tuple ``(inputs, labels)`` or a dict batch
            (``{"input_ids", "labels"}`` for language models). Training indices refer to its
            rows.
        val_queries: held-out queries for choosing hyperparameters (DESIGN.md §9).
        test_queries: held-out queries on which results are reported.

    Example:
        >>> data = SettingData((torch.zeros(4, 2), torch.zeros(4)), (torch.ones(1, 2), torch.ones(1)),
        ...                    (torch.ones(2, 2), torch.ones(2)))
        >>> data.n_train, num_examples(data.queries("all"))
        (4, 3)
    """

    train: Batch
    val_queries: Batch
    test_queries: Batch

    @property
    def n_train(self) -> int:
        return num_examples(self.train)

    def queries(self, split: QuerySplit = "test") -> Batch:
        """The ``"val"`` or ``"test"`` queries, or ``"all"`` of them (validation first)."""
        if split == "val":
            return self.val_queries
        if split == "test":
            return self.test_queries
        if split == "all":
            return _concat([self.val_queries, self.test_queries])
        raise ConfigError(f"query split must be 'val', 'test' or 'all'; got {split!r}.")


@dataclass(frozen=True)
class Evaluation:
    """How well a trained model does on held-out queries.

    Attributes:
        loss: mean cross-entropy in nats (per example for classification, per predicted
            token for language models).
        accuracy: fraction of correct argmax predictions (next-token accuracy for language
            models).
        n: number of examples (classification) or predicted tokens (language models).
    """

    loss: float
    accuracy: float
    n: int


# ----------------------------------------------------------------------------- settings
def _check_float(value: Any, name: str, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigError(f"{name} must be a finite number {relation} {minimum}; got {value!r}.")


S = TypeVar("S", bound="Setting")


@dataclass(frozen=True, kw_only=True)
class Setting(ABC):
    """A benchmark setting: data, model, deterministic training recipe and target.

    Subclasses add the recipe's fields and implement :meth:`_build_data`,
    :meth:`_build_model` and :meth:`_fit`. A field of a subclass listed in its ``presets``
    takes the value of the preset of ``size`` while it holds 0 (its default), so
    ``size="small"`` shrinks a setting for tests while every field stays explicit.

    Attributes:
        name: registry id, e.g. ``"digits-mlp"``.
        description: one line for listings (not part of the recipe).
        size: ``"full"`` (the benchmark) or ``"small"`` (quick, for tests).
        split_seed: seed of the train/query split and of any subsampling of the data.
        dtype: floating dtype of the model and inputs, ``"float32"`` or ``"float64"``.
        n_train: training examples used (0: the size preset).
        n_val: validation queries (0: the size preset).
        n_test: test queries (0: the size preset).
        checkpoints: checkpoints kept by :meth:`train_trajectory` (not part of the recipe).

    Class attributes:
        kind: ``"classification"`` or ``"language-modelling"``.
        loss: the :class:`~datatrace.Task` loss (``"cross_entropy"``, ``"lm"``, ...).
        target: the target attributed for queries (``"margin"``, ``"log_prob"``, ``"loss"``).
        presets: ``{size: {field: value}}`` for fields left at 0.
        recipe_version: bump it when the code of the recipe changes what it trains, so that
            cached ground truth keyed by :meth:`recipe_hash` is not reused.
        convex: True when the training objective is convex and trained to its optimum, so
            leave-one-out ground truth is meaningful (``datatrace bench`` reports LOO).
        image_shape: ``(height, width)`` when each training input is a grey image of that
            size (the bench draws its top proponents), else None.
        memorise: field changes for the flipped-label model of the mislabel task
            (:mod:`datatrace.bench.mislabel`), chosen so that it memorises its flips (100%
            training accuracy); the task is skipped with a note when it does not.

    Example:
        >>> from datatrace.bench.settings import get_setting
        >>> setting = get_setting("digits-lr", size="small")
        >>> model = setting.train(seed=0)
        >>> setting.measure(model, "test").shape == (setting.n_test,)
        True
    """

    name: str = ""
    description: str = ""
    size: Size = "full"
    split_seed: int = 0
    dtype: DType = "float32"
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    checkpoints: int = 5

    kind: ClassVar[TaskKind] = "classification"
    loss: ClassVar[str] = "cross_entropy"
    target: ClassVar[str] = "margin"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"full": {}, "small": {}}
    recipe_version: ClassVar[int] = 1
    convex: ClassVar[bool] = False
    image_shape: ClassVar[tuple[int, int] | None] = None
    memorise: ClassVar[Mapping[str, Any]] = {}
    _unhashed: ClassVar[frozenset[str]] = frozenset({"description", "checkpoints"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON gives lists where the recipe has tuples
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a setting needs a non-empty string name; got {self.name!r}.")
        if self.size not in self.presets:
            raise ConfigError(
                f"size must be one of {sorted(self.presets)} for setting {self.name!r}; "
                f"got {self.size!r}."
            )
        for key, value in self.presets[self.size].items():
            if not getattr(self, key):
                object.__setattr__(self, key, value)
        self._check()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled settings (sent to worker processes) carry their fields, not built data.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _check(self) -> None:
        """Validate the fields once presets are applied; subclasses extend it (call super)."""
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}.")
        check_int("split_seed", self.split_seed, 0)
        check_int("checkpoints", self.checkpoints, 1)
        for key in ("n_train", "n_val", "n_test"):
            check_int(key, getattr(self, key), 1)

    # -- builders ------------------------------------------------------------------------------
    @abstractmethod
    def _build_data(self) -> SettingData:
        """Build the data (deterministic given the fields); tensors in ``torch_dtype``."""

    @abstractmethod
    def _build_model(self) -> nn.Module:
        """A freshly initialised model; initialisation draws from the global generator."""

    @abstractmethod
    def _fit(self, model: nn.Module, train: Batch, seed: int, record: bool) -> list[Checkpoint]:
        """Train ``model`` (in train mode) in place on ``train``; checkpoints if ``record``."""

    def _fit_recipe(self, model: nn.Module, train: Batch, seed: int) -> TrainingRecipe:
        """Train as :meth:`_fit` and return the run's replay recipe (``unrolled`` replays it).

        Settings whose loop records one (:meth:`CheckpointRecorder.attach`) override this.
        """
        raise ConfigError(
            f"setting {self.name!r} does not record a replay recipe, so the unrolled method "
            "cannot run on it; the digits trajectory settings and the Adam classifier settings "
            "(without dropout) do."
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @functools.cached_property
    def data(self) -> SettingData:
        """The setting's examples, built on first use and kept."""
        data = self._build_data()
        if data.n_train != self.n_train:
            raise DataError(
                f"setting {self.name!r} built {data.n_train} training examples but n_train is "
                f"{self.n_train}; _build_data must honour n_train."
            )
        return data

    def build_model(self, seed: int = 0) -> nn.Module:
        """A freshly initialised model (train mode, the setting's dtype), fixed by ``seed``."""
        check_int("seed", seed, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._build_model()
        return model.to(self.torch_dtype)

    # -- training ------------------------------------------------------------------------------
    def _indices(self, indices: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
        n = self.n_train
        if indices is None:
            return torch.arange(n)
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise DataError(
                    f"a boolean subset mask must have shape ({n},) for setting {self.name!r}; "
                    f"got {tuple(idx.shape)}."
                )
            idx = torch.nonzero(idx).squeeze(1)
        if idx.ndim != 1 or idx.is_floating_point() or idx.is_complex():
            raise DataError(
                f"indices must be a 1-D tensor of ints or a boolean mask; got shape "
                f"{tuple(idx.shape)} and dtype {idx.dtype}."
            )
        if idx.numel() == 0:
            raise DataError("indices select no training example; train on at least one.")
        idx = idx.to(torch.long)
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise DataError(
                f"indices must lie in [0, n_train={n}); got values from {int(idx.min())} to "
                f"{int(idx.max())}."
            )
        # Sorted so that the trained model depends on the set of indices, not their order.
        return torch.sort(idx).values

    def _run(
        self, indices: torch.Tensor | Sequence[int] | None, seed: int, record: bool
    ) -> tuple[nn.Module, list[Checkpoint]]:
        idx = self._indices(indices)
        model = self.build_model(seed)
        train = take(self.data.train, idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout and any other draw from the global generator
            model.train()
            trajectory = self._fit(model, train, seed, record)
        return model.eval(), trajectory

    def train_recipe(
        self, indices: torch.Tensor | Sequence[int] | None = None, seed: int = 0
    ) -> tuple[nn.Module, TrainingRecipe]:
        """Train as :meth:`train` and record the run's replay recipe.

        Returns:
            The trained model in eval mode and its :class:`~datatrace.replay.TrainingRecipe`,
            whose step indices point into the rows trained on (the setting's training set
            when ``indices`` is None): pass it to the ``unrolled`` method as ``recipe=``.
        """
        idx = self._indices(indices)
        model = self.build_model(seed)
        train = take(self.data.train, idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            recipe = self._fit_recipe(model, train, seed)
        return model.eval(), recipe

    def train(
        self, indices: torch.Tensor | Sequence[int] | None = None, seed: int = 0
    ) -> nn.Module:
        """Train on ``indices`` (None: all) with ``seed``; the model comes back in eval mode.

        This is the ``train_fn`` of :mod:`datatrace.bench.groundtruth`.

        Args:
            indices: training examples to use (ints or a boolean mask over ``n_train``);
                None uses all. Duplicates count twice; the order does not matter.
            seed: fixes initialisation, batch order and dropout; same seed, same weights.
        """
        return self._run(indices, seed, record=False)[0]

    def train_trajectory(
        self, indices: torch.Tensor | Sequence[int] | None = None, seed: int = 0
    ) -> tuple[nn.Module, list[Checkpoint]]:
        """Train as :meth:`train` and keep ``checkpoints`` states along the way.

        Returns:
            The trained model in eval mode and its trajectory, whose last checkpoint holds
            the final weights; pass it to :meth:`make_task` as ``checkpoints=`` (TracIn).
        """
        return self._run(indices, seed, record=True)

    # -- attribution ---------------------------------------------------------------------------
    def make_task(self, model: nn.Module, **task_options: Any) -> Task:
        """A :class:`~datatrace.Task` for ``model`` with this setting's loss and target.

        Args:
            model: a model built by this setting, in eval mode.
            **task_options: passed on to ``Task`` (``checkpoints=``, ``params=``, ...).
        """
        return Task(model, loss=self.loss, target=self.target, **task_options)

    def _queries(self, queries: Batch | QuerySplit) -> Batch:
        if isinstance(queries, str):
            return self.data.queries(cast(QuerySplit, queries))
        return queries

    def _outputs(self, model: nn.Module, queries: Batch, batch_size: int) -> Iterator[Any]:
        task = self.make_task(model)
        task.check_eval_mode()
        state = task.state()
        with torch.no_grad():
            for batch in iter_batches(queries, batch_size):
                split = task.split_batch(batch)
                yield task, split, task.outputs(state, split)

    def measure(
        self, model: nn.Module, queries: Batch | QuerySplit = "test", batch_size: int = 256
    ) -> torch.Tensor:
        """Each query's target in improvement orientation (higher is better).

        This is the ``measure_fn`` of :mod:`datatrace.bench.groundtruth`: the margin for
        classification, the summed log-probability for language models.

        Args:
            model: a trained model in eval mode.
            queries: a batch, or ``"val"``, ``"test"`` or ``"all"`` of the setting's queries.
            batch_size: queries per forward pass.

        Returns:
            ``(n_query,)`` tensor in the model's dtype.
        """
        values = [
            float(task.target.direction) * task.target.fn(out, split.labels, split.mask)
            for task, split, out in self._outputs(model, self._queries(queries), batch_size)
        ]
        return torch.cat(values)

    def evaluate(
        self, model: nn.Module, queries: Batch | QuerySplit = "all", batch_size: int = 256
    ) -> Evaluation:
        """Mean cross-entropy and accuracy of ``model`` on ``queries`` (default: all held out)."""
        total_loss, correct, count = 0.0, 0, 0
        for _, split, out in self._outputs(model, self._queries(queries), batch_size):
            labels = split.labels
            if labels is None:
                raise DataError("evaluate needs labelled queries.")
            if self.kind == "language-modelling":
                out, labels = out[:, :-1], labels[:, 1:]
                keep = labels != -100
                if split.mask is not None:
                    keep = keep & split.mask[:, 1:].bool()
                out, labels = out[keep], labels[keep]
            total_loss += float(F.cross_entropy(out, labels, reduction="sum"))
            correct += int((out.argmax(-1) == labels).sum())
            count += int(labels.numel())
        if count == 0:
            raise DataError("evaluate got no labelled query (or token) to score.")
        return Evaluation(loss=total_loss / count, accuracy=correct / count, n=count)

    # -- identity ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Every field as JSON-able values; :meth:`from_json` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls: type[S], data: Mapping[str, Any]) -> S:
        """Rebuild a setting from :meth:`to_json`.

        On ``Setting`` itself the class is found in the registry by ``data["name"]``.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise ConfigError(
                f"setting JSON must be an object with a 'name'; got {type(data).__name__}."
            )
        if cls is Setting:
            from datatrace.bench.settings.registry import get_setting

            rest = {k: v for k, v in data.items() if k != "name"}
            return get_setting(data["name"], **rest)  # type: ignore[return-value]
        _check_fields(cls, data)
        return cls(**data)

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes``; fields at the old size's preset follow a new ``size``."""
        _check_fields(type(self), changes)
        new_size = changes.get("size", self.size)
        if new_size != self.size:
            old = self.presets[self.size]
            for key, value in old.items():
                if key not in changes and getattr(self, key) == value:
                    changes[key] = type(value)()  # back to 0 / () so the new preset applies
        return dataclasses.replace(self, **changes)

    def data_fingerprint(self) -> str:
        """SHA-256 of the train and query tensors (dtypes, shapes and bytes)."""
        d = self.data
        parts = [fingerprint_batch(b) for b in (d.train, d.val_queries, d.test_queries)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def recipe_hash(self) -> str:
        """16 hex digits over everything that determines training and measurement.

        Covers the setting's class, ``recipe_version``, every recipe field (all fields but
        ``description`` and ``checkpoints``) and the fingerprint of the data, so that data that
        changes under a new library version (e.g. ``pydoc_data``) changes the hash. It keys
        cached ground truth. The torch version is not included: retrainings under another
        version may differ in rounding, which ``datatrace groundtruth --verify`` checks.
        """
        recipe = {k: v for k, v in self.to_json().items() if k not in self._unhashed}
        payload = {
            "class": type(self).__qualname__,
            "recipe_version": self.recipe_version,
            "recipe": recipe,
            "data": self.data_fingerprint(),
        }
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_fields(cls: type, given: Mapping[str, Any]) -> None:
    valid = _field_names(cls)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; valid fields are {valid}.")
