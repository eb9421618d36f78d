"""Ensembles in ``datatrace bench``: which members each ensemble needs and what they cost.

An :class:`EnsembleSpec` names one ensemble of a benchmark run (DESIGN.md §8 ids):

- ``independent:K``: K models trained by the setting's recipe with seeds ``0 .. K-1`` (the
  naive ensemble; seed 0 is the benchmark's model).
- ``dropout:K``: K fixed masks (:class:`~datatrace.ensemble.DropoutMember`) of the seed-0
  model's own ``nn.Dropout`` layers, or of the outputs of ``layers`` at ``rate`` (injected
  dropout). A setting whose model has no dropout layers needs ``layers`` and ``rate``. With
  ``models=M`` the masks go round robin over the models of seeds ``0 .. M-1`` (M trainings).
- ``lora:K``: the seed-0 model plus K LoRA adapters of rank ``rank`` on every ``nn.Linear``,
  each fine-tuned from it for ``epochs`` epochs of Adam at ``lr`` with its own seed and
  data order (:func:`~datatrace.lora.train_lora_members`); gradients w.r.t. the adapters.

:class:`MemberBank` trains what the ensembles of a run need, each model and adapter once,
timing each, and prices an ensemble (:class:`EnsembleCost`): training seconds of every
training it needs (K for independent, 1 for dropout, 1 plus the adapters for LoRA) and the
bytes of the member weights a store keeps (dropout masks are regenerated from seeds and cost
nothing). Models are not cached across runs: the bench measures their training time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from datatrace.bench.settings import Setting
from datatrace.ensemble import dropout_members
from datatrace.errors import ConfigError, ModelError
from datatrace.lora import LoRAMember, _linear_names, train_lora_members
from datatrace.task import Checkpoint, Member

__all__ = ["ENSEMBLE_KINDS", "EnsembleCost", "EnsembleSpec", "MemberBank", "parse_ensembles"]

EnsembleKind = Literal["independent", "dropout", "lora"]
ENSEMBLE_KINDS: tuple[str, ...] = ("independent", "dropout", "lora")

# Options each kind accepts after ``kind:K`` (``key=value``); the others are refused.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "independent": (),
    "dropout": ("rate", "layers", "models"),
    "lora": ("rank", "epochs", "lr"),
}
_LORA_DEFAULTS = {"rank": 4, "epochs": 5, "lr": 1e-2}


@dataclass(frozen=True)
class EnsembleSpec:
    """One ensemble of a benchmark run.

    Attributes:
        kind: ``"independent"``, ``"dropout"`` or ``"lora"``.
        k: number of members, >= 1.
        rate: dropout only: drop probability in [0, 1) (default: each dropout layer's own).
        layers: dropout only: modules whose outputs are masked (dropout injected there);
            needs ``rate``. Default: the model's ``nn.Dropout`` layers.
        rank: LoRA only: adapter rank (default 4).
        epochs: LoRA only: fine-tuning epochs per adapter (default 5).
        lr: LoRA only: Adam learning rate of the adapters (default 1e-2).
        models: dropout only: trained models the masks go round robin over (seeds
            ``0 .. models-1``; default 1, the seed-0 model).

    Example:
        >>> EnsembleSpec("dropout", 4, rate=0.1, layers=("5", "7")).label
        'dropout:4:rate=0.1:layers=5+7'
    """

    kind: EnsembleKind
    k: int
    rate: float | None = None
    layers: tuple[str, ...] | None = None
    rank: int | None = None
    epochs: int | None = None
    lr: float | None = None
    models: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENSEMBLE_KINDS:
            raise ConfigError(
                f"unknown ensemble kind {self.kind!r}; choose from {list(ENSEMBLE_KINDS)}."
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(
                f"ensemble {self.kind}:{self.k} needs K >= 1 members (an int); got {self.k!r}."
            )
        given = [
            n
            for n in ("rate", "layers", "rank", "epochs", "lr", "models")
            if getattr(self, n) is not None
        ]
        foreign = [n for n in given if n not in _OPTIONS[self.kind]]
        if foreign:
            raise ConfigError(
                f"ensemble kind {self.kind!r} takes no option(s) {foreign}; its options are "
                f"{list(_OPTIONS[self.kind]) or 'none'}."
            )
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(n, str) and n for n in layers):
                raise ConfigError(
                    f"dropout layers must be module names such as layers=5+7; got {self.layers!r}."
                )
            object.__setattr__(self, "layers", layers)
            if self.rate is None:
                raise ConfigError(
                    f"injecting dropout at layers {list(layers)} needs a rate: add :rate=0.1 "
                    "(a drop probability in [0, 1))."
                )
        if self.rate is not None and not (
            isinstance(self.rate, (int, float))
            and not isinstance(self.rate, bool)
            and 0 <= self.rate < 1
        ):
            raise ConfigError(f"dropout rate must be a probability in [0, 1); got {self.rate!r}.")
        for name in ("rank", "epochs", "models"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                what = "LoRA" if self.kind == "lora" else self.kind
                raise ConfigError(f"{what} {name} must be an int >= 1; got {value!r}.")
        if self.lr is not None and not (
            isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0
        ):
            raise ConfigError(f"LoRA lr must be a number > 0; got {self.lr!r}.")

    @property
    def label(self) -> str:
        """The spec as written on the command line, e.g. ``"lora:4:rank=8"``."""
        parts = [self.kind, str(self.k)]
        for name in _OPTIONS[self.kind]:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={'+'.join(value) if name == 'layers' else value}")
        return ":".join(parts)

    def lora_option(self, name: str) -> Any:
        """``rank``, ``epochs`` or ``lr`` of a LoRA ensemble, its default when not given."""
        value = getattr(self, name)
        return _LORA_DEFAULTS[name] if value is None else value

    def to_json(self) -> dict[str, Any]:
        """Kind, K and the options that were given."""
        out: dict[str, Any] = {"kind": self.kind, "k": self.k}
        for name in _OPTIONS[self.kind]:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name == "layers" else value
        return out

    def check(self, setting: Setting) -> None:
        """Raise a clear error if this ensemble cannot be built on ``setting``'s model.

        Checked before any training: dropout needs dropout layers or existing injection
        layers, LoRA needs ``nn.Linear`` layers.
        """
        model = setting.build_model(0)
        names = [n for n, _ in model.named_modules() if n]
        listing = f"{names[:20]}{' ...' if len(names) > 20 else ''}" if names else "none"
        if self.kind == "dropout":
            if self.layers is not None:
                unknown = [n for n in self.layers if n not in names]
                if unknown:
                    raise ModelError(
                        f"{self.label}: layers {unknown} are not modules of {setting.name!r}'s "
                        f"model; its modules are {listing}."
                    )
            elif not any(isinstance(m, nn.Dropout) for m in model.modules()):
                raise ConfigError(
                    f"{self.label}: setting {setting.name!r} has no nn.Dropout layers, so a "
                    "dropout ensemble has nothing to mask. Inject dropout after chosen modules: "
                    f"{self.kind}:{self.k}:rate=0.1:layers=NAME+NAME, with NAME among the "
                    f"model's modules: {listing}."
                )
        if self.kind == "lora" and not [n for n in _linear_names(model) if n]:
            raise ModelError(
                f"{self.label}: setting {setting.name!r}'s model has no nn.Linear submodule to "
                f"adapt (a model that is itself one Linear layer cannot take an adapter)."
            )


def _option(kind: str, pair: str) -> tuple[str, Any]:
    if "=" not in pair:
        raise ConfigError(f"ensemble option {pair!r} of {kind!r} must look like key=value.")
    key, text = pair.split("=", 1)
    if key not in _OPTIONS.get(kind, ()):
        raise ConfigError(
            f"ensemble kind {kind!r} takes no option {key!r}; its options are "
            f"{list(_OPTIONS.get(kind, ())) or 'none'}."
        )
    if key == "layers":
        return key, tuple(text.split("+"))
    try:
        return key, (int(text) if key in ("rank", "epochs", "models") else float(text))
    except ValueError:
        raise ConfigError(f"ensemble option {key}={text!r} of {kind!r} must be a number.") from None


def parse_ensembles(spec: str) -> list[EnsembleSpec]:
    """``"independent:4,dropout:4:rate=0.1:layers=5+7"`` -> two :class:`EnsembleSpec`.

    Each item is ``kind:K`` followed by ``:key=value`` options; ``layers`` lists module
    names joined by ``+``. An empty string gives no ensemble.

    Raises:
        ConfigError: On an unknown kind, a K that is not an int >= 1, or a bad option.

    Example:
        >>> [e.label for e in parse_ensembles("independent:2,lora:4:rank=8")]
        ['independent:2', 'lora:4:rank=8']
    """
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *rest = item.split(":")
        if kind not in ENSEMBLE_KINDS:
            raise ConfigError(
                f"unknown ensemble kind {kind!r} in {item!r}; choose from {list(ENSEMBLE_KINDS)} "
                "(written kind:K, e.g. dropout:4)."
            )
        if not rest:
            raise ConfigError(
                f"ensemble {item!r} needs its number of members: {kind}:K, e.g. {kind}:4."
            )
        try:
            k = int(rest[0])
        except ValueError:
            raise ConfigError(
                f"ensemble {item!r}: K must be an int >= 1 (written {kind}:4); got {rest[0]!r}."
            ) from None
        options = dict(_option(kind, pair) for pair in rest[1:])
        out.append(EnsembleSpec(kind, k, **options))  # type: ignore[arg-type]
    labels = [e.label for e in out]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"ensemble(s) {repeated} are given twice; give each once.")
    return out


@dataclass(frozen=True)
class EnsembleCost:
    """The members of one ensemble and what they cost.

    Attributes:
        members: what ``members=`` of the attributor gets (None: the plain method).
        train_s: seconds of every training the ensemble needs (full models and adapters).
        trainings: full model trainings it needs.
        adapters: LoRA adapters it needs (0 for other kinds).
        weight_bytes: bytes of the member weights a store keeps (models read by the method,
            adapters; masks are regenerated from seeds).
    """

    members: list[Member] | None
    train_s: float
    trainings: int
    adapters: int
    weight_bytes: int


def _state_bytes(checkpoints: Sequence[Checkpoint]) -> int:
    return sum(t.numel() * t.element_size() for c in checkpoints for t in c.load().values())


@dataclass
class MemberBank:
    """The models and adapters a benchmark's ensembles need, each trained and timed once.

    Attributes:
        setting: the setting whose recipe trains the models.
        trajectory: checkpoints of the seed-0 model (its final weights last).
        seed0_s: seconds the seed-0 training took.

    Example:
        >>> from datatrace.bench.settings import get_setting
        >>> setting = get_setting("digits-mlp", size="small")
        >>> bank = MemberBank(setting, setting.train_trajectory(seed=0)[1], seed0_s=0.2)
        >>> cost = bank.cost(EnsembleSpec("dropout", 2), reads_trajectory=False)
        >>> len(cost.members), cost.trainings, cost.train_s
        (2, 1, 0.2)
    """

    setting: Setting
    trajectory: list[Checkpoint]
    seed0_s: float
    _models: dict[int, tuple[list[Checkpoint], float]] = field(default_factory=dict)
    _adapters: dict[tuple[int, int, float], list[tuple[LoRAMember, float]]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        self._models[0] = (list(self.trajectory), self.seed0_s)

    def _model(self, seed: int) -> tuple[list[Checkpoint], float]:
        if seed not in self._models:
            t0 = time.perf_counter()
            _, trajectory = self.setting.train_trajectory(seed=seed)
            self._models[seed] = (trajectory, time.perf_counter() - t0)
        return self._models[seed]

    def _lora(self, spec: EnsembleSpec) -> list[tuple[LoRAMember, float]]:
        rank, epochs, lr = (spec.lora_option(n) for n in ("rank", "epochs", "lr"))
        done = self._adapters.setdefault((rank, epochs, lr), [])
        if len(done) < spec.k:
            model = self.setting.build_model(0)
            model.load_state_dict(dict(self.trajectory[-1].load()))
            task = self.setting.make_task(model.eval())
            for j in range(len(done), spec.k):  # one at a time, to time each adapter
                t0 = time.perf_counter()
                (member,) = train_lora_members(
                    task, self.setting.data.train, 1, rank=rank, epochs=epochs, lr=lr, seed=j
                )
                done.append((member, time.perf_counter() - t0))
        return done[: spec.k]

    def plain(self, reads_trajectory: bool) -> EnsembleCost:
        """The plain method's cost: the seed-0 training and its weights."""
        read = self.trajectory if reads_trajectory else self.trajectory[-1:]
        return EnsembleCost(None, self.seed0_s, 1, 0, _state_bytes(read))

    def cost(self, spec: EnsembleSpec, reads_trajectory: bool) -> EnsembleCost:
        """Train what ``spec`` still needs and return its members and cost.

        Args:
            spec: the ensemble.
            reads_trajectory: the method reads whole trajectories (TracIn, Source): members
                carry every checkpoint and their weights count every checkpoint.
        """
        if spec.kind == "independent":
            runs = [self._model(seed) for seed in range(spec.k)]
            trajectories = [t if reads_trajectory else t[-1:] for t, _ in runs]
            return EnsembleCost(
                [Member(tuple(t)) for t in trajectories],
                sum(s for _, s in runs),
                spec.k,
                0,
                sum(_state_bytes(t) for t in trajectories),
            )
        if spec.kind == "dropout":
            runs = [self._model(seed) for seed in range(spec.models or 1)]
            bases = [t if reads_trajectory else t[-1:] for t, _ in runs]
            members = dropout_members(
                spec.k,
                rate=spec.rate,
                layers=spec.layers,
                models=[list(b) for b in bases] if reads_trajectory or len(runs) > 1 else None,
            )
            return EnsembleCost(
                list(members),
                sum(s for _, s in runs),
                len(runs),
                0,
                sum(_state_bytes(b) for b in bases),
            )
        # Adapters are fine-tuned from the final weights; members read only those.
        adapters = self._lora(spec)
        adapter_bytes = sum(
            t.numel() * t.element_size() for m, _ in adapters for t in m.adapter.values()
        )
        return EnsembleCost(
            [m for m, _ in adapters],
            self.seed0_s + sum(s for _, s in adapters),
            1,
            spec.k,
            _state_bytes(self.trajectory[-1:]) + adapter_bytes,
        )
