"""Ground-truth protocols of the benchmark: half-subset LDS and fixed-seed drop (issue 20).

Every LDS number says which protocol produced it (``datatrace bench --protocol``):

``lds-half`` (:class:`~datatrace.bench.cache.GroundTruthSpec`, the default)
    TRAK's protocol (Park et al., 2023, §2.2): ``m`` random subsets holding a fraction
    ``alpha`` (0.5) of the training examples, each retrained from scratch with its own seeds
    (initialisation, batch order, dropout all vary), ``seeds`` retrainings averaged per
    subset. It measures how well scores predict what a *training recipe* does with a random
    half of the data, across seeds.

``fixed-seed-drop:k`` (:class:`DropSpec`)
    The protocol under which MAGIC (Ilyas & Engstrom, 2025) reports its LDS: the attributed
    seed-0 run itself, with a random fraction ``k`` of its training examples dropped. Every
    retraining replays the seed-0 run's recipe (:meth:`Setting.train_recipe
    <datatrace.bench.settings.Setting.train_recipe>`, :class:`~datatrace.replay.Replay`):
    the same initial weights, the same batches in the same order with the same learning
    rates and optimizer, and a dropped example's loss weight set to 0 in every batch it
    appears in. Step ``t`` minimises

        J_t(θ; w) = Σ_{i ∈ B_t} w_i ℓ_i(θ) / |B_t|,   w_i = 0 if i is dropped, else 1,

    with ``|B_t|`` the size of the recorded batch, dropped examples included (the
    denominator is held fixed; a batch whose examples are all dropped still takes its
    optimizer step, with a zero loss gradient: momentum, Adam's moments and weight decay
    carry on). This is exactly the weighting whose derivative at ``w = 1`` the ``unrolled``
    method computes, so its first-order prediction of a drop is ``-Σ_{i dropped} score[q,
    i]``. Nothing random varies between retrainings, so there is no noise ceiling (a
    deterministic CPU replay gives the same weights every time; with nothing dropped, the
    seed-0 model bit for bit).

LDS under ``fixed-seed-drop`` is the mean over queries of the Spearman correlation, over the
``m`` drop sets ``D_j``, between the predicted change ``-Σ_{i ∈ D_j} score[q, i]`` and the
actual change ``f_q(seed-0 run without D_j) - f_q(seed-0 run)``. It is computed by the
same :func:`datatrace.metrics.lds` as ``lds-half``, with the *kept* sets ``K_j = ~D_j`` as
subsets and the retrained targets as targets: ``Σ_{i ∈ K_j} score = Σ_i score - Σ_{i ∈ D_j}
score`` and ``f_q(K_j) = f_q(seed-0) + change``, where ``Σ_i score`` and ``f_q(seed-0)`` are
the same for every ``j``, and Spearman's correlation ignores shifts.

Only settings that record a replay recipe support ``fixed-seed-drop`` (the trajectory
settings and the Adam classifier settings without dropout); the others are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch

from datatrace import distributed
from datatrace.bench.cache import (
    GroundTruthSpec,
    _check_same_job,
    _check_workers,
    _run_split,
    default_cache_dir,
    lds_ground_truth,
)
from datatrace.bench.groundtruth import SubsetGroundTruth, sample_subsets
from datatrace.bench.settings import Setting
from datatrace.errors import ConfigError
from datatrace.replay import Replay, TrainingRecipe

__all__ = [
    "PROTOCOLS",
    "DropGroundTruth",
    "DropSpec",
    "Protocol",
    "drop_ground_truth",
    "ground_truth",
    "parse_protocol",
    "protocol_name",
    "train_dropped",
]

PROTOCOLS = ("lds-half", "fixed-seed-drop")


@dataclass(frozen=True)
class DropSpec:
    """The ``fixed-seed-drop`` protocol: ``m`` random drop sets of a ``fraction`` of the units.

    Each drop set holds ``round(fraction * n_train)`` training examples, drawn uniformly
    (seeded by ``subset_seed``); every retraining replays the seed-0 run without them.

    Example:
        >>> spec = DropSpec(fraction=0.01, m=50)
        >>> spec.protocol, spec.key(), spec.n_dropped(1437)
        ('fixed-seed-drop:0.01', 'drop0.01-m50-r0', 14)
    """

    fraction: float = 0.01
    m: int = 50
    subset_seed: int = 0

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ConfigError(
                f"the fraction of fixed-seed-drop must lie strictly between 0 and 1 (e.g. "
                f"fixed-seed-drop:0.01 drops 1% of the training examples); got {f!r}."
            )
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 2:
            raise ConfigError(f"m (number of drop sets) must be an int >= 2; got {self.m!r}.")
        seed = self.subset_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"subset_seed must be an int >= 0; got {seed!r}.")

    @property
    def protocol(self) -> str:
        return f"fixed-seed-drop:{self.fraction:g}"

    def key(self) -> str:
        return f"drop{self.fraction:g}-m{self.m}-r{self.subset_seed}"

    def n_dropped(self, n_train: int) -> int:
        """Examples per drop set, ``round(fraction * n_train)``; refused when it is 0 or all."""
        k = round(self.fraction * n_train)
        if not 0 < k < n_train:
            raise ConfigError(
                f"{self.protocol} drops round({self.fraction:g} x {n_train}) = {k} of the "
                f"{n_train} training examples, so every retraining would be the same; choose "
                f"a fraction between {1 / n_train:.3g} and {1 - 1 / n_train:.3g}."
            )
        return k

    def dropped(self, n_train: int) -> torch.Tensor:
        """``(m, n_train)`` bool: ``[j, i]`` when drop set ``j`` drops example ``i``."""
        k = self.n_dropped(n_train)
        return sample_subsets(n_train, self.m, k / n_train, self.subset_seed)


Protocol: TypeAlias = GroundTruthSpec | DropSpec


def protocol_name(spec: Protocol) -> str:
    """``"lds-half"`` or ``"fixed-seed-drop:<fraction>"``: how the bench labels its numbers."""
    return spec.protocol if isinstance(spec, DropSpec) else "lds-half"


def protocol_json(spec: Protocol) -> dict[str, Any]:
    """The protocol's name and parameters (the bench's JSON and the cache's config)."""
    return {"protocol": protocol_name(spec), **spec.__dict__}


def parse_protocol(
    text: str, m: int = 50, alpha: float | None = None, seeds: int | None = None
) -> Protocol:
    """``"lds-half"`` or ``"fixed-seed-drop:0.01"``, with the CLI's ``--m --alpha --seeds``.

    ``alpha`` (default 0.5) and ``seeds`` (default 2) belong to ``lds-half``; under
    ``fixed-seed-drop`` every retraining is the seed-0 run and the fraction is in the name,
    so giving them is refused.

    Example:
        >>> parse_protocol("fixed-seed-drop:0.01", m=50)
        DropSpec(fraction=0.01, m=50, subset_seed=0)
        >>> parse_protocol("lds-half", m=20, seeds=1).key()
        'm20-a0.5-s1-r0'
    """
    name, sep, arg = str(text).strip().partition(":")
    if name == "lds-half":
        if sep:
            raise ConfigError(
                f"protocol lds-half takes no argument (its subset fraction is --alpha, its "
                f"seeds --seeds); got {text!r}."
            )
        return GroundTruthSpec(
            m=m, alpha=0.5 if alpha is None else alpha, seeds=2 if seeds is None else seeds
        )
    if name == "fixed-seed-drop":
        try:
            fraction = float(arg)
        except ValueError:
            fraction = math.nan
        if not sep or not math.isfinite(fraction):
            raise ConfigError(
                f"protocol fixed-seed-drop needs the fraction of training examples to drop, "
                f"as in fixed-seed-drop:0.01; got {text!r}."
            )
        given = [flag for flag, v in (("--alpha", alpha), ("--seeds", seeds)) if v is not None]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} belong(s) to the lds-half protocol; {text} retrains the "
                "seed-0 run (seed 0 only) and drops the fraction in its name. Leave them out."
            )
        return DropSpec(fraction=fraction, m=m)
    raise ConfigError(
        f"unknown protocol {text!r}; choose lds-half (random half-subsets, retraining seeds "
        "vary) or fixed-seed-drop:FRACTION (the seed-0 run with a random FRACTION of its "
        "examples dropped), e.g. fixed-seed-drop:0.01."
    )


# ----------------------------------------------------------------------------- retraining
# The seed-0 run's recipe, per process (worker processes record it once for all their jobs).
_RECIPES: dict[str, TrainingRecipe] = {}


def _seed0_recipe(setting: Setting) -> TrainingRecipe:
    key = setting.recipe_hash()
    if key not in _RECIPES:
        try:
            _RECIPES[key] = setting.train_recipe(seed=0)[1]
        except ConfigError as exc:
            raise ConfigError(
                f"the fixed-seed-drop protocol replays the seed-0 run without the dropped "
                f"examples, but setting {setting.name!r} records no replay recipe: {exc} "
                "Use --protocol lds-half (or the LOO task of a convex setting) on it."
            ) from exc
    return _RECIPES[key]


def train_dropped(
    setting: Setting, dropped: torch.Tensor, recipe: TrainingRecipe | None = None
) -> torch.nn.Module:
    """The seed-0 run of ``setting`` with the ``dropped`` examples' loss weights set to 0.

    Args:
        setting: a setting that records a replay recipe (:meth:`Setting.train_recipe`).
        dropped: ``(n_train,)`` bool mask, or the 1-D long indices of the dropped examples;
            nothing dropped gives the seed-0 model bit for bit.
        recipe: the seed-0 run's recipe (default: recorded once per process).

    Returns:
        The model (eval mode), trained as in the module docstring.

    Raises:
        ConfigError: if the setting records no replay recipe.
    """
    recipe = recipe or _seed0_recipe(setting)
    n = setting.n_train
    mask = torch.as_tensor(dropped)
    if mask.dtype != torch.bool:
        mask = torch.zeros(n, dtype=torch.bool).index_fill_(0, mask.to(torch.long), True)
    model = setting.build_model(0).eval()
    replay = Replay(setting.make_task(model), recipe, setting.data.train)
    weights = (~mask).to(setting.torch_dtype)
    state = replay.start()
    for _ in range(recipe.num_steps):
        state = replay.step(state, weights)
    model.load_state_dict(replay.state_dict(state))
    return model


def _retrain_dropped(setting: Setting, dropped: torch.Tensor, seed: int) -> torch.Tensor:
    """Worker: the ``"all"`` queries' targets after the seed-0 run without ``dropped``."""
    del seed  # always 0: the protocol replays the seed-0 run
    model = train_dropped(setting, dropped)
    return setting.measure(model, "all").detach().to(torch.float64)


@dataclass(frozen=True)
class DropGroundTruth(SubsetGroundTruth):
    """Targets of every query after the seed-0 run without each drop set.

    ``subsets`` are the *kept* sets (so :func:`datatrace.metrics.lds` scores it as it scores
    ``lds-half``; see the module docstring), ``targets`` the retrained targets, ``per_seed``
    the same with one seed, ``train_seeds`` all 0.

    Attributes:
        full: ``(n_query,)`` float64 targets of the seed-0 run itself (nothing dropped).
        fraction: the protocol's drop fraction.

    Example:
        >>> kept = torch.tensor([[True, False, True], [False, True, True]])
        >>> targets = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> gt = DropGroundTruth(kept, targets, targets[:, None], torch.zeros(2, 1),
        ...                      full=torch.tensor([2.0], dtype=torch.float64), fraction=1 / 3)
        >>> gt.dropped.nonzero().tolist(), gt.changes.squeeze(1).tolist()
        ([[0, 1], [1, 0]], [-1.0, 1.0])
    """

    full: torch.Tensor
    fraction: float

    @property
    def dropped(self) -> torch.Tensor:
        """``(m, n_train)`` bool: the examples each retraining dropped."""
        return ~self.subsets

    @property
    def changes(self) -> torch.Tensor:
        """``(m, n_query)`` actual change of each query's target caused by each drop set."""
        return self.targets - self.full


def drop_ground_truth(
    setting: Setting,
    spec: DropSpec | None = None,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> DropGroundTruth:
    """Targets of every query (val then test) under ``fixed-seed-drop``; cached and resumable.

    One shard per drop set plus one (``full``) for the seed-0 run replayed with nothing
    dropped, in a store keyed by the setting's recipe hash and the protocol (as
    :func:`~datatrace.bench.cache.lds_ground_truth`; also under ``torchrun``).

    Args:
        setting: a setting that records a replay recipe.
        spec: the protocol (default ``DropSpec()``: 50 drop sets of 1%).
        cache_dir: where stores live (default :func:`~datatrace.bench.cache.default_cache_dir`).
        workers: retraining processes (each uses one thread, and records the seed-0 recipe
            once); 1 runs in this process.
        progress: show a progress bar.

    Raises:
        ConfigError: if the setting records no replay recipe, or the fraction drops no
            example (or all of them).
    """
    spec = spec or DropSpec()
    _check_workers(workers)
    dropped = spec.dropped(setting.n_train)
    _seed0_recipe(setting)  # refuse a setting without a recipe before opening a store
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    config = {"setting": setting.to_json(), "spec": protocol_json(spec)}
    _check_same_job(config)
    store = distributed.open_store(
        root / f"{setting.name}-{setting.recipe_hash()}-{spec.key()}",
        config=config,
        fingerprints={"recipe": setting.recipe_hash()},
    )
    jobs = [] if store.has_shard("full", 0) else [("full", 0, torch.zeros(0, dtype=torch.long), 0)]
    jobs += [
        ("drop", j, dropped[j].nonzero().squeeze(1), 0)
        for j in range(spec.m)
        if not store.has_shard("drop", j)
    ]
    desc = f"{setting.name}: {spec.protocol} ground truth"
    _run_split(setting, store, jobs, workers, desc, progress, _retrain_dropped)
    targets = torch.stack([store.read_shard("drop", j, mmap=False) for j in range(spec.m)])
    return DropGroundTruth(
        subsets=~dropped,
        targets=targets,
        per_seed=targets.unsqueeze(1),
        train_seeds=torch.zeros(spec.m, 1, dtype=torch.int64),
        full=store.read_shard("full", 0, mmap=False),
        fraction=spec.fraction,
    )


def ground_truth(
    setting: Setting,
    spec: Protocol,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> SubsetGroundTruth:
    """The cached ground truth of ``spec``'s protocol: what ``datatrace bench`` scores against."""
    if isinstance(spec, DropSpec):
        return drop_ground_truth(
            setting, spec, cache_dir=cache_dir, workers=workers, progress=progress
        )
    return lds_ground_truth(setting, spec, cache_dir=cache_dir, workers=workers, progress=progress)
