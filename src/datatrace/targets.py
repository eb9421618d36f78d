"""Per-example training losses and the target (measurement) functions to attribute.

Sign convention: every target declares a direction (+1 when higher is better: margin,
log-prob; -1 for a loss). Methods differentiate the *query objective* ``-direction * target``,
so that a positive score always means "training on this unit improves the query".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from datatrace.data import Batch
from datatrace.errors import DataError

__all__ = ["Target", "cross_entropy", "lm_loss", "log_prob", "margin", "mse"]

LossFn = Callable[[torch.Tensor, Batch, torch.Tensor | None], torch.Tensor]


# ----------------------------------------------------------------------------- losses/targets
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, shape ``(B,)``."""
    return F.cross_entropy(logits, labels, reduction="none")


def mse(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example half squared error summed over output dimensions, shape ``(B,)``.

    Raises:
        DataError: labels whose per-example size differs from the outputs' (``(B,)`` class
            labels against ``(B, C)`` outputs would broadcast into nonsense).
    """
    _check_mse_labels(outputs, labels)
    diff = outputs.reshape(outputs.shape[0], -1) - labels.reshape(labels.shape[0], -1)
    return 0.5 * (diff**2).sum(1)


def _check_mse_labels(outputs: torch.Tensor, labels: torch.Tensor) -> None:
    per_out = outputs[0].numel() if outputs.ndim else 1
    per_label = labels[0].numel() if labels.ndim else 1
    if labels.ndim == 0 or labels.shape[0] != outputs.shape[0] or per_out != per_label:
        raise DataError(
            f"loss='mse' got labels of shape {tuple(labels.shape)} for outputs of shape "
            f"{tuple(outputs.shape)}: {per_label} target value(s) per example for {per_out} "
            "outputs; give targets shaped like the outputs (for class labels use "
            f"loss='cross_entropy', or one-hot encode them: F.one_hot(y, {per_out}).float())."
        )


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's classification margin ``logit_y - logsumexp_{c != y} logit_c`` (higher is better)."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def _token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    # Causal LM: position t predicts token t+1. Labels equal to -100 are ignored (HF convention).
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    if mask is not None:
        keep = keep & mask[:, 1:].bool()
    safe = shift_labels.clamp_min(0)
    lp = torch.log_softmax(shift_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (lp * keep.to(lp.dtype)).sum(1)


def log_prob(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token log-probability of each sequence, shape ``(B,)`` (higher is better)."""
    return _token_log_probs(logits, labels, mask)


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each sequence, shape ``(B,)``."""
    return -_token_log_probs(logits, labels, mask)


@dataclass(frozen=True)
class Target:
    """A measurement function to attribute.

    Attributes:
        name: id used in configs and manifests.
        fn: ``fn(outputs, labels, mask) -> (B,)``; ``mask`` is the attention mask or None.
        direction: +1 if higher values are better (margin, log-prob), -1 if lower (loss).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    direction: Literal[1, -1]


@dataclass(frozen=True)
class _IgnoresMask:
    """``fn(outputs, labels)`` called as ``(outputs, labels, mask)``: a module-level object,
    not a lambda, so that tasks and fitted attributors pickle."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(
        self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.fn(outputs, labels)


_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "cross_entropy": _IgnoresMask(cross_entropy),
    "mse": _IgnoresMask(mse),
    "lm": lm_loss,
}
_TARGETS = {
    "margin": Target("margin", _IgnoresMask(margin), 1),
    "log_prob": Target("log_prob", log_prob, 1),
}
