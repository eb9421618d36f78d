"""Per-sample gradients of ``nn.Linear`` and ``nn.Conv2d`` from layer inputs and output grads.

For a layer ``z = W a (+ b)`` applied at positions ``t`` (sequence tokens, conv patches), the
gradient of example ``n``'s objective is ``sum_t g_{n,t} a_{n,t}^T`` with ``g = d obj / d z``.
One batched forward/backward yields ``a`` and ``g`` for every example (each example's
objective depends only on its own outputs in eval mode), so per-sample gradients, their
projections and inner products can be formed from the factors without a
``(batch, n_params)`` tensor. Bias gradients are handled by a column of ones in ``a``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from datatrace.data import Batch
from datatrace.task import Task

__all__ = ["LayerFactors", "group_factors", "hook_factors", "hookable_modules"]


@dataclass
class LayerFactors:
    """Factors of one layer's per-sample gradients: ``grad_n = g_n^T a_n`` (``(O, I')``).

    Attributes:
        module: the module's name.
        a: ``(B, T, I')`` inputs (unfolded patches for conv), with a trailing column of ones
            when the bias is tracked; only the ones column when only the bias is tracked.
        g: ``(B, T, O)`` gradients of the objective w.r.t. the layer's outputs.
        weight: name of the tracked weight parameter, or None.
        bias: name of the tracked bias parameter, or None.
        weight_shape: shape of the weight parameter.
    """

    module: str
    a: torch.Tensor
    g: torch.Tensor
    weight: str | None
    bias: str | None
    weight_shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        """Width of the weight part of ``a`` (without the ones column)."""
        return self.a.shape[-1] - (1 if self.bias is not None else 0)

    def matrix(self) -> torch.Tensor:
        """Per-sample gradient blocks ``(B, O, I')``."""
        return _outer_sum(self.g, self.a)

    def weight_grads(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-sample weight gradients ``(B, O', I)`` of output rows ``start:stop``.

        Contiguous, without the ones column, so ``.reshape(B, -1)`` is free; rows can be
        taken a few at a time to bound memory.
        """
        if self.weight is None:
            raise ValueError(f"layer {self.module!r} has no tracked weight.")
        return _outer_sum(self.g[:, :, start:stop], self.a[:, :, : self.in_features])

    def bias_grads(self) -> torch.Tensor:
        """Per-sample bias gradients ``(B, O)``: ``sum_t g_t``."""
        return self.g.sum(1)

    def split(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``(B, O, I')`` blocks into ``{param_name: (B, *param.shape)}``."""
        out: dict[str, torch.Tensor] = {}
        b = block.shape[0]
        if self.weight is not None:
            out[self.weight] = block[:, :, : self.in_features].reshape(b, *self.weight_shape)
        if self.bias is not None:
            out[self.bias] = block[:, :, -1]
        return out


def _outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_t g[:, t, :, None] * a[:, t, None, :]``: ``(B, O, I)`` from ``(B, T, O)``, ``(B, T, I)``."""
    if g.shape[1] == 1:  # one position (MLPs): a broadcast product, about 2x faster than bmm
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.einsum("bto,bti->boi", g, a)


def _is_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


def hookable_modules(task: Task) -> dict[str, tuple[str | None, str | None]]:
    """Modules the hook engine handles: ``{module: (weight_name|None, bias_name|None)}``.

    A module qualifies when it is a supported type and every tracked parameter it owns is its
    weight or bias. Tracked parameters of other modules fall back to the functional engine.
    """
    tracked = set(task.tracked_names)
    found: dict[str, tuple[str | None, str | None]] = {}
    for mname, module in task.model.named_modules():
        if not _is_supported(module):
            continue
        prefix = f"{mname}." if mname else ""
        w = f"{prefix}weight" if f"{prefix}weight" in tracked else None
        b = f"{prefix}bias" if module.bias is not None and f"{prefix}bias" in tracked else None
        if w is not None or b is not None:
            found[mname] = (w, b)
    return found


def _layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        assert not isinstance(padding, str)  # string padding is routed to the functional engine
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
        return cols.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _layer_grad(module: nn.Module, gz: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return gz.flatten(2).transpose(1, 2)
    return gz.reshape(gz.shape[0], -1, gz.shape[-1])


def hook_factors(
    task: Task,
    state: Mapping[str, torch.Tensor],
    batch: Batch,
    modules: Mapping[str, tuple[str | None, str | None]],
    which: str = "loss",
) -> tuple[list[LayerFactors], torch.Tensor]:
    """One forward/backward over ``batch``; returns the factors of ``modules`` and the objective.

    A module called several times (weight sharing) gets its calls concatenated along ``T``.
    """
    split = task.split_batch(batch)
    objective = task.objective(which)
    mods = dict(task.model.named_modules())
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    handles = []
    for mname in modules:

        def hook(
            mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, mname: str = mname
        ) -> None:
            calls[mname].append((inp[0].detach(), out))

        # prepend: capture the layer's own output before any user hook rewrites it (e.g. a
        # dropout member's mask), so that g is the gradient w.r.t. W a (+ b) itself.
        handles.append(mods[mname].register_forward_hook(hook, prepend=True))
    grad_names = {n for pair in modules.values() for n in pair if n is not None}
    live = {
        n: (v.detach().requires_grad_(True) if n in grad_names else v) for n, v in state.items()
    }
    try:
        with torch.enable_grad():
            outputs = task.outputs(live, split)
            obj = objective(outputs, split)
            outs = [o for m in modules for _, o in calls[m]]
            grads = torch.autograd.grad(obj.sum(), outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    factors: list[LayerFactors] = []
    k = 0
    for mname, (w, b) in modules.items():
        module = mods[mname]
        a_parts, g_parts = [], []
        for x, out in calls[mname]:
            gz = grads[k]
            k += 1
            gz = torch.zeros_like(out) if gz is None else gz
            a_parts.append(_layer_input(module, x))
            g_parts.append(_layer_grad(module, gz.detach()))
        weight_t: torch.Tensor = module.weight
        if a_parts:
            # one call (the usual case): no concatenation copy, only a layout fix if needed
            a = a_parts[0].contiguous() if len(a_parts) == 1 else torch.cat(a_parts, 1)
            g = g_parts[0].contiguous() if len(g_parts) == 1 else torch.cat(g_parts, 1)
        else:  # tracked but unused in this forward pass: its gradient is zero
            n = obj.shape[0]
            a = obj.new_zeros(n, 1, weight_t[0].numel())
            g = obj.new_zeros(n, 1, weight_t.shape[0])
        if w is None:
            a = a.new_ones(a.shape[0], a.shape[1], 1)
        elif b is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        weight_shape = tuple(weight_t.shape)
        factors.append(LayerFactors(mname, a, g, w, b, weight_shape))
    return factors, obj.detach()


def factored_names(factors: Sequence[LayerFactors]) -> list[str]:
    return [n for f in factors for n in (f.weight, f.bias) if n is not None]


def group_factors(factors: Sequence[LayerFactors], members: torch.Tensor) -> list[LayerFactors]:
    """Factors of group gradients from per-sample factors, without per-sample gradients.

    A group's gradient is ``sum_{n in g} sum_t g_{n,t} a_{n,t}^T``: the same form as one
    example's, with the members' positions concatenated. ``members`` is ``(G, k)`` of batch
    indices (``-1`` pads groups smaller than ``k``); the result has ``G`` rows and ``k * T``
    positions, with zero factors at padded positions (they add nothing). Projections and
    inner products of these factors are therefore those of the group gradients.
    """
    n_groups, k = members.shape
    pad = members < 0
    if not bool(pad.any()) and torch.equal(
        members.flatten(), torch.arange(members.numel(), device=members.device)
    ):  # groups are consecutive runs of equal size: a free reshape
        return [
            LayerFactors(
                f.module,
                f.a.reshape(n_groups, k * f.a.shape[1], f.a.shape[2]),
                f.g.reshape(n_groups, k * f.g.shape[1], f.g.shape[2]),
                f.weight,
                f.bias,
                f.weight_shape,
            )
            for f in factors
        ]
    index = members.clamp_min(0).flatten()
    keep = (~pad).flatten()
    out = []
    for f in factors:
        idx = index.to(f.a.device)
        a = f.a[idx] * keep.to(f.a.device, f.a.dtype).view(-1, 1, 1)
        g = f.g[idx] * keep.to(f.g.device, f.g.dtype).view(-1, 1, 1)
        t = f.a.shape[1]
        out.append(
            LayerFactors(
                f.module,
                a.reshape(n_groups, k * t, f.a.shape[2]),
                g.reshape(n_groups, k * t, f.g.shape[2]),
                f.weight,
                f.bias,
                f.weight_shape,
            )
        )
    return out
