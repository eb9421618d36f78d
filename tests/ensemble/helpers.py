"""Models with dropout and hand-built 'effective models' used as references."""

from __future__ import annotations

import copy

import torch
from torch import nn

from datatrace import METHODS, Task, make_attributor
from datatrace.methods.base import Attributor
from tests.methods.test_conformance import OPTIONS


def dropout_mlp(seed: int = 0, p: float = 0.3, hidden: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Dropout(p), nn.Linear(hidden, 3))
        .double()
        .eval()
    )


class FixedMask(nn.Module):
    """Multiplies by a fixed tensor (a plain attribute, so state dicts are unchanged)."""

    def __init__(self, mask: torch.Tensor, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.mask = mask
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.inner is None else self.inner(x)) * self.mask


def with_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose top-level child ``name`` is replaced by ``module``."""
    out = copy.deepcopy(model)
    setattr(out, name, module.double().eval())
    return out


# Cheaper than the conformance suite's settings where a method iterates (equality is exact
# whatever the depth).
FAST = {
    "if-lissa": {"damping": 0.5, "solver_options": {"depth": 20}},
    "if-arnoldi": {"damping": 1e-2, "solver_options": {"rank": 5}},
    "rps": {"max_iter": 30},
}


def build(method_id: str, task: Task, **extra) -> Attributor:
    options = {**OPTIONS.get(method_id, {}), **FAST.get(method_id, {})}
    return make_attributor(method_id, task, **{**options, **extra})


def target_of(method_id: str) -> str:
    return METHODS[method_id][0].target_kind
