"""Per-sample gradients: a generic functional engine and a hook engine for Linear/Conv2d."""

from datatrace.gradients.engine import (
    PerSampleGrads,
    compute_group_grads,
    compute_per_sample_grads,
    group_members,
)
from datatrace.gradients.functional import functional_per_sample_grads
from datatrace.gradients.hooks import LayerFactors, hookable_modules

__all__ = [
    "LayerFactors",
    "PerSampleGrads",
    "compute_group_grads",
    "compute_per_sample_grads",
    "functional_per_sample_grads",
    "group_members",
    "hookable_modules",
]
