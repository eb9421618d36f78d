"""Replaying a recorded training run, differentiably (the ``unrolled`` method reads it).

A :class:`TrainingRecipe` is what a deterministic replay needs: the initial weights, the
training indices of every optimizer step, the learning rate of every step, the optimizer
(SGD with momentum/Nesterov/weight decay, Adam or AdamW, with their hyperparameters), the
loss reduction and, where the run drew random numbers (dropout in train mode, data
augmentation), the seed of every step. Record it in your own loop with
:meth:`datatrace.recording.CheckpointRecorder.attach` / ``record_step`` / ``recipe``.

The replay step is written out of place so that autograd sees it end to end. Step ``t``
trains on the examples ``B_t`` with the weighted loss

    J_t(θ; w) = Σ_{i ∈ B_t} w_i ℓ_i(θ) / |B_t|          (``reduction="mean"``)
                Σ_{i ∈ B_t} w_i ℓ_i(θ)                   (``reduction="sum"``)

which at ``w = 1`` is the loss the user's loop minimised, and applies the optimizer's update
to ``∇_θ J_t``. The formulas follow torch.optim's single-tensor (CPU) implementations op by
op, so that a float64 replay agrees with the user's run to the last bits or nearly so.

Adam's ``sqrt(v)`` is not differentiable at ``v = 0`` (a weight whose gradient has been
exactly 0 so far, e.g. a first-layer weight of an always-black pixel). There ``m = 0`` and
the first-order change of ``v`` is ``2 (1 - β2) g δg = 0``, so the update's derivative is
``δm / (sqrt(v̂) + eps)`` with no term through ``v``: :func:`_sqrt` returns the same value as
``torch.sqrt`` with a zero derivative at 0, which is that derivative. ``eps > 0`` is required.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from datatrace.errors import ConfigError, ModelError

__all__ = [
    "OptimizerSpec",
    "Replay",
    "ReplayState",
    "ReplayStep",
    "TrainingRecipe",
    "initial_replay_state",
    "optimizer_update",
]

OptimizerKind = Literal["sgd", "adam", "adamw"]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of a recorded run and its hyperparameters (the learning rate is per step).

    Attributes:
        kind: ``"sgd"``, ``"adam"`` or ``"adamw"`` (decoupled weight decay).
        weight_decay: SGD's and Adam's L2 term added to the gradient; AdamW's decoupled decay.
        momentum: SGD momentum (0: none).
        dampening: SGD dampening.
        nesterov: SGD Nesterov momentum.
        betas: Adam(W) ``(β1, β2)``.
        eps: Adam(W) ``eps`` (> 0).

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        >>> OptimizerSpec.from_optimizer(opt)
        OptimizerSpec(kind='sgd', weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, betas=(0.9, 0.999), eps=1e-08)
    """

    kind: OptimizerKind
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.kind not in ("sgd", "adam", "adamw"):
            raise ConfigError(
                f"optimizer kind {self.kind!r} cannot be replayed; supported: 'sgd', 'adam', "
                "'adamw'."
            )
        for name in ("weight_decay", "momentum", "dampening"):
            value = getattr(self, name)
            if not (_number(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0; got {value!r}.")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"nesterov must be True or False; got {self.nesterov!r}.")
        b1, b2 = self.betas if len(self.betas) == 2 else (None, None)
        if not (_number(b1) and _number(b2) and 0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConfigError(f"betas must be two numbers in [0, 1); got {self.betas!r}.")
        if not (_number(self.eps) and self.eps > 0):
            raise ConfigError(
                f"eps must be a finite number > 0 (Adam's update divides by sqrt(v) + eps, "
                f"and v is 0 for a weight whose gradient has been 0); got {self.eps!r}."
            )

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        """The spec of a torch optimizer; refuses what the replay does not reproduce."""
        name = type(optimizer).__name__
        # exact classes only: a subclass may override step() with an update we do not know
        kinds = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
        kind = kinds.get(type(optimizer))
        if kind is None:
            raise ConfigError(
                f"optimizer {name} cannot be replayed; the unrolled replay supports "
                "torch.optim.SGD (momentum, dampening, nesterov, weight_decay), torch.optim.Adam "
                "and torch.optim.AdamW."
            )
        specs = {cls._spec_of_group(kind, name, g) for g in optimizer.param_groups}
        if len(specs) != 1:
            raise ConfigError(
                f"the {name} optimizer's parameter groups use different hyperparameters "
                f"{sorted(map(repr, specs))}; the replay needs one setting for every parameter "
                "(learning rates may change from step to step, but must be equal across groups)."
            )
        return specs.pop()

    @classmethod
    def _spec_of_group(cls, kind: str, name: str, group: Mapping[str, Any]) -> OptimizerSpec:
        for flag in ("maximize", "amsgrad"):
            if group.get(flag):
                raise ConfigError(
                    f"{name}({flag}=True) cannot be replayed; train with {flag}=False."
                )
        if kind == "sgd":
            return cls(
                "sgd",
                weight_decay=float(group["weight_decay"]),
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                nesterov=bool(group["nesterov"]),
            )
        b1, b2 = group["betas"]
        return cls(
            kind,  # type: ignore[arg-type]
            weight_decay=float(group["weight_decay"]),
            betas=(float(b1), float(b2)),
            eps=float(group["eps"]),
        )

    def slots(self) -> tuple[str, ...]:
        """Names of the per-parameter state tensors the optimizer keeps."""
        if self.kind == "sgd":
            return ("momentum_buffer",) if self.momentum != 0 else ()
        return ("exp_avg", "exp_avg_sq")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "betas": list(self.betas),
            "eps": self.eps,
        }


@dataclass(frozen=True)
class ReplayStep:
    """One optimizer step of a recorded run.

    Attributes:
        indices: training examples of the step's batch (indices into the training set).
        learning_rate: the learning rate of the step.
        seed: the seed the loop passed to ``torch.manual_seed`` right before the step's
            forward pass (dropout, augmentation), or None when the step drew nothing.
    """

    indices: tuple[int, ...]
    learning_rate: float
    seed: int | None = None


@dataclass(frozen=True)
class TrainingRecipe:
    """A deterministic training run the library can replay (see the module docstring).

    Attributes:
        initial_state: the model's state dict before the first step.
        optimizer: the optimizer and its hyperparameters.
        steps: every optimizer step, in order.
        params: names (as ``model.named_parameters()`` gives them) of the parameters the
            optimizer updates; the others stay at their initial values.
        final_state: the weights the user's run ended with (checked by the replay).
        reduction: how a step's per-example losses were combined: ``"mean"`` over its
            batch or ``"sum"``.
        train_mode: whether the model ran in train mode with random modules (dropout);
            every step then needs its seed.
        augment: ``augment(batch, generator) -> batch``, the data augmentation the loop
            applied to each step's batch with a generator seeded by the step's seed.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> recipe = TrainingRecipe(model.state_dict(), OptimizerSpec("sgd"),
        ...                         (ReplayStep((0, 1), 0.1),), ("weight", "bias"))
        >>> recipe.num_steps, recipe.to_json()["optimizer"]["kind"]
        (1, 'sgd')
    """

    initial_state: Mapping[str, torch.Tensor]
    optimizer: OptimizerSpec
    steps: tuple[ReplayStep, ...]
    params: tuple[str, ...]
    final_state: Mapping[str, torch.Tensor] | None = None
    reduction: Literal["mean", "sum"] = "mean"
    train_mode: bool = False
    augment: Callable[[Any, torch.Generator], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "params", tuple(self.params))
        if not isinstance(self.optimizer, OptimizerSpec):
            raise ConfigError(
                f"optimizer must be an OptimizerSpec; got {type(self.optimizer).__name__}."
            )
        if self.reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum'; got {self.reduction!r}.")
        if not self.params:
            raise ConfigError("a recipe must name the parameters its optimizer updates.")
        missing = [p for p in self.params if p not in self.initial_state]
        if missing:
            raise ModelError(f"the recipe's initial_state lacks the trained parameters {missing}.")
        for k, s in enumerate(self.steps, start=1):
            if not isinstance(s, ReplayStep):
                raise ConfigError(f"step {k} is a {type(s).__name__}, not a ReplayStep.")
            if not s.indices:
                raise ConfigError(f"step {k} trains on no example; every step needs its indices.")
            if not (_number(s.learning_rate) and s.learning_rate >= 0):
                raise ConfigError(
                    f"step {k} has learning rate {s.learning_rate!r}; it must be a number >= 0."
                )
        if self.augment is not None and not callable(self.augment):
            raise ConfigError(f"augment must be a callable; got {type(self.augment).__name__}.")
        self._check_seeds()

    def _check_seeds(self) -> None:
        unseeded = [k for k, s in enumerate(self.steps, start=1) if s.seed is None]
        if not unseeded:
            return
        for needs, what in (
            (self.augment is not None, "data augmentation"),
            (self.train_mode, "dropout in train mode"),
        ):
            if needs:
                raise ConfigError(
                    f"the recipe has {what} but no recorded seed at step(s) {unseeded[:5]}"
                    f"{' ...' if len(unseeded) > 5 else ''}; the replay cannot redraw its random "
                    "numbers. Seed each step (torch.manual_seed(seed) before its forward pass) "
                    "and record it: recorder.record_step(indices, seed=seed)."
                )

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def to_json(self) -> dict[str, Any]:
        """JSON-able description (no tensors): what the replay does, for manifests and logs."""
        lrs = [s.learning_rate for s in self.steps]
        return {
            "optimizer": self.optimizer.to_json(),
            "steps": len(self.steps),
            "examples_per_step": sorted({len(s.indices) for s in self.steps}),
            "learning_rates": [min(lrs), max(lrs)] if lrs else [],
            "params": list(self.params),
            "reduction": self.reduction,
            "train_mode": self.train_mode,
            "augment": None if self.augment is None else getattr(self.augment, "__name__", "?"),
        }


# ----------------------------------------------------------------------------- the update
@dataclass
class ReplayState:
    """Weights and optimizer state after ``step`` updates.

    Attributes:
        step: updates taken.
        params: the trained parameters, in :attr:`TrainingRecipe.params` order.
        slots: ``{slot name: one tensor per parameter}`` (see :meth:`OptimizerSpec.slots`);
            SGD's momentum buffer exists from the first update on.
    """

    step: int
    params: list[torch.Tensor]
    slots: dict[str, list[torch.Tensor]]

    def tensors(self) -> list[torch.Tensor]:
        """Parameters then slots, flat (what the reverse pass differentiates)."""
        return [*self.params, *(t for name in sorted(self.slots) for t in self.slots[name])]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> ReplayState:
        """The same layout filled with ``tensors`` (as :meth:`tensors` orders them)."""
        n = len(self.params)
        out = ReplayState(self.step, list(tensors[:n]), {})
        k = n
        for name in sorted(self.slots):
            out.slots[name] = list(tensors[k : k + n])
            k += n
        return out

    def detached(self) -> ReplayState:
        return self.with_tensors([t.detach() for t in self.tensors()])


def initial_replay_state(spec: OptimizerSpec, params: Sequence[torch.Tensor]) -> ReplayState:
    """The state before the first update (Adam's moments at 0, no SGD buffer yet)."""
    slots = {}
    if spec.kind in ("adam", "adamw"):
        slots = {name: [torch.zeros_like(p) for p in params] for name in spec.slots()}
    return ReplayState(0, [p.detach().clone() for p in params], slots)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)``, bit for bit, whose derivative at ``v = 0`` is taken as 0 (module docstring)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


def optimizer_update(
    spec: OptimizerSpec,
    state: ReplayState,
    grads: Sequence[torch.Tensor],
    lr: float,
) -> ReplayState:
    """One update of ``spec`` from ``state`` with gradients ``grads``, out of place.

    Mirrors torch.optim's single-tensor SGD / Adam / AdamW step (torch >= 2.1).
    """
    t = state.step + 1
    wd = spec.weight_decay
    new_params: list[torch.Tensor] = []
    new_slots: dict[str, list[torch.Tensor]] = {name: [] for name in spec.slots()}
    for i, (p, g) in enumerate(zip(state.params, grads)):
        if spec.kind == "sgd":
            if wd != 0:
                g = g.add(p, alpha=wd)
            if spec.momentum != 0:
                if t == 1:  # torch starts the buffer at the first gradient, undamped
                    buf = g
                else:
                    buf = state.slots["momentum_buffer"][i].mul(spec.momentum)
                    buf = buf.add(g, alpha=1 - spec.dampening)
                new_slots["momentum_buffer"].append(buf)
                g = g.add(buf, alpha=spec.momentum) if spec.nesterov else buf
            new_params.append(p.add(g, alpha=-lr))
            continue
        beta1, beta2 = spec.betas
        if wd != 0:
            if spec.kind == "adamw":
                p = p.mul(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m = state.slots["exp_avg"][i].lerp(g, 1 - beta1)
        v = state.slots["exp_avg_sq"][i].mul(beta2).addcmul(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        denom = (_sqrt(v) / bias_correction2_sqrt).add(spec.eps)
        new_params.append(p.addcdiv(m, denom, value=-step_size))
        new_slots["exp_avg"].append(m)
        new_slots["exp_avg_sq"].append(v)
    return ReplayState(t, new_params, new_slots)


# ----------------------------------------------------------------------------- the replay
class Replay:
    """Runs a recipe's steps on a task's model and training data (see the module docstring).

    Args:
        task: the :class:`~datatrace.task.Task` whose model and per-example loss the run used.
        recipe: the recorded run.
        train: the training set the recipe's indices point into (any form the attributors
            accept: tensors, a tuple or dict of tensors, a map-style ``Dataset``).

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(3, 2).double().eval()
        >>> train = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
        >>> recipe = TrainingRecipe(model.state_dict(), OptimizerSpec("sgd"),
        ...                         [ReplayStep((0, 1), 0.1), ReplayStep((2, 3), 0.1)],
        ...                         ("weight", "bias"))
        >>> replay = Replay(Task(model), recipe, train)
        >>> replay.run().step
        2
    """

    def __init__(self, task: Any, recipe: TrainingRecipe, train: Any) -> None:
        from datatrace.data import as_data, num_examples

        self.task, self.recipe = task, recipe
        self.train = as_data(train)
        n = num_examples(self.train)
        top = max((max(s.indices) for s in recipe.steps), default=-1)
        low = min((min(s.indices) for s in recipe.steps), default=0)
        if top >= n or low < 0:
            raise ConfigError(
                f"the recipe's steps train on indices from {low} to {top}, but the training set "
                f"passed to fit() has {n} examples; pass the training set the run indexed."
            )
        model_state = task.state()
        unknown = [p for p in recipe.params if p not in dict(task.model.named_parameters())]
        if unknown:
            raise ModelError(
                f"the recipe trains parameters {unknown[:5]} that the task's model does not have."
            )
        for name, ref in model_state.items():
            init = recipe.initial_state.get(name)
            if init is None:
                raise ModelError(f"the recipe's initial_state lacks {name!r}, which the model has.")
            if tuple(init.shape) != tuple(ref.shape):
                raise ModelError(
                    f"the recipe's initial {name!r} has shape {tuple(init.shape)} but the "
                    f"model's has {tuple(ref.shape)}."
                )
        device = task.device
        self.frozen = {
            k: v.to(device=device, dtype=model_state[k].dtype)
            for k, v in recipe.initial_state.items()
            if k in model_state and k not in recipe.params
        }
        self.initial = [
            recipe.initial_state[p].to(device=device, dtype=model_state[p].dtype)
            for p in recipe.params
        ]

    def start(self) -> ReplayState:
        """The state before the first step."""
        return initial_replay_state(self.recipe.optimizer, self.initial)

    def state_dict(self, state: ReplayState) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model at ``state``."""
        return {**self.frozen, **dict(zip(self.recipe.params, state.params))}

    def step(
        self,
        state: ReplayState,
        weights: torch.Tensor | None = None,
        create_graph: bool = False,
    ) -> ReplayState:
        """The update ``state.step + 1`` of the run, with per-example loss ``weights``.

        Args:
            state: the state after ``state.step`` updates.
            weights: ``(n_train,)`` weights ``w_i`` of the examples' losses (None: all 1).
            create_graph: keep the graph (the result is differentiable in ``state`` and
                ``weights``); otherwise the result is detached.
        """
        from datatrace.data import take_examples

        k = state.step
        spec = self.recipe.steps[k]
        idx = torch.as_tensor(spec.indices, dtype=torch.long)
        batch = take_examples(self.train, idx)
        if self.recipe.augment is not None:
            assert spec.seed is not None  # TrainingRecipe refuses augmentation without seeds
            batch = self.recipe.augment(batch, torch.Generator().manual_seed(spec.seed))
        split = self.task.split_batch(batch)
        params = (
            state.params
            if create_graph
            else [p.detach().requires_grad_(True) for p in state.params]
        )
        full = {**self.frozen, **dict(zip(self.recipe.params, params))}
        with self._randomness(spec.seed):
            outputs = self.task.outputs(full, split)
        losses = self.task.loss_from_outputs(outputs, split)
        if weights is not None:
            losses = losses * weights[idx.to(weights.device)]
        loss = losses.sum()
        if self.recipe.reduction == "mean":
            loss = loss / len(spec.indices)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        current = ReplayState(k, list(params), state.slots)
        new = optimizer_update(self.recipe.optimizer, current, grads, spec.learning_rate)
        return new if create_graph else new.detached()

    def run(
        self, keep_every: int | None = None, weights: torch.Tensor | None = None
    ) -> ReplayState:
        """Replay every step (no graph); with ``keep_every``, :attr:`kept` holds the states
        at steps ``0, keep_every, 2 keep_every, ...`` (detached).

        Args:
            keep_every: keep every ``keep_every``-th state (None: none).
            weights: ``(n_train,)`` loss weights of the examples in every step (None: all 1,
                the recorded run).
        """
        state = self.start()
        self.kept: dict[int, ReplayState] = {}
        for _ in range(self.recipe.num_steps):
            if keep_every is not None and state.step % keep_every == 0:
                self.kept[state.step] = state
            state = self.step(state, weights)
        return state

    def _randomness(self, seed: int | None) -> Any:
        """Inside: the model in the recorded mode, the global generator seeded as recorded."""
        import contextlib

        if not self.recipe.train_mode:
            return contextlib.nullcontext()
        return _TrainModeSeeded(self.task, seed)


class _TrainModeSeeded:
    """Train mode and ``torch.manual_seed(seed)`` inside; modes and generators restored after."""

    def __init__(self, task: Any, seed: int | None) -> None:
        self.task, self.seed = task, seed

    def __enter__(self) -> None:
        model = self.task.model
        self.modes = {m: m.training for m in model.modules()}
        device = self.task.device
        self.rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        self.rng.__enter__()
        assert self.seed is not None
        torch.manual_seed(self.seed)
        model.train()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes.items():
            m.training = mode
        self.rng.__exit__(*exc)
