"""Inner products of per-sample gradients without materialising them.

For a Linear/Conv2d layer the per-sample gradient is ``G_n = sum_t g_{n,t} a_{n,t}^T``, so

    <G_n, G_m> = sum_{t,s} (g_{n,t} . g_{m,s}) (a_{n,t} . a_{m,s}),

which costs ``T_n T_m (O + I)`` per pair instead of ``O I``; for ``T = 1`` (MLPs) it is the
product of two small inner products. Each layer takes whichever route is cheaper, so no
``(batch, n_params)`` tensor is ever formed (at most one layer's ``(batch, O, I)``).
"""

from __future__ import annotations

import torch

from datatrace.errors import DataError
from datatrace.gradients.engine import PerSampleGrads
from datatrace.gradients.hooks import LayerFactors

__all__ = ["per_sample_inner"]


def _layer_inner(f1: LayerFactors, f2: LayerFactors) -> torch.Tensor:
    b1, t1, i = f1.a.shape
    b2, t2, _ = f2.a.shape
    o = f1.g.shape[2]
    factored_cost = b1 * b2 * t1 * t2 * (o + i)
    dense_cost = (b1 + b2) * t1 * o * i + b1 * b2 * o * i
    if factored_cost <= dense_cost:
        gg = torch.einsum("bto,cso->bcts", f1.g, f2.g)
        aa = torch.einsum("bti,csi->bcts", f1.a, f2.a)
        return (gg * aa).sum((2, 3))
    return f1.matrix().flatten(1) @ f2.matrix().flatten(1).T


def per_sample_inner(left: PerSampleGrads, right: PerSampleGrads) -> torch.Tensor:
    """``(B_left, B_right)`` inner products of two batches' per-sample gradients.

    Both must come from the same task (same tracked parameters and engine).

    Example:
        >>> from datatrace import Task
        >>> from datatrace.gradients import compute_per_sample_grads
        >>> task = Task(torch.nn.Linear(3, 2).eval())
        >>> psg = compute_per_sample_grads(task, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> torch.allclose(per_sample_inner(psg, psg), psg.flat() @ psg.flat().T)
        True
    """
    if left.names != right.names:
        raise DataError(
            "per_sample_inner needs gradients of the same tracked parameters; got "
            f"{left.names[:3]}... and {right.names[:3]}..."
        )
    lf = {f.module: f for f in left.factors}
    rf = {f.module: f for f in right.factors}
    if set(lf) != set(rf) or set(left.dense) != set(right.dense):
        raise DataError("per_sample_inner needs both batches computed with the same engine.")
    total = None
    for module, f in lf.items():
        part = _layer_inner(f, rf[module])
        total = part if total is None else total + part
    for name, t in left.dense.items():
        part = t.flatten(1) @ right.dense[name].flatten(1).T
        total = part if total is None else total + part
    assert total is not None
    return total
