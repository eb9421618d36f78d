"""LoRA Ensemble members (DESIGN.md §4; Deng et al., 2024, "Efficient Ensembles Improve
Training Data Attribution"): one base model trained once, ``K`` low-rank adapters.

A LoRA adapter (Hu et al., 2021) replaces a linear layer ``z = W x + b`` by

    z = W x + b + s · B A x,   A: (r, in), B: (out, r), s = alpha / r,

with the base ``W, b`` frozen. Member ``k`` of a LoRA Ensemble is the base model with adapter
``k``, fine-tuned from the base with its own seed (initialisation of ``A``) and data order.
Attribution differentiates the adapted model either w.r.t. the adapter parameters
(``params="adapter"``: ``r (in + out)`` features per layer instead of ``in · out``) or
w.r.t. the full parameters (``params="full"``: the task's tracked parameters; since ``z``
is linear in ``W``, their gradient equals the gradient w.r.t. the merged ``W + s B A``).

The tested core is our own :class:`LoRALinear` wrapper; adapters trained with ``peft`` are
accepted as input (:func:`lora_members` reads a ``PeftModel`` or its adapter state dict),
without importing ``peft``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datatrace._seeds import dropout_lora_seed
from datatrace.data import Batch, num_examples, take_examples
from datatrace.ensemble import ModifiedMember, _as_trajectory, _check_k
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.task import Checkpoint, Task

__all__ = ["LoRALinear", "LoRAMember", "apply_lora", "lora_members", "train_lora_members"]

LoRAParams = Literal["adapter", "full"]


class LoRALinear(nn.Linear):
    """``W x + b + scaling · B A x``: an ``nn.Linear`` that keeps the base layer's parameters.

    The base weight and bias keep their names (``weight``, ``bias``), so checkpoints of the
    base model load unchanged; the adapter is ``lora_A.weight`` ``(rank, in)`` and
    ``lora_B.weight`` ``(out, rank)``. ``B`` starts at zero, so a fresh adapter leaves the
    model's function unchanged. Both factors are ``nn.Linear`` layers, so the hook engine
    forms their per-sample gradients from layer factors.

    Example:
        >>> layer = LoRALinear(nn.Linear(4, 3), rank=2, scaling=1.0)
        >>> sorted(n for n, _ in layer.named_parameters())
        ['bias', 'lora_A.weight', 'lora_B.weight', 'weight']
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would re-initialise the weights
        _check_rank(rank)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.scaling = rank, float(scaling)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * self.lora_B(self.lora_A(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an int >= 1; got {rank!r}.")


def _linear_names(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and ".lora_" not in f".{n}"
    ]


def _check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    bad = [t for t in targets if t not in modules or not isinstance(modules[t], nn.Linear)]
    if bad:
        linears = _linear_names(model)
        raise ModelError(
            f"LoRA target modules {bad} do not exist or are not nn.Linear layers; the model's "
            f"Linear layers are {linears[:20]}{' ...' if len(linears) > 20 else ''}."
        )
    wrapped = [t for t in targets if isinstance(modules[t], LoRALinear)]
    if wrapped:
        raise ModelError(f"modules {wrapped} already carry a LoRA adapter.")


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, scaling: float) -> nn.Module:
    """Replace the ``targets`` Linear layers of ``model`` by :class:`LoRALinear`, in place.

    Example:
        >>> net = apply_lora(nn.Sequential(nn.Linear(4, 3)), ["0"], rank=2, scaling=1.0)
        >>> type(net[0]).__name__
        'LoRALinear'
    """
    _check_rank(rank)
    targets = list(targets)
    if not targets:
        raise ConfigError("LoRA needs at least one target module; got an empty list.")
    _check_targets(model, targets)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not child:
            raise ModelError("the model itself is a Linear layer; wrap it in nn.Sequential first.")
        base = getattr(parent, child)
        assert isinstance(base, nn.Linear)  # checked by _check_targets
        setattr(parent, child, LoRALinear(base, rank, scaling))
    return model


def _adapter_names(targets: Sequence[str]) -> list[str]:
    return [f"{t}.lora_{ab}.weight" for t in targets for ab in ("A", "B")]


def _derived_task(task: Task, model: nn.Module, params: Sequence[str]) -> Task:
    """``task`` with another model and tracked parameters (loss, target, inputs unchanged)."""
    derived = copy.copy(task)
    derived.model = model
    derived._tracked = derived._select_params(list(params), None)
    derived.checkpoints = []
    return derived


@dataclass(frozen=True, eq=False)
class LoRAMember(ModifiedMember):
    """One member of a LoRA Ensemble: the base model (``trajectory``, default the task's
    model) with a LoRA adapter.

    Attributes:
        adapter: ``{"<module>.lora_A.weight": (rank, in), "<module>.lora_B.weight": (out, rank)}``.
        rank: the adapter rank r >= 1.
        scaling: ``s = alpha / rank``.
        targets: names of the adapted ``nn.Linear`` modules.
        params: ``"adapter"`` (gradients w.r.t. the adapter) or ``"full"`` (w.r.t. the task's
            tracked parameters of the adapted model).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
        >>> adapter = {"0.lora_A.weight": torch.randn(2, 4), "0.lora_B.weight": torch.randn(3, 2)}
        >>> member = LoRAMember(adapter=adapter, rank=2, scaling=1.0, targets=("0",))
        >>> with member.applied(Task(model)) as task:
        ...     task.tracked_names
        ['0.lora_A.weight', '0.lora_B.weight']
    """

    kind: ClassVar[str] = "lora"
    adapter: Mapping[str, torch.Tensor] = field(default_factory=dict)
    rank: int = 8
    scaling: float = 1.0
    targets: tuple[str, ...] = ()
    params: LoRAParams = "adapter"

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ConfigError(f"LoRA scaling must be a number; got {self.scaling!r}.")
        if not math.isfinite(self.scaling):
            raise ConfigError(f"LoRA scaling must be finite; got {self.scaling!r}.")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(
                f"targets must be a non-empty list of Linear module names; got {self.targets!r}."
            )
        object.__setattr__(self, "targets", targets)
        if self.params not in ("adapter", "full"):
            raise ConfigError(f"params must be 'adapter' or 'full'; got {self.params!r}.")
        expected = set(_adapter_names(targets))
        missing, extra = sorted(expected - set(self.adapter)), sorted(set(self.adapter) - expected)
        if missing or extra:
            raise ModelError(
                f"the adapter does not match targets {list(targets)}: missing {missing[:6]}, "
                f"unexpected {extra[:6]}; it needs '<module>.lora_A.weight' and "
                "'<module>.lora_B.weight' for every target."
            )
        for t in targets:
            a, b = self.adapter[f"{t}.lora_A.weight"], self.adapter[f"{t}.lora_B.weight"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise ModelError(
                    f"adapter of {t!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                    f"rank {self.rank} needs lora_A (rank, in) and lora_B (out, rank)."
                )

    __eq__ = object.__eq__  # identity: comparing adapters of tensors elementwise is no test
    __hash__ = object.__hash__

    def validate(self, task: Task) -> None:
        _check_targets(task.model, self.targets)
        modules = dict(task.model.named_modules())
        for t in self.targets:
            layer = modules[t]
            assert isinstance(layer, nn.Linear)
            a, b = self.adapter[f"{t}.lora_A.weight"], self.adapter[f"{t}.lora_B.weight"]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ModelError(
                    f"adapter of {t!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                    f"but the layer maps {layer.in_features} -> {layer.out_features} features; "
                    "members must share the task model's architecture."
                )

    @contextmanager
    def applied(self, task: Task) -> Iterator[Task]:
        """A task over a copy of the model with the adapted layers (weights come from states)."""
        self.validate(task)
        model = apply_lora(copy.deepcopy(task.model), self.targets, self.rank, self.scaling)
        params = _adapter_names(self.targets) if self.params == "adapter" else task.tracked_names
        yield _derived_task(task, model, params)

    def states(self, task: Task) -> list[tuple[Checkpoint | None, dict[str, torch.Tensor]]]:
        adapter = dict(self.adapter)
        if not self.trajectory:
            return [(None, task.state(Checkpoint({**task.state(), **adapter})))]
        return [(c, task.state(replace(c, state={**c.load(), **adapter}))) for c in self.trajectory]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "scaling": self.scaling,
            "targets": list(self.targets),
            "params": self.params,
        }


# ----------------------------------------------------------------------------- constructors
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


def _from_peft_model(obj: Any) -> tuple[dict[str, torch.Tensor], float, int]:
    """Adapter, scaling and rank of a ``peft`` ``PeftModel`` (its active adapter)."""
    name = getattr(obj, "active_adapter", "default")
    name = name[0] if isinstance(name, (list, tuple)) else name
    config = obj.peft_config[name]
    rank = int(config.r)
    scaling = float(config.lora_alpha) / (math.sqrt(rank) if config.use_rslora else rank)
    state = {
        k: v
        for k, v in obj.state_dict().items()
        if f".lora_A.{name}." in k or f".lora_B.{name}." in k
    }
    return _normalise_adapter(state), scaling, rank


def _normalise_adapter(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter keys as ``<module>.lora_A.weight``; accepts ours and peft's naming."""
    out = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ModelError(
                f"adapter key {key!r} is not a LoRA weight; expected '<module>.lora_A.weight' "
                "and '<module>.lora_B.weight' (peft's 'base_model.model.' prefix is accepted)."
            )
        out[f"{m['module']}.lora_{m['ab']}.weight"] = value.detach()
    return out


def lora_members(
    adapters: Sequence[Any],
    *,
    alpha: float | None = None,
    base: Any = None,
    params: LoRAParams = "adapter",
) -> list[LoRAMember]:
    """LoRA members from trained adapters (the ``lora`` kind).

    Args:
        adapters: one per member: a ``peft`` ``PeftModel`` (rank and alpha read from its
            config), or an adapter state dict (ours, or peft's ``get_peft_model_state_dict``
            / ``adapter_model.safetensors`` keys).
        alpha: LoRA alpha of state-dict adapters (scaling ``alpha / rank``); default ``rank``
            (scaling 1).
        base: the base model's weights (state dict, path, Checkpoint or module); default the
            task's model.
        params: ``"adapter"`` or ``"full"`` (see :class:`LoRAMember`).

    Example:
        >>> adapter = {"0.lora_A.weight": torch.randn(2, 4), "0.lora_B.weight": torch.randn(3, 2)}
        >>> [m.targets for m in lora_members([adapter])]
        [('0',)]
    """
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence):
        raise ConfigError(
            f"adapters must be a list with one adapter per member; got {type(adapters).__name__}."
        )
    _check_k(len(adapters))
    trajectory = () if base is None else _as_trajectory(base)
    out = []
    for obj in adapters:
        if hasattr(obj, "peft_config"):
            adapter, scaling, rank = _from_peft_model(obj)
        elif isinstance(obj, Mapping):
            adapter = _normalise_adapter(obj)
            a_shapes = [v.shape[0] for k, v in adapter.items() if k.endswith("lora_A.weight")]
            if not a_shapes:
                raise ModelError("the adapter has no '<module>.lora_A.weight' entries.")
            rank = int(a_shapes[0])
            scaling = (float(alpha) if alpha is not None else rank) / rank
        else:
            raise ConfigError(
                f"cannot read a LoRA adapter from a {type(obj).__name__}; pass a peft PeftModel or "
                "an adapter state dict."
            )
        targets = tuple(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in adapter))
        out.append(
            LoRAMember(
                trajectory,
                adapter=adapter,
                rank=rank,
                scaling=scaling,
                targets=targets,
                params=params,
            )
        )
    return out


def _take(data: Batch, idx: torch.Tensor) -> Batch:
    if isinstance(data, (Mapping, tuple, list)):
        return take_examples(data, idx)
    raise DataError(
        f"train_lora_members needs the training data as a tuple or dict of tensors; got "
        f"{type(data).__name__}."
    )


def train_lora_members(
    task: Task,
    train: Batch,
    k: int,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    epochs: int = 5,
    lr: float = 1e-2,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    base: Any = None,
    params: LoRAParams = "adapter",
) -> list[LoRAMember]:
    """Fine-tune ``k`` LoRA adapters from one base model; member ``j`` has its own seed.

    Each adapter starts from ``A`` uniform in ``±1/sqrt(in)`` (seeded by ``(seed, j)``) and
    ``B = 0``, and is trained with Adam on the mean training loss over minibatches in an
    order also seeded by ``(seed, j)``. The base weights stay frozen and the model stays in
    eval mode (dropout off, normalisation statistics fixed).

    Args:
        task: the task (its model is the base unless ``base`` is given).
        train: training examples, a tuple or dict of tensors.
        k: number of members, >= 1.
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha (scaling ``alpha / rank``); default ``rank``.
        targets: Linear modules to adapt; default every ``nn.Linear`` of the model.
        epochs: passes over ``train`` per adapter.
        lr: Adam learning rate.
        batch_size: examples per step.
        weight_decay: Adam's L2 penalty on the adapter.
        seed: base seed of initialisations and data orders.
        base: base weights (as for :func:`lora_members`).
        params: ``"adapter"`` or ``"full"`` gradients at attribution time.

    Example:
        >>> task = Task(nn.Sequential(nn.Linear(4, 3)).eval())
        >>> data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> len(train_lora_members(task, data, 2, rank=2, epochs=1))
        2
    """
    _check_k(k)
    _check_rank(rank)
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}; got {value!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a number > 0; got {lr!r}.")
    targets = list(targets) if targets is not None else _linear_names(task.model)
    if not targets:
        raise ModelError("the model has no nn.Linear layers to adapt; pass targets=.")
    scaling = (float(alpha) if alpha is not None else rank) / rank
    trajectory = () if base is None else _as_trajectory(base)
    n = num_examples(train)
    names = _adapter_names(targets)
    model = apply_lora(copy.deepcopy(task.model), targets, rank, scaling)
    effective = _derived_task(task, model, names)
    frozen = task.state(trajectory[-1] if trajectory else None)
    frozen = {**effective.state(), **frozen}
    shapes = {n_: p.shape for n_, p in effective.tracked_params().items()}
    members = []
    for j in range(k):
        gen = torch.Generator().manual_seed(dropout_lora_seed("lora", seed, j))
        adapter = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("lora_A.weight"):
                u = torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * 2 - 1
                adapter[name] = (u / math.sqrt(shape[1])).to(task.dtype).to(task.device)
            else:
                adapter[name] = torch.zeros(shape, dtype=task.dtype, device=task.device)
            adapter[name].requires_grad_(True)
        opt = torch.optim.Adam(adapter.values(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                split = effective.split_batch(_take(train, idx))
                with torch.enable_grad():
                    out = effective.outputs({**frozen, **adapter}, split)
                    loss = effective.loss_from_outputs(out, split).mean()
                    opt.zero_grad()
                    loss.backward()
                opt.step()
        trained = {name: t.detach().clone() for name, t in adapter.items()}
        members.append(
            LoRAMember(
                trajectory,
                adapter=trained,
                rank=rank,
                scaling=scaling,
                targets=tuple(targets),
                params=params,
            )
        )
    return members
