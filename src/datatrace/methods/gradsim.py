"""Gradient similarity: Grad-Dot and Grad-Cos (Charpiat et al., 2019; Pruthi et al., 2020).

``grad-dot``: ``score[q, i] = <g_q, g_i>`` with ``g_q`` the gradient of the query objective
(loss-like: ``-direction * target``) and ``g_i`` that of training example i's loss. One SGD
step on i with learning rate η lowers the query objective by ``η <g_q, g_i>`` to first order,
so positive scores are proponents. ``grad-cos`` normalises both gradients (with ``groups=``,
the group gradient: the gradient of the group's summed loss).
Cost: one per-sample gradient per example; no curvature.
"""

from __future__ import annotations

import torch

from datatrace.methods.base import Attributor, MemberContext, register

__all__ = ["GradCosAttributor", "GradDotAttributor"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    # A zero gradient stays zero instead of becoming NaN.
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


@register("grad-dot")
class GradDotAttributor(Attributor):
    """Inner products of query and training gradients.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> GradDotAttributor(Task(model)).fit(train).attribute(train).values.shape
        torch.Size([8, 8])
    """

    method_id = "grad-dot"

    def _fit_member(self, ctx: MemberContext) -> None:
        return None


@register("grad-cos")
class GradCosAttributor(Attributor):
    """Cosine similarity of query and training gradients.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> s = GradCosAttributor(Task(model)).fit(train).attribute(train)
        >>> bool((s.values.abs() <= 1 + 1e-6).all())
        True
    """

    method_id = "grad-cos"

    def _finish_train_features(self, ctx: MemberContext, features: torch.Tensor) -> torch.Tensor:
        # on whole units: a group's gradient is normalised after its members are summed
        return _unit(features)

    def _transform_queries(self, ctx: MemberContext, q: torch.Tensor) -> torch.Tensor:
        return _unit(q)

    def _fit_member(self, ctx: MemberContext) -> None:
        return None
