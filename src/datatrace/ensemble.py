"""Ensemble members (DESIGN.md §2, §4): what the shared loop iterates over.

A member is one model of an ensemble. Three kinds exist (DESIGN.md §8 ids):

- ``independent``: a :class:`~datatrace.task.Member`, i.e. a trajectory of checkpoints of
  one training run (TracIn and Source read the whole trajectory, other methods its final
  checkpoint). Members trained on random subsets of the training set, as in TRAK, are the
  same kind: record the subset in ``Checkpoint.train_indices`` (see
  :func:`independent_members`); attribution still scores every training example.
- ``dropout``: a :class:`DropoutMember`, one trained model seen through a fixed Bernoulli
  mask over features (Deng et al., 2024, "Efficient Ensembles Improve Training Data
  Attribution"). The mask is shared by all examples and seeded by ``(seed, member, layer)``,
  so scores are deterministic and batch-size invariant. It multiplies the outputs of the
  model's ``nn.Dropout`` layers (their rate, inverted scaling ``1 / (1 - p)``) or of chosen
  layers at a chosen rate; the model otherwise stays in eval mode.
- ``lora``: a :class:`datatrace.lora.LoRAMember`, one base model plus a LoRA adapter.

A member may change the *effective model* that gradients are taken of: the shared loop runs
every per-member computation (train and query features, curvature, TRAK's Q) inside
:func:`member_scope`, which yields the task of that effective model. Methods never see the
kind of member they work on. This module knows no method.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from datatrace._seeds import dropout_lora_seed
from datatrace.errors import ConfigError, ModelError
from datatrace.store import fingerprint_tensors
from datatrace.task import Checkpoint, Member, Task

__all__ = [
    "DropoutMember",
    "Member",
    "ModifiedMember",
    "dropout_members",
    "independent_members",
    "member_fingerprint",
    "member_kind",
    "member_scope",
    "member_states",
    "resolve_members",
]

# Dropout layers whose output a dropout member masks when no layers are named. Alpha dropout
# is left out on purpose: its eval-mode rescaling is not the inverted-dropout 1 / (1 - p).
_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_DROPOUT: tuple[type[nn.Module], ...] = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


# ----------------------------------------------------------------------------- member kinds
@dataclass(frozen=True)
class ModifiedMember(Member):
    """Base class of members whose effective model differs from the task's model.

    Subclasses override :meth:`applied` (the effective task), and where needed
    :meth:`states`, :meth:`validate` and :meth:`describe`.
    """

    kind: ClassVar[str] = "independent"

    @contextmanager
    def applied(self, task: Task) -> Iterator[Task]:
        """Context in which computations on the returned task see the effective model."""
        yield task

    def states(self, task: Task) -> list[tuple[Checkpoint | None, dict[str, torch.Tensor]]]:
        """``(checkpoint, state)`` per checkpoint of the trajectory, for the effective ``task``."""
        if not self.trajectory:
            return [(None, task.state())]
        return [(c, task.state(c)) for c in self.trajectory]

    def validate(self, task: Task) -> None:
        """Raise a clear error if this member cannot be applied to ``task``'s model."""

    def describe(self) -> dict[str, Any]:
        """JSON-able settings of the member (they go into store fingerprints)."""
        return {"kind": self.kind}


@dataclass(frozen=True)
class DropoutMember(ModifiedMember):
    """A trained model seen through a fixed dropout mask (DESIGN.md §4).

    Attributes:
        index: which mask of the ensemble this member is (with ``seed`` and the layer name,
            it seeds the mask).
        seed: seed of the masks.
        rate: drop probability in [0, 1). ``None`` (only without ``layers``): each
            ``nn.Dropout`` layer's own ``p``. With ``layers`` it is required.
        layers: names of modules whose outputs are masked (dropout injected there). ``None``:
            the model's ``nn.Dropout``/``Dropout1d/2d/3d`` layers.

    Masks act on the last dimension of a layer's output (hidden units; for sequences, the
    same units at every position) and, for ``Dropout1d/2d/3d``, on channels. Kept units are
    scaled by ``1 / (1 - rate)`` as in training.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        >>> member = DropoutMember(index=1, seed=0)
        >>> with member.applied(Task(model.eval())) as task:
        ...     out = task.model(torch.randn(5, 4))
        >>> out.shape
        torch.Size([5, 3])
    """

    kind: ClassVar[str] = "dropout"
    index: int = 0
    seed: int = 0
    rate: float | None = None
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ConfigError(f"dropout member index must be an int >= 0; got {self.index!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"dropout seed must be an int; got {self.seed!r}.")
        if self.rate is not None:
            _check_rate(self.rate)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(n, str) for n in layers):
                raise ConfigError(
                    f"layers must be a non-empty list of module names; got {self.layers!r}."
                )
            object.__setattr__(self, "layers", layers)
            if self.rate is None:
                raise ConfigError(
                    f"injecting dropout at layers {list(layers)} needs a rate; pass rate= "
                    "(a drop probability in [0, 1))."
                )

    def validate(self, task: Task) -> None:
        self._targets(task)

    def _targets(self, task: Task) -> list[tuple[str, nn.Module, float, bool]]:
        """``(name, module, rate, channel_wise)`` of every masked module."""
        modules = dict(task.model.named_modules())
        if self.layers is not None:
            unknown = [n for n in self.layers if n not in modules]
            if unknown:
                names = [n for n in modules if n]
                raise ModelError(
                    f"dropout layers {unknown} are not modules of the model; its modules are "
                    f"{names[:20]}{' ...' if len(names) > 20 else ''}."
                )
            assert self.rate is not None
            return [
                (n, modules[n], self.rate, isinstance(modules[n], _CHANNEL_DROPOUT))
                for n in self.layers
            ]
        found = [(n, m) for n, m in modules.items() if isinstance(m, _DROPOUT_TYPES)]
        if not found:
            raise ConfigError(
                f"the model ({type(task.model).__name__}) has no nn.Dropout layers, so a dropout "
                "ensemble has nothing to mask; pass layers=[module names] and rate= to inject "
                "dropout after those modules."
            )
        out = []
        for n, m in found:
            rate = self.rate if self.rate is not None else float(m.p)  # type: ignore[arg-type]
            if self.rate is None and not 0 <= rate < 1:
                raise ConfigError(
                    f"dropout layer {n!r} has p={rate}; a dropout member needs a rate in [0, 1), "
                    "pass rate= to override it."
                )
            out.append((n, m, rate, isinstance(m, _CHANNEL_DROPOUT)))
        return out

    def mask(
        self,
        layer: str,
        shape: Sequence[int],
        rate: float,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The mask of ``layer``: entries ``0`` or ``1 / (1 - rate)``, seeded by (seed, index, layer)."""
        _check_rate(rate)
        # numpy draws the uniforms: the mask is first needed inside a forward pass, which the
        # functional engine runs under vmap, where torch's random ops are refused.
        rng = np.random.default_rng(dropout_lora_seed("dropout", self.seed, self.index, layer))
        keep = torch.from_numpy(rng.random(tuple(int(d) for d in shape)) >= rate)
        return (keep.to(torch.float64) / (1.0 - rate)).to(dtype=dtype, device=device)

    @contextmanager
    def applied(self, task: Task) -> Iterator[Task]:
        """Masks active on ``task.model`` (forward hooks, removed on exit); yields ``task``."""
        cache: dict[tuple[Any, ...], torch.Tensor] = {}
        handles = []

        def make_hook(name: str, rate: float, channel: bool) -> Any:
            def hook(module: nn.Module, inputs: Any, out: Any) -> torch.Tensor:
                if not isinstance(out, torch.Tensor):
                    raise ModelError(
                        f"module {name!r} returns a {type(out).__name__}, not a tensor; name a "
                        "module whose output is one tensor in layers=."
                    )
                if channel:
                    if out.ndim < 2:
                        raise ModelError(
                            f"channel dropout {name!r} got an output of shape "
                            f"{tuple(out.shape)}; it needs (batch, channels, ...)."
                        )
                    shape: tuple[int, ...] = (out.shape[1],) + (1,) * (out.ndim - 2)
                else:
                    shape = (out.shape[-1],)
                key = (name, shape, out.dtype, out.device)
                if key not in cache:
                    cache[key] = self.mask(name, shape, rate, dtype=out.dtype, device=out.device)
                # A plain (unbatched) mask broadcasts over the batch, also under vmap.
                return out * cache[key]

            return hook

        for name, module, rate, channel in self._targets(task):
            handles.append(module.register_forward_hook(make_hook(name, rate, channel)))
        try:
            yield task
        finally:
            for h in handles:
                h.remove()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "index": self.index,
            "seed": self.seed,
            "rate": self.rate,
            "layers": list(self.layers) if self.layers is not None else None,
        }


def _check_rate(rate: Any) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"dropout rate must be a probability in [0, 1); got {rate!r}.")


# ----------------------------------------------------------------------------- constructors
def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"the number of members k must be an int >= 1; got {k!r}.")


def _as_checkpoint(obj: Any) -> Checkpoint:
    if isinstance(obj, Checkpoint):
        return obj
    if isinstance(obj, nn.Module):
        return Checkpoint({k: v.detach().clone() for k, v in obj.state_dict().items()})
    if isinstance(obj, (Mapping, str, Path)):
        return Checkpoint(obj)
    raise ConfigError(
        f"cannot use a {type(obj).__name__} as an ensemble member; pass a Checkpoint, a state "
        "dict, a path, an nn.Module, or a list of those (a trajectory)."
    )


def _as_trajectory(obj: Any) -> tuple[Checkpoint, ...]:
    if isinstance(obj, Member):
        return obj.trajectory
    if isinstance(obj, (list, tuple)):
        return tuple(_as_checkpoint(c) for c in obj)
    return (_as_checkpoint(obj),)


def independent_members(
    models: Sequence[Any], train_indices: Sequence[Sequence[int] | None] | None = None
) -> list[Member]:
    """Independently trained members (the ``independent`` kind), optionally on subsets.

    Args:
        models: one entry per member: a state dict, path, ``nn.Module``, :class:`Checkpoint`
            or a list of those (a trajectory).
        train_indices: per member, the training indices its run used (TRAK trains members
            on random halves); recorded on its final checkpoint.

    Example:
        >>> nets = [nn.Linear(2, 2), nn.Linear(2, 2)]
        >>> [m.final.train_indices for m in independent_members(nets, [[0, 1], [1, 2]])]
        [(0, 1), (1, 2)]
    """
    if isinstance(models, (Mapping, nn.Module, str, Path)) or not isinstance(models, Sequence):
        raise ConfigError(
            f"models must be a list with one entry per member; got {type(models).__name__}."
        )
    _check_k(len(models))
    if train_indices is not None and len(train_indices) != len(models):
        raise ConfigError(
            f"train_indices has {len(train_indices)} entries for {len(models)} models; pass one "
            "per member (None where a member used the whole training set)."
        )
    out = []
    for i, m in enumerate(models):
        traj = _as_trajectory(m)
        idx = None if train_indices is None else train_indices[i]
        if idx is not None and traj:
            final = traj[-1]
            traj = (*traj[:-1], replace(final, train_indices=tuple(int(j) for j in idx)))
        out.append(Member(traj))
    return out


def dropout_members(
    k: int,
    *,
    rate: float | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    models: Sequence[Any] | None = None,
) -> list[DropoutMember]:
    """``k`` dropout members (the ``dropout`` kind): masks ``0 .. k-1`` of ``seed``.

    Args:
        k: number of members (masks), >= 1.
        rate: drop probability in [0, 1); default: each ``nn.Dropout`` layer's own ``p``.
            Required with ``layers``.
        layers: names of modules whose outputs to mask (dropout injected there); default: the
            model's dropout layers.
        seed: seed of the masks.
        models: trained models to mask (as for ``members=``); member ``j`` uses
            ``models[j % len(models)]``. Default: the task's model.

    Example:
        >>> [m.index for m in dropout_members(3, seed=7)]
        [0, 1, 2]
    """
    _check_k(k)
    trajectories: list[tuple[Checkpoint, ...]] = [()]
    if models is not None:
        if isinstance(models, (Mapping, nn.Module, str, Path)) or not isinstance(models, Sequence):
            raise ConfigError(
                f"models must be a list of trained models; got {type(models).__name__}."
            )
        if len(models) == 0:
            raise ConfigError("models is an empty list; pass at least one model or None.")
        trajectories = [_as_trajectory(m) for m in models]
    layer_tuple = None if layers is None else tuple([layers] if isinstance(layers, str) else layers)
    return [
        DropoutMember(
            trajectories[j % len(trajectories)], index=j, seed=seed, rate=rate, layers=layer_tuple
        )
        for j in range(k)
    ]


# ----------------------------------------------------------------------------- the loop's side
def member_kind(member: Member) -> str:
    """The member's ensemble id: ``"independent"``, ``"dropout"`` or ``"lora"``."""
    return member.kind if isinstance(member, ModifiedMember) else "independent"


def resolve_members(task: Task, members: Sequence[Any] | None) -> list[Member]:
    """Normalise ``members=``; ``None`` means one member: the task's checkpoints or its model.

    Example:
        >>> task = Task(nn.Linear(2, 2).eval())
        >>> len(resolve_members(task, None))
        1
    """
    if members is None:
        return [Member(tuple(task.checkpoints))]
    if isinstance(members, (Mapping, str, Path, nn.Module, Checkpoint, Member)) or not isinstance(
        members, Sequence
    ):
        raise ConfigError(
            f"members= must be a list of members; got a single {type(members).__name__}. "
            "Wrap it in a list: members=[...]."
        )
    if len(members) == 0:
        raise ConfigError("members= is an empty list; pass at least one member or leave it None.")
    out = [m if isinstance(m, Member) else Member(_as_trajectory(m)) for m in members]
    # Fail early on architecture mismatches rather than deep inside a method.
    for m in out:
        for c in m.trajectory:
            task.state(c)
        if isinstance(m, ModifiedMember):
            m.validate(task)
    return out


@contextmanager
def member_scope(task: Task, member: Member) -> Iterator[Task]:
    """The task of ``member``'s effective model, valid inside the ``with`` block.

    Example:
        >>> task = Task(nn.Linear(2, 2).eval())
        >>> with member_scope(task, Member()) as effective:
        ...     effective is task
        True
    """
    if isinstance(member, ModifiedMember):
        with member.applied(task) as effective:
            yield effective
    else:
        yield task


def member_states(
    task: Task, member: Member
) -> list[tuple[Checkpoint | None, dict[str, torch.Tensor]]]:
    """``(checkpoint, state)`` for each checkpoint of the member's trajectory (final last).

    ``task`` is the member's effective task (from :func:`member_scope`).
    """
    if isinstance(member, ModifiedMember):
        return member.states(task)
    if not member.trajectory:
        return [(None, task.state())]
    return [(c, task.state(c)) for c in member.trajectory]


def member_fingerprint(task: Task, member: Member) -> str:
    """Hash of a member's weights and settings (stores refuse features of another member)."""
    with member_scope(task, member) as effective:
        states = [s for _, s in member_states(effective, member)]
    weights = fingerprint_tensors([t for s in states for t in s.values()])
    if not isinstance(member, ModifiedMember):
        return weights
    settings = json.dumps(member.describe(), sort_keys=True)
    return hashlib.sha256(f"{weights}/{settings}".encode()).hexdigest()
