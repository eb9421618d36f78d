"""Shared training recipes: Adam(W) on shuffled minibatches, and :class:`ClassifierSetting`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datatrace._checks import check_int
from datatrace.bench.settings.base import Setting, _check_float, take
from datatrace.data import Batch, num_examples
from datatrace.errors import ConfigError
from datatrace.recording import CheckpointRecorder
from datatrace.replay import TrainingRecipe
from datatrace.task import Checkpoint

__all__ = ["ClassifierSetting", "fit_minibatch"]


def fit_minibatch(
    model: nn.Module,
    train: Batch,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    checkpoints: int = 0,
    optimizer: Literal["adam", "adamw"] = "adam",
    schedule: Literal["constant", "cosine"] = "constant",
    replay: CheckpointRecorder | None = None,
) -> list[Checkpoint]:
    """Train ``model`` in place with Adam(W) on shuffled minibatches; deterministic in ``seed``.

    The batch order comes from a generator seeded with ``seed``; other randomness (dropout)
    draws from the global generator, which :meth:`Setting.train` seeds.

    Args:
        model: the model, in train mode.
        train: the training examples (tuple or dict batch).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean training loss of a batch.
        epochs: passes over ``train``.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        lr: peak learning rate.
        weight_decay: L2 penalty (``adam``) or decoupled weight decay (``adamw``).
        seed: seed of the batch order.
        checkpoints: number of checkpoints to keep, at evenly spaced epochs; the last one is
            the final model. 0 keeps none.
        optimizer: ``"adam"`` or ``"adamw"``.
        schedule: ``"constant"``, or ``"cosine"`` decay from ``lr`` to ``lr / 10`` over the run.
        replay: a recorder to :meth:`~CheckpointRecorder.attach` for the replay recipe (every
            step's indices; read it with ``replay.recipe(model)``). A model with dropout
            draws from the global generator without per-step seeds: its recipe is refused.

    Returns:
        The kept checkpoints (state, step, the learning rate of the last step, optimizer).
    """
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = num_examples(train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    keep = {math.ceil((k + 1) * epochs / checkpoints) for k in range(checkpoints)}
    if replay is not None:
        replay.attach(model, opt)
    gen = torch.Generator().manual_seed(seed)
    trajectory: list[Checkpoint] = []
    step = 0
    current_lr = lr
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if schedule == "cosine":
                current_lr = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total - 1, 1))))
                for group in opt.param_groups:
                    group["lr"] = current_lr
            opt.zero_grad()
            loss_fn(model, take(train, idx)).backward()
            opt.step()
            step += 1
            if replay is not None:
                replay.record_step(idx)
        if epoch + 1 in keep:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trajectory.append(
                Checkpoint(state, step=step, learning_rate=current_lr, optimizer=optimizer)
            )
    return trajectory


def _check_hidden(hidden: tuple[int, ...]) -> None:
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ConfigError(f"hidden must be a non-empty tuple of ints >= 1; got {hidden!r}.")


@dataclass(frozen=True, kw_only=True)
class ClassifierSetting(Setting):
    """A classifier trained with Adam on shuffled minibatches of ``(inputs, labels)``.

    Subclasses implement :meth:`_build_data` (tuple batches) and :meth:`_build_model`; the
    loss is the cross-entropy and the target the margin. A subclass with another loop
    overrides :meth:`_loop` only: training, checkpoints and the replay recipe all run it.

    Attributes:
        epochs: passes over the training data.
        batch_size: examples per optimizer step.
        lr: Adam learning rate.
        weight_decay: Adam's L2 penalty.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4

    def _check(self) -> None:
        super()._check()
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        _check_float(self.lr, "lr", 0.0, strict=True)
        _check_float(self.weight_decay, "weight_decay", 0.0, strict=False)

    def _fit(self, model: nn.Module, train: Batch, seed: int, record: bool) -> list[Checkpoint]:
        return self._loop(model, train, seed=seed, checkpoints=self.checkpoints if record else 0)

    def _fit_recipe(self, model: nn.Module, train: Batch, seed: int) -> TrainingRecipe:
        recorder = CheckpointRecorder()
        self._loop(model, train, seed=seed, checkpoints=0, replay=recorder)
        return recorder.recipe(model)

    def _loop(self, model: nn.Module, train: Batch, **run: Any) -> list[Checkpoint]:
        """Train ``model`` in place; ``run`` holds the ``seed``, ``checkpoints`` and ``replay``
        keywords of :func:`fit_minibatch` (here Adam on the cross-entropy)."""
        return fit_minibatch(
            model,
            train,
            lambda m, b: F.cross_entropy(m(b[0]), b[1]),
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            **run,
        )
