"""Per-sample gradients of ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D`` from
layer inputs and output grads.

For a layer ``z = W a (+ b)`` applied at positions ``t`` (sequence tokens, conv patches), the
gradient of example ``n``'s objective is ``sum_t g_{n,t} a_{n,t}^T`` with ``g = d obj / d z``.
One batched forward/backward yields ``a`` and ``g`` for every example (each example's
objective depends only on its own outputs in eval mode), so per-sample gradients, their
projections and inner products can be formed from the factors without a
``(batch, n_params)`` tensor. Bias gradients are handled by a column of ones in ``a``.

GPT-2's ``Conv1D`` computes ``z = a W + b`` with ``W`` stored ``(I, O)``: it is a Linear whose
parameter is the transpose of the ``(O, I)`` gradient matrix the factors describe
(``LayerFactors.transposed``). Factors, K-FAC and the factored features work on the matrix;
only the views as parameter-shaped tensors (:meth:`PerSampleGrads.blocks`, ``split``)
transpose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from datatrace.data import Batch, batch_size_of
from datatrace.errors import ModelError
from datatrace.task import Task, conv1d_type, parameter_uses

__all__ = [
    "Captured",
    "LayerFactors",
    "group_factors",
    "hook_factors",
    "hook_pass",
    "hookable_modules",
]


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
        transposed: the weight parameter is stored ``(I, O)``, the transpose of the gradient
            matrix (transformers' ``Conv1D``).
    """

    module: str
    a: torch.Tensor
    g: torch.Tensor
    weight: str | None
    bias: str | None
    weight_shape: tuple[int, ...]
    transposed: bool = False

    def rows(self, lo: int, hi: int | None) -> LayerFactors:
        """Examples ``lo:hi`` (views)."""
        return dataclasses.replace(self, a=self.a[lo:hi], g=self.g[lo:hi])

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
        taken a few at a time to bound memory. For a transposed layer these are rows of the
        gradient matrix, not of the parameter: see :meth:`param_order`.
        """
        if self.weight is None:
            raise ValueError(f"layer {self.module!r} has no tracked weight.")
        return _outer_sum(self.g[:, :, start:stop], self.a[:, :, : self.in_features])

    def param_order(self) -> LayerFactors:
        """Factors whose weight gradient rows follow the weight *parameter*'s layout.

        The layer itself unless transposed; for ``Conv1D`` (parameter ``(I, O)``) the roles
        of ``a`` and ``g`` swap, so ``weight_grads()`` is ``(B, I, O)`` in parameter order.
        Only the weight is described (no bias).
        """
        if not self.transposed:
            return self
        a = self.a[:, :, : self.in_features]
        return LayerFactors(self.module, self.g, a, self.weight, None, self.weight_shape)

    def bias_grads(self) -> torch.Tensor:
        """Per-sample bias gradients ``(B, O)``: ``sum_t g_t``."""
        return self.g.sum(1)

    def split(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``(B, O, I')`` blocks into ``{param_name: (B, *param.shape)}``."""
        out: dict[str, torch.Tensor] = {}
        b = block.shape[0]
        if self.weight is not None:
            w = block[:, :, : self.in_features]
            w = w.transpose(1, 2) if self.transposed else w
            out[self.weight] = w.reshape(b, *self.weight_shape)
        if self.bias is not None:
            out[self.bias] = block[:, :, -1]
        return out


def _outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_t g[:, t, :, None] * a[:, t, None, :]``: ``(B, O, I)`` from ``(B, T, O)``, ``(B, T, I)``."""
    if g.shape[1] == 1:  # one position (MLPs): a broadcast product, about 2x faster than bmm
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(g.transpose(1, 2), a)  # a strided operand, no permuted copy of g


def _is_supported(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
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
    weight or bias, used by no other module (a tied weight's gradient sums all its uses).
    Tracked parameters of other modules fall back to the per-module functional engine.
    """
    tracked = set(task.tracked_names)
    single = {n for n, pairs in parameter_uses(task.model).items() if len(pairs) == 1}
    ok = tracked & single
    found: dict[str, tuple[str | None, str | None]] = {}
    for mname, module in task.model.named_modules():
        if not _is_supported(module):
            continue
        prefix = f"{mname}." if mname else ""
        w = f"{prefix}weight" if f"{prefix}weight" in ok else None
        b = f"{prefix}bias" if module.bias is not None and f"{prefix}bias" in ok else None
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


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight ``(I, O)``, transposed (transformers' ``Conv1D``)."""
    return not isinstance(module, (nn.Linear, nn.Conv2d))


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(O, I)`` of the layer's gradient matrix (conv weights flattened)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)  # a supported layer (see _is_supported)
    if not is_transposed(module):
        return int(w.shape[0]), int(w[0].numel())
    return int(w.shape[1]), int(w.shape[0])  # Conv1D: the weight is stored (I, O)


@dataclass
class Captured:
    """What one forward/backward pass recorded of a module (see :func:`hook_pass`).

    Attributes:
        calls: ``(args, kwargs, output)`` of each call of the module (output as returned).
        grads: per call, the gradients of the summed objective w.r.t. the output's tensors
            (flattened pytree leaves, None where the objective does not depend on one).
    """

    calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]]
    grads: list[list[torch.Tensor | None]]


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
    factors, _, _, obj = hook_pass(task, state, batch, modules, (), (), which)
    return factors, obj


def hook_pass(
    task: Task,
    state: Mapping[str, torch.Tensor],
    batch: Batch,
    modules: Mapping[str, tuple[str | None, str | None]],
    owners: Sequence[str],
    params: Sequence[str],
    which: str = "loss",
) -> tuple[list[LayerFactors], dict[str, Captured], dict[str, torch.Tensor], torch.Tensor]:
    """One forward/backward over ``batch`` recording layers, other modules and batch gradients.

    Args:
        task, state, batch, which: as :func:`~datatrace.gradients.compute_per_sample_grads`.
        modules: factored layers ``{module: (weight|None, bias|None)}``.
        owners: other modules whose calls (inputs, outputs, output gradients) to record.
        params: parameters whose batch gradient (of the summed objective) to return.

    Returns:
        The layers' factors, the owners' :class:`Captured` calls, ``{param: batch gradient}``
        and the objective ``(B,)``.
    """
    split = task.split_batch(batch)
    objective = task.objective(which)
    mods = dict(task.model.named_modules())
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    owner_calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Any]]] = {
        m: [] for m in owners
    }
    handles = []
    for mname in modules:

        def hook(
            mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, mname: str = mname
        ) -> None:
            calls[mname].append((inp[0].detach(), out))

        # prepend: capture the layer's own output before any user hook rewrites it (e.g. a
        # dropout member's mask), so that g is the gradient w.r.t. W a (+ b) itself.
        handles.append(mods[mname].register_forward_hook(hook, prepend=True))
    n_rows = batch_size_of(batch)
    for mname in owners:

        def owner_hook(
            mod: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            out: Any,
            mname: str = mname,
        ) -> Any:
            detach = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
            if isinstance(out, torch.Tensor) and out.ndim > 0 and out.shape[0] == 1 < n_rows:
                # an output shared by the batch (position embeddings of (1, T) ids): give each
                # example its own copy, so the backward pass yields per-example gradients
                out = out.expand(n_rows, *out.shape[1:]).contiguous()
            owner_calls[mname].append((tree_map(detach, args), tree_map(detach, kwargs), out))
            return out

        handles.append(
            mods[mname].register_forward_hook(owner_hook, prepend=True, with_kwargs=True)
        )
    grad_names = {n for pair in modules.values() for n in pair if n is not None} | set(params)
    live = {
        n: (v.detach().requires_grad_(True) if n in grad_names else v) for n, v in state.items()
    }
    try:
        with torch.enable_grad():
            outputs = task.outputs(live, split)
            obj = objective(outputs, split)
            outs = [o for m in modules for _, o in calls[m]]
            owner_leaves = [
                [leaf for leaf in tree_flatten(out)[0] if _differentiable(leaf)]
                for m in owners
                for _, _, out in owner_calls[m]
            ]
            wrt = outs + [leaf for leaves in owner_leaves for leaf in leaves]
            wrt += [live[n] for n in params]
            # a layer whose forward never ran must not matter to the objective: its weight
            # used another way (a wrapper calling F.linear(x, layer.weight)) is invisible here
            unseen = [n for m, pair in modules.items() if not calls[m] for n in pair if n]
            grads = (
                torch.autograd.grad(obj.sum(), wrt + [live[n] for n in unseen], allow_unused=True)
                if wrt
                else ()
            )
            _refuse_unseen_uses(unseen, grads[len(wrt) :], modules)
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
        n_out, n_in = _matrix_shape(module)
        if a_parts:
            # one call (the usual case): no concatenation copy, only a layout fix if needed
            a = a_parts[0].contiguous() if len(a_parts) == 1 else torch.cat(a_parts, 1)
            g = g_parts[0].contiguous() if len(g_parts) == 1 else torch.cat(g_parts, 1)
        else:  # tracked but unused in this forward pass: its gradient is zero
            n = obj.shape[0]
            a = obj.new_zeros(n, 1, n_in)
            g = obj.new_zeros(n, 1, n_out)
        if w is None:
            a = a.new_ones(a.shape[0], a.shape[1], 1)
        elif b is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        weight_shape = tuple(module.weight.shape)
        transposed = is_transposed(module)
        factors.append(LayerFactors(mname, a, g, w, b, weight_shape, transposed))
    captured: dict[str, Captured] = {}
    j = 0
    for mname in owners:
        per_call = []
        for _ in owner_calls[mname]:
            leaves = owner_leaves[j]
            j += 1
            per_call.append([_detached(grads[k + i]) for i in range(len(leaves))])
            k += len(leaves)
        captured[mname] = Captured(owner_calls[mname], per_call)
    batch_grads = {
        n: (torch.zeros_like(live[n]) if grads[k + i] is None else grads[k + i].detach())
        for i, n in enumerate(params)
    }
    return factors, captured, batch_grads, obj.detach()


def _refuse_unseen_uses(
    unseen: Sequence[str],
    grads: Sequence[torch.Tensor | None],
    modules: Mapping[str, tuple[str | None, str | None]],
) -> None:
    used = [n for n, g in zip(unseen, grads) if g is not None and bool(g.ne(0).any())]
    if used:
        layers = [m for m, pair in modules.items() if any(n in used for n in pair)]
        raise ModelError(
            f"the parameters {used[:5]} of layers {layers[:5]} change the objective, but those "
            "layers' forward was never called: a wrapper uses their weights directly (e.g. "
            "F.linear(x, layer.weight)), which the hook engine cannot see. Call the layer "
            "itself in the wrapper, or pass engine='functional' to the attributor."
        )


def _differentiable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


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
                f.transposed,
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
                f.transposed,
            )
        )
    return out
