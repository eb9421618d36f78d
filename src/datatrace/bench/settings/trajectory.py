"""Settings where the training trajectory matters: ``digits-mlp-short``, ``digits-mlp-twostage``.

Influence functions assume a model trained to the optimum of one loss. These two settings
break that assumption on purpose, the two ways Source (Bae et al., 2024) is built for:

- ``digits-mlp-short``: :class:`DigitsMLPShort`, an MLP stopped well before convergence;
- ``digits-mlp-twostage``: :class:`DigitsMLPTwoStage`, pretrained on one half of the digits,
  then fine-tuned on the other half (the pretraining examples are absent from the last stage).

Both train with plain minibatch SGD (the update Source's closed form models) and record
their trajectory with :class:`datatrace.recording.CheckpointRecorder`: ``checkpoints``
evenly spaced in steps, the end of every stage, and the final model, each with its
learning rate and the training indices of its stage (indices into the examples trained on;
for the full training set, the setting's training indices). On request
(:meth:`~datatrace.bench.settings.Setting.train_recipe`) the same recorder captures the
recipe the ``unrolled`` method replays: every step's indices and learning rate. Data: the
digits splits and size presets of :mod:`datatrace.bench.settings.digits`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from datatrace._checks import check_int
from datatrace.bench.settings.base import _check_float
from datatrace.bench.settings.digits import _PRESETS, _DigitsMLPSetting
from datatrace.bench.settings.registry import register_setting
from datatrace.data import Batch
from datatrace.errors import ConfigError
from datatrace.recording import CheckpointRecorder
from datatrace.task import Checkpoint

__all__ = ["DigitsMLPShort", "DigitsMLPTwoStage", "fit_sgd_stages", "pretrain_mask"]


def fit_sgd_stages(
    model: nn.Module,
    train: Batch,
    stages: list[tuple[torch.Tensor, int, float]],
    *,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    seed: int,
    checkpoints: int = 0,
    replay: CheckpointRecorder | None = None,
) -> list[Checkpoint]:
    """Minibatch SGD over consecutive stages; deterministic in ``seed``.

    Args:
        model: the classifier, trained in place.
        train: ``(inputs, labels)``.
        stages: ``(indices into train, epochs, learning rate)`` per stage, in order; the
            optimizer (and its momentum buffer) carries over from one stage to the next.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        momentum: SGD momentum.
        weight_decay: SGD's L2 penalty.
        seed: seed of the batch order.
        checkpoints: checkpoints evenly spaced in steps (the last is the final model), plus
            one at the end of every stage; 0 records none.
        replay: a recorder to :meth:`~CheckpointRecorder.attach` for the replay recipe (it
            records every step's indices; read it with ``replay.recipe(model)``).

    Returns:
        The recorded trajectory (empty when ``checkpoints`` is 0).
    """
    steps_of = [e * math.ceil(len(idx) / batch_size) for idx, e, _ in stages]
    total = sum(steps_of)
    ends = list(itertools.accumulate(steps_of))
    recorder = None
    if checkpoints:
        even = {math.ceil((k + 1) * total / checkpoints) for k in range(checkpoints)}
        recorder = CheckpointRecorder(at_steps=sorted(even | set(ends)), optimizer_kind="sgd")
    opt = torch.optim.SGD(
        model.parameters(), lr=stages[0][2], momentum=momentum, weight_decay=weight_decay
    )
    if replay is not None:
        replay.attach(model, opt)
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    step = 0
    for idx, epochs, lr in stages:
        for group in opt.param_groups:
            group["lr"] = lr
        if recorder is not None:
            recorder.set_stage(idx)
        for _ in range(epochs):
            for batch in idx[torch.randperm(len(idx), generator=gen)].split(batch_size):
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
                step += 1
                if replay is not None:
                    replay.record_step(batch)
                if recorder is not None:
                    recorder.maybe_record(model, step, optimizer=opt)
    return [] if recorder is None else recorder.trajectory


@dataclass(frozen=True, kw_only=True)
class _StagedSGDSetting(_DigitsMLPSetting):
    """What the trajectory settings share: the digits MLP (no dropout) trained by
    :func:`fit_sgd_stages` over :meth:`_stages`."""

    momentum: float = 0.0
    lr: float = 0.2
    weight_decay: float = 0.0

    def _check(self) -> None:
        super()._check()
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be a number in [0, 1); got {self.momentum!r}.")

    def _stages(self, train: Batch) -> list[tuple[torch.Tensor, int, float]]:
        """``(indices, epochs, learning rate)`` of each stage."""
        raise NotImplementedError

    def _loop(self, model: nn.Module, train: Batch, **run: Any) -> list[Checkpoint]:
        return fit_sgd_stages(
            model,
            train,
            self._stages(train),
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            **run,
        )


@register_setting
@dataclass(frozen=True, kw_only=True)
class DigitsMLPShort(_StagedSGDSetting):
    """A ReLU MLP on digits trained briefly with plain SGD: far from converged.

    64 -> ``hidden`` -> 10 (no dropout), ``epochs`` passes of minibatch SGD at a constant
    learning rate, then stopped while the training loss is still falling fast.

    Measured (torch 2.13, one thread of a shared 2-core machine, seed 0): full (1437 train,
    3 epochs = 69 steps at lr 0.2) reaches 87.8% accuracy and 0.78 mean cross-entropy on the
    360 held-out digits in 0.1 s, where the same recipe run for 60 epochs reaches 97.2% and
    0.10; small (300 train, 15 epochs = 75 steps) 90.0% and 0.77 on its 120 queries. Its
    trajectory holds ``checkpoints`` (default 5) checkpoints evenly spaced in steps.

    Attributes:
        hidden: widths of the hidden layers.
        momentum: SGD momentum (0: plain SGD).

    Example:
        >>> setting = DigitsMLPShort(size="small")
        >>> model, run = setting.train_trajectory()
        >>> [c.step for c in run] == sorted(c.step for c in run) and run[-1].optimizer
        'sgd'
    """

    name: str = "digits-mlp-short"
    description: str = "ReLU MLP on sklearn digits, plain SGD stopped early (not converged)"

    presets: ClassVar = {
        "full": {**_PRESETS["full"], "epochs": 3},
        "small": {**_PRESETS["small"], "epochs": 15},
    }

    def _stages(self, train: Batch) -> list[tuple[torch.Tensor, int, float]]:
        return [(torch.arange(train[1].shape[0]), self.epochs, self.lr)]


def pretrain_mask(x: torch.Tensor) -> torch.Tensor:
    """Which digits images belong to the pretraining half: a fixed hash of the pixels.

    The rule looks at each image only (its 17 grey levels, so float32 and float64 agree), so
    an example keeps its stage in every subset a benchmark retrains on.
    """
    levels = torch.round(x.reshape(x.shape[0], -1).double() * 16).long()
    weights = (torch.arange(1, levels.shape[1] + 1, dtype=torch.long) * 2654435761) % 1000003
    return ((levels * weights).sum(1) % 1000003) % 2 == 0


@register_setting
@dataclass(frozen=True, kw_only=True)
class DigitsMLPTwoStage(_StagedSGDSetting):
    """Pretrain a ReLU MLP on one half of the digits, then fine-tune it on the other (SGD).

    Stage 1 trains ``pretrain_epochs`` at ``lr`` on the pretraining half (chosen by
    :func:`pretrain_mask`, a fixed hash of each image; all classes in both halves); stage 2
    trains ``epochs`` at ``finetune_lr`` on the other half only. A pretraining example
    reaches the final model only through what fine-tuning keeps of its effect, which
    influence functions at the final weights cannot see.

    Measured (torch 2.13, one thread of a shared 2-core machine, seed 0): full (674 + 763
    train; 10 epochs at lr 0.2, then 3 at 0.05: 146 steps) reaches 92.8% accuracy and 0.41
    mean cross-entropy on the 360 held-out digits in 0.1 s; small (146 + 154 train; 20 + 5
    epochs) 84.2% and 0.95 on its 120 queries. Its trajectory holds ``checkpoints`` (default
    5) checkpoints evenly spaced in steps plus one at the end of pretraining.

    Attributes:
        hidden: widths of the hidden layers.
        momentum: SGD momentum (0: plain SGD).
        pretrain_epochs: passes over the stage-1 examples (0: the size preset).
        epochs: passes over the stage-2 examples (0: the size preset).
        lr: stage-1 learning rate.
        finetune_lr: stage-2 learning rate.

    Example:
        >>> setting = DigitsMLPTwoStage(size="small")
        >>> model, run = setting.train_trajectory()
        >>> len({c.train_indices for c in run})
        2
    """

    name: str = "digits-mlp-twostage"
    description: str = (
        "ReLU MLP on sklearn digits: SGD pretraining on one half, fine-tuning on the other"
    )
    pretrain_epochs: int = 0
    finetune_lr: float = 0.05

    presets: ClassVar = {
        "full": {**_PRESETS["full"], "pretrain_epochs": 10, "epochs": 3},
        "small": {**_PRESETS["small"], "pretrain_epochs": 20, "epochs": 5},
    }

    def _check(self) -> None:
        super()._check()
        check_int("pretrain_epochs", self.pretrain_epochs, 1)
        _check_float(self.finetune_lr, "finetune_lr", 0.0, strict=True)

    def stage_indices(self, train: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of ``train`` (default: the setting's training set) in stage 1 and stage 2."""
        first = pretrain_mask((self.data.train if train is None else train)[0])
        return first.nonzero().squeeze(1), (~first).nonzero().squeeze(1)

    def _stages(self, train: Batch) -> list[tuple[torch.Tensor, int, float]]:
        pre, fine = self.stage_indices(train)
        stages = [(pre, self.pretrain_epochs, self.lr), (fine, self.epochs, self.finetune_lr)]
        return [s for s in stages if len(s[0])]  # a subset may miss a stage entirely
