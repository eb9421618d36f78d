"""Ensemble members (DESIGN.md §2, §4): what the shared loop iterates over.

A member is one model of an ensemble; it may carry a trajectory of checkpoints (TracIn and
Source read it; other methods use its final checkpoint). This module turns what a user passes
as ``members=`` into :class:`Member` objects. Independently trained models are the member kind
available now; dropout-mask and LoRA members add kinds here without touching any method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datatrace.errors import ConfigError
from datatrace.task import Checkpoint, Member, Task

__all__ = ["Member", "resolve_members"]


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


def resolve_members(task: Task, members: Sequence[Any] | None) -> list[Member]:
    """Normalise ``members=``; ``None`` means one member: the task's checkpoints or its model.

    Example:
        >>> task = Task(nn.Linear(2, 2).eval())
        >>> len(resolve_members(task, None))
        1
    """
    if members is None:
        return [Member(tuple(task.checkpoints))]
    if isinstance(members, (Mapping, str, Path, nn.Module, Checkpoint)) or not isinstance(
        members, Sequence
    ):
        raise ConfigError(
            f"members= must be a list of members; got a single {type(members).__name__}. "
            "Wrap it in a list: members=[...]."
        )
    if len(members) == 0:
        raise ConfigError("members= is an empty list; pass at least one member or leave it None.")
    out = []
    for m in members:
        if isinstance(m, Member):
            out.append(m)
        elif isinstance(m, (list, tuple)):
            out.append(Member(tuple(_as_checkpoint(c) for c in m)))
        else:
            out.append(Member((_as_checkpoint(m),)))
    # Fail early on architecture mismatches rather than deep inside a method.
    for m in out:
        for c in m.trajectory:
            task.state(c)
    return out


def member_states(
    task: Task, member: Member
) -> list[tuple[Checkpoint | None, dict[str, torch.Tensor]]]:
    """``(checkpoint, state)`` for each checkpoint of the member's trajectory (final last)."""
    if not member.trajectory:
        return [(None, task.state())]
    return [(c, task.state(c)) for c in member.trajectory]
