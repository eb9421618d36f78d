"""Per-sample gradients of any module's own parameters, one module at a time.

Parameters outside the layers the hook engine factors (LayerNorm, RMSNorm, embeddings, a tied
LM head, custom modules) get their per-sample gradients from the same single forward/backward
pass: it records each owning module's inputs, its output and the gradient of the summed
objective w.r.t. that output (:func:`~datatrace.gradients.hooks.hook_pass`). Example ``n``'s
gradient is then the vector-Jacobian product of *that module alone*,

    grad_n = (d module(x_n; p) / d p)ᵀ g_n,

vmapped over examples. This is exact when the module treats examples independently (eval
mode) and the parameter acts only through the module's forward; a tied parameter sums the
products of every module holding it. Only the module is vmapped, never the whole model, so
models whose forward has data-dependent control flow (transformers' SDPA causal-mask code)
work unchanged. If ``vmap`` cannot run the module itself, examples are taken one at a time.

Each batch checks that the per-sample gradients sum to the batch gradient that the same
backward pass produced; a parameter that fails (it is also used outside its module's
forward, e.g. ``F.linear(h, self.embed.weight)`` in a parent) is returned to the caller, which
falls back to the whole-model functional engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from datatrace.gradients.hooks import Captured
from datatrace.task import Task, parameter_uses

__all__ = ["check_batch_sums", "module_per_sample_grads", "owner_modules"]


def owner_modules(task: Task, names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``{module: [(local name, parameter name), ...]}`` of the modules holding ``names``."""
    uses = parameter_uses(task.model)
    owners: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        for module, local in uses[name]:
            owners.setdefault(module, []).append((local, name))
    return owners


def _module_state(
    model: nn.Module, prefix: str, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers under their local names, values from ``state``."""
    module = model.get_submodule(prefix) if prefix else model
    canonical = {id(t): n for n, t in model.named_parameters()}
    canonical.update({id(t): n for n, t in model.named_buffers()})
    out = {}
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for local, t in tensors:
        name = canonical.get(id(t))
        if name is not None and name in state:
            out[local] = state[name]
    return out


def module_per_sample_grads(
    task: Task,
    state: Mapping[str, torch.Tensor],
    owners: Mapping[str, Sequence[tuple[str, str]]],
    captured: Mapping[str, Captured],
    batch_size: int,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """``{parameter: (B, *shape)}`` per-sample gradients from the owners' recorded calls."""
    out: dict[str, torch.Tensor] = {}
    for mname, pairs in owners.items():
        module = task.model.get_submodule(mname) if mname else task.model
        fixed = _module_state(task.model, mname, state)
        wanted = dict(pairs)  # local name -> parameter name
        for (args, kwargs, output), cotangents in zip(captured[mname].calls, captured[mname].grads):
            grads = _call_grads(
                module, fixed, wanted, args, kwargs, output, cotangents, batch_size, chunk_size
            )
            for local, name in wanted.items():
                g = grads[local]
                out[name] = g if name not in out else out[name] + g
    for pairs in owners.values():  # an owner never called: zero gradients
        for _, name in pairs:
            if name not in out:
                out[name] = state[name].new_zeros(batch_size, *state[name].shape)
    return out


def _call_grads(
    module: nn.Module,
    fixed: Mapping[str, torch.Tensor],
    wanted: Mapping[str, str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
    cotangents: Sequence[torch.Tensor | None],
    batch_size: int,
    chunk_size: int | None,
) -> dict[str, torch.Tensor]:
    """Per-example ``(d out / d p)ᵀ g`` for one recorded call of ``module``."""
    leaves, spec = tree_flatten((args, kwargs))
    batched = [
        isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch_size for x in leaves
    ]
    out_leaves = tree_flatten(output)[0]
    positions = [
        i for i, x in enumerate(out_leaves) if isinstance(x, torch.Tensor) and x.requires_grad
    ]
    pairs = [(pos, c) for pos, c in zip(positions, cotangents) if c is not None]
    params = {local: fixed[local].detach() for local in wanted}
    rest = {k: v for k, v in fixed.items() if k not in params}
    if not pairs:
        return {k: v.new_zeros(batch_size, *v.shape) for k, v in params.items()}

    def one(
        p: dict[str, torch.Tensor], xs: list[Any], cots: list[torch.Tensor], single: bool
    ) -> torch.Tensor:
        # vmap strips the batch dimension: give each batched input back a batch of one
        xs = [x.unsqueeze(0) if b and single else x for x, b in zip(xs, batched)]
        a, kw = tree_unflatten(xs, spec)
        # forward, not __call__: the module's own hooks (a dropout member's mask) acted after
        # the recorded output, so they are already in the cotangent
        with _reparametrize_module(module, {**rest, **p}):
            res = tree_flatten(module.forward(*a, **kw))[0]
        total = res[pairs[0][0]].new_zeros(())
        for (pos, _), c in zip(pairs, cots):
            y = res[pos]
            total = total + (y * (c.unsqueeze(0) if single else c)).sum()
        return total

    cots = [c for _, c in pairs]
    in_dims = ([0 if b else None for b in batched], [0] * len(cots))
    try:
        fn = vmap(
            lambda p, xs, cs: grad(one)(p, xs, cs, True),
            in_dims=(None, *in_dims),
            chunk_size=chunk_size,
        )
        return fn(params, leaves, cots)
    except RuntimeError as exc:
        if "vmap" not in str(exc):
            raise
    # the module's own forward cannot be vmapped (data-dependent control flow): one at a time
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for n in range(batch_size):
        xs = [x[n : n + 1] if b else x for x, b in zip(leaves, batched)]
        g = grad(one)(params, xs, [c[n : n + 1] for c in cots], False)
        for k in rows:
            rows[k].append(g[k])
    return {k: torch.stack(v) for k, v in rows.items()}


def check_batch_sums(
    dense: Mapping[str, torch.Tensor], batch_grads: Mapping[str, torch.Tensor]
) -> list[str]:
    """Parameters whose per-sample gradients do not sum to the batch gradient.

    The tolerance is relative to the norms summed (the per-sample products and the batch
    backward sum in different orders): 1e-8 in float64, 1e-3 otherwise.
    """
    bad = []
    for name, per_sample in dense.items():
        total = per_sample.sum(0)
        ref = batch_grads[name].to(total.dtype)
        tol = 1e-8 if total.dtype == torch.float64 else 1e-3
        scale = float(ref.norm()) + float(per_sample.flatten(1).norm(dim=1).sum())
        if float((total - ref).norm()) > tol * max(scale, torch.finfo(total.dtype).tiny):
            bad.append(name)
    return bad
