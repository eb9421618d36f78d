"""TracIn-CP (Pruthi et al., 2020): gradient similarity summed along the training trajectory.

``score[q, i] = sum_c η_c <g_q(θ_c), g_i(θ_c)>`` over the member's checkpoints ``c`` with
learning rate ``η_c`` — the first-order decrease of the query objective caused by the steps
taken on example i. Implemented as one inner product of features
``concat_c sqrt(η_c) g(θ_c)``, so the shared loop streams it like Grad-Dot; with factored
features (:mod:`datatrace.methods.gradsim`, the same ``train_features`` setting) each
checkpoint is one segment of factored rows.
Cost: one per-sample gradient per example per checkpoint.
"""

from __future__ import annotations

import math

import torch

from datatrace.data import Batch
from datatrace.methods.base import MemberContext, register
from datatrace.methods.gradsim import GradientSimilarity, GradSimState

__all__ = ["TracInAttributor"]


@register("tracin")
class TracInAttributor(GradientSimilarity):
    """TracIn over the checkpoints of each member (the task's checkpoints by default).

    Example:
        >>> from datatrace import Checkpoint, Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> ckpts = [Checkpoint(model.state_dict(), step=s, learning_rate=0.1) for s in (10, 20)]
        >>> train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> TracInAttributor(Task(model, checkpoints=ckpts)).fit(train).attribute(train).shape
        (8, 8)
    """

    method_id = "tracin"
    reads_trajectory = True

    def _trajectory_features(
        self, ctx: MemberContext[GradSimState], batch: Batch, which: str
    ) -> torch.Tensor:
        parts = []
        for ckpt, state in zip(ctx.checkpoints, ctx.states):
            lr = 1.0 if ckpt is None else ckpt.learning_rate
            features = self._features(ctx, batch, which, state)
            parts.append(self._scale_features(ctx, features, math.sqrt(lr)))
        return torch.cat(parts, 1)

    def _train_features(self, ctx: MemberContext[GradSimState], batch: Batch) -> torch.Tensor:
        return self._trajectory_features(ctx, batch, "loss")

    def _query_features(self, ctx: MemberContext[GradSimState], batch: Batch) -> torch.Tensor:
        return self._trajectory_features(ctx, batch, "query")
