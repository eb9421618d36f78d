"""Checkpoints and ensemble members (DESIGN.md §2): a saved state of one training run, and one
model of an ensemble as the trajectory of its checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datatrace.errors import ConfigError, ModelError

__all__ = ["Checkpoint", "Member"]


@dataclass(frozen=True)
class Checkpoint:
    """A saved state of one training run (DESIGN.md §2).

    Attributes:
        state: a state dict, or a path to one saved with ``torch.save`` (loaded with
            ``weights_only=True``).
        step: optimizer step at which it was saved.
        learning_rate: learning rate in force at that step (TracIn and Source weigh by it).
        optimizer: optimizer kind, e.g. ``"sgd"`` or ``"adam"``.
        train_indices: training indices the run used up to this checkpoint (multi-stage runs).

    Example:
        >>> ckpt = Checkpoint(torch.nn.Linear(2, 2).state_dict(), step=10, learning_rate=0.1)
        >>> sorted(ckpt.load())
        ['bias', 'weight']
    """

    state: Mapping[str, torch.Tensor] | str | Path
    step: int = 0
    learning_rate: float = 1.0
    optimizer: str = "sgd"
    train_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, (Mapping, str, Path)):
            raise ModelError(
                f"Checkpoint.state must be a state dict or a path; got {type(self.state).__name__}."
            )
        if not (self.learning_rate > 0):
            raise ConfigError(f"Checkpoint.learning_rate must be > 0; got {self.learning_rate}.")

    def load(self) -> dict[str, torch.Tensor]:
        """The state dict, loaded safely (``weights_only=True``) if a path was given."""
        if isinstance(self.state, Mapping):
            return dict(self.state)
        path = Path(self.state)
        if not path.exists():
            raise ModelError(f"checkpoint file {str(path)!r} does not exist.")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError/RuntimeError for unsafe files
            raise ModelError(
                f"checkpoint {str(path)!r} could not be loaded with weights_only=True ({exc}); "
                "save plain state dicts of tensors (torch.save(model.state_dict(), path))."
            ) from exc
        if (
            isinstance(obj, Mapping)
            and "state_dict" in obj
            and isinstance(obj["state_dict"], Mapping)
        ):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ModelError(
                f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict."
            )
        return dict(obj)


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: a trajectory of checkpoints (the last one is the final model)."""

    trajectory: tuple[Checkpoint, ...] = field(default_factory=tuple)

    @property
    def final(self) -> Checkpoint | None:
        return self.trajectory[-1] if self.trajectory else None
