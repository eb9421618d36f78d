"""Mislabel ground truth: a setting with a fraction of its training labels flipped (cached).

Koh & Liang (2017, "Understanding Black-box Predictions via Influence Functions", ICML,
§5.4) and Pruthi et al. (2020, "Estimating Training Data Influence by Tracing Gradient
Descent", NeurIPS, §4.1) flip a fraction of the training labels, train on the noisy data and
inspect training examples in decreasing order of self-influence. The task only measures
something when the model *memorises* the flips (100% training accuracy): otherwise a flipped
example keeps a large training loss and the loss alone finds it. So the flipped-label model
is trained with the setting's ``memorise`` field changes (longer, without dropout or weight
decay) and checked; a setting whose model does not reach 100% training accuracy is reported
as not memorising, and ``datatrace bench`` skips the task there with a note.

The flips are exactly ``round(p * n_train)`` examples drawn uniformly without replacement by
``seed``; each gets a label drawn uniformly among the *other* classes. The mask, the noisy
labels and the training accuracy are cached in a :class:`~datatrace.store.Store` keyed by the
setting's recipe hash and the spec, so a second run neither redraws nor retrains to check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datatrace.bench.settings import Setting, SettingData
from datatrace.errors import ConfigError, DataError
from datatrace.store import Store
from datatrace.task import Checkpoint

__all__ = [
    "MislabelGroundTruth",
    "MislabelSpec",
    "flip_labels",
    "mislabel_ground_truth",
    "with_train_labels",
]


@dataclass(frozen=True)
class MislabelSpec:
    """Flip a fraction ``p`` of the training labels, drawn by ``seed``.

    Example:
        >>> MislabelSpec(p=0.1).key()
        'p0.1-r0'
    """

    p: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        ok = isinstance(self.p, (int, float)) and not isinstance(self.p, bool)
        if not ok or not math.isfinite(self.p) or not 0 < self.p < 1:
            raise ConfigError(
                f"the mislabel rate p must lie strictly between 0 and 1 (default 0.1); got "
                f"{self.p!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"the mislabel seed must be an int >= 0; got {self.seed!r}.")

    def key(self) -> str:
        return f"p{self.p:g}-r{self.seed}"


def flip_labels(
    labels: torch.Tensor, n_classes: int, p: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(p * n)`` labels, each to a uniformly drawn *different* class.

    Args:
        labels: ``(n,)`` int64 class labels in ``[0, n_classes)``.
        n_classes: number of classes, ``>= 2``.
        p: fraction to flip, in ``(0, 1)``; ``round`` is Python's (half to even).
        seed: seed of the draw; the same seed gives the same mask and labels.

    Returns:
        ``(noisy, flipped)``: the new labels and the ``(n,)`` bool mask of flipped examples.

    Raises:
        ConfigError: On ``p`` outside ``(0, 1)``, fewer than 2 classes, or a rate that flips
            no example.
        DataError: If ``labels`` is not a 1-D integer tensor within ``[0, n_classes)``.

    Example:
        >>> noisy, mask = flip_labels(torch.tensor([0, 1, 2, 0, 1]), 3, p=0.4)
        >>> int(mask.sum()), bool((noisy[mask] != torch.tensor([0, 1, 2, 0, 1])[mask]).all())
        (2, True)
    """
    spec = MislabelSpec(p=p, seed=seed)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(
            f"labels must be a 1-D integer tensor; got shape {tuple(labels.shape)} and dtype "
            f"{labels.dtype}."
        )
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ConfigError(f"flipping labels needs n_classes >= 2; got {n_classes!r}.")
    n = int(labels.shape[0])
    if n and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DataError(
            f"labels must lie in [0, {n_classes}); got values from {int(labels.min())} to "
            f"{int(labels.max())}."
        )
    k = round(spec.p * n)
    if k < 1:
        raise ConfigError(
            f"p={spec.p} of {n} training examples flips {k} labels; raise p above "
            f"{0.5 / max(n, 1):.3g}."
        )
    gen = torch.Generator().manual_seed(spec.seed)
    chosen = torch.randperm(n, generator=gen)[:k]
    shift = torch.randint(1, n_classes, (k,), generator=gen)  # never 0: a different class
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % n_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def with_train_labels(setting: Setting, labels: torch.Tensor) -> Setting:
    """A copy of ``setting`` whose training examples carry ``labels`` (queries unchanged).

    The copy's :meth:`~Setting.recipe_hash` covers the new labels (it fingerprints the data).
    Its data lives on the instance only: a pickled copy (a worker process) rebuilds the clean
    data, so pass the labels along and call this again there.
    """
    data = setting.data
    if not isinstance(data.train, tuple) or len(data.train) != 2:
        raise ConfigError(
            f"setting {setting.name!r} has no (inputs, labels) training batch; the mislabel "
            "task needs a classification setting."
        )
    x, y = data.train
    if labels.shape != y.shape:
        raise DataError(f"labels must have shape {tuple(y.shape)}; got {tuple(labels.shape)}.")
    copy = setting.replace()
    # ``data`` is a functools.cached_property: filling the instance dict is what it does itself.
    copy.__dict__["data"] = SettingData(
        (x, labels.to(y.dtype)), data.val_queries, data.test_queries
    )
    return copy


def _n_classes(setting: Setting) -> int:
    _, y = setting.data.train
    model = setting.build_model(0).eval()
    x = setting.data.train[0][:1]
    with torch.no_grad():
        width = int(model(x).shape[-1])
    return max(width, int(y.max()) + 1)


@dataclass(frozen=True)
class MislabelGroundTruth:
    """The flipped-label variant of a setting and whether its model memorises the flips.

    Attributes:
        setting: the variant to train (the setting's ``memorise`` changes, noisy labels).
        flipped: ``(n_train,)`` bool mask of the flipped examples.
        labels: ``(n_train,)`` int64 noisy training labels.
        train_accuracy: accuracy of the variant's model (seed 0) on its noisy training labels.
        flipped_accuracy: the same on the flipped examples alone.
        trained: the model and trajectory trained for the check, when this call trained it
            (None when read from the cache); :meth:`train` returns it or retrains.
    """

    setting: Setting
    flipped: torch.Tensor
    labels: torch.Tensor
    train_accuracy: float
    flipped_accuracy: float
    trained: tuple[torch.nn.Module, list[Checkpoint]] | None = field(default=None, compare=False)

    def train(self) -> tuple[torch.nn.Module, list[Checkpoint]]:
        """The variant's model (seed 0) and trajectory; reuses the one the check trained."""
        if self.trained is not None:
            return self.trained
        return self.setting.train_trajectory(seed=0)

    @property
    def memorised(self) -> bool:
        """True when every training label, flipped ones included, is predicted."""
        return self.train_accuracy == 1.0

    def note(self) -> str:
        """One line for reports: what was flipped and whether it was memorised."""
        n = int(self.flipped.sum())
        if self.memorised:
            return f"{n} flipped labels memorised (100% training accuracy)"
        return (
            f"mislabel task skipped: the model fits {100 * self.train_accuracy:.1f}% of the "
            f"noisy training labels ({100 * self.flipped_accuracy:.1f}% of the {n} flipped), "
            "not 100%, so the training loss alone would find the flips"
        )


def mislabel_ground_truth(
    setting: Setting,
    spec: MislabelSpec | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> MislabelGroundTruth:
    """Flip labels of ``setting``, train the ``memorise`` variant once and check memorisation.

    Args:
        setting: a classification setting.
        spec: rate and seed of the flips (default ``MislabelSpec()``: 10%, seed 0).
        cache_dir: where stores live (default ``datatrace.bench.cache.default_cache_dir``).

    Returns:
        A :class:`MislabelGroundTruth`; its model and trajectory come from ``gt.train()``.

    Raises:
        ConfigError: If the setting is not a classification setting or ``spec`` is invalid.
    """
    from datatrace.bench.cache import default_cache_dir

    spec = spec or MislabelSpec()
    if setting.kind != "classification":
        raise ConfigError(
            f"the mislabel task needs a classification setting; {setting.name!r} is "
            f"{setting.kind!r}."
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    recipe = setting.recipe_hash()
    store = Store(
        root / f"{setting.name}-{recipe}-mislabel-{spec.key()}",
        config={
            "setting": setting.to_json(),
            "spec": spec.__dict__,
            "memorise": dict(setting.memorise),
        },
        fingerprints={"recipe": recipe},
    )
    trained: list[tuple[torch.nn.Module, list[Checkpoint]]] = []  # when trained here

    def fit() -> dict[str, torch.Tensor]:
        _, clean = setting.data.train
        labels, flipped = flip_labels(clean, _n_classes(setting), spec.p, spec.seed)
        variant = with_train_labels(setting.replace(**setting.memorise), labels)
        model, trajectory = variant.train_trajectory(seed=0)
        with torch.no_grad():
            hit = model(variant.data.train[0]).argmax(-1) == labels
        accuracy = torch.tensor(
            [float(hit.double().mean()), float(hit[flipped].double().mean())], dtype=torch.float64
        )
        trained.append((model, trajectory))
        return {"flipped": flipped, "labels": labels, "accuracy": accuracy}

    arrays = store.cached("", ["flipped", "labels", "accuracy"], fit)
    flipped, labels, accuracy = arrays["flipped"], arrays["labels"], arrays["accuracy"]
    variant = with_train_labels(setting.replace(**setting.memorise), labels)
    return MislabelGroundTruth(
        variant,
        flipped,
        labels,
        float(accuracy[0]),
        float(accuracy[1]),
        trained[0] if trained else None,
    )
