"""One entry point for per-sample gradients, whichever engine computes them.

``compute_per_sample_grads`` returns a :class:`PerSampleGrads`: dense gradients for
parameters the functional engine handled, and :class:`LayerFactors` for Linear/Conv2d layers
handled by hooks. Consumers (projections, inner products) work per parameter block, so the
full ``(batch, n_params)`` matrix exists only if a caller asks for :meth:`PerSampleGrads.flat`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from datatrace.data import Batch, batch_size_of
from datatrace.devices import memory_of
from datatrace.errors import ConfigError, ModelError, NumericalError
from datatrace.gradients.functional import functional_group_grads, functional_per_sample_grads
from datatrace.gradients.hooks import LayerFactors, group_factors, hook_pass, hookable_modules
from datatrace.gradients.modules import check_batch_sums, module_per_sample_grads, owner_modules
from datatrace.task import Task

__all__ = [
    "Engine",
    "PerSampleGrads",
    "compute_group_grads",
    "compute_per_sample_grads",
    "group_members",
]

Engine = Literal["auto", "functional", "hooks"]


@dataclass
class PerSampleGrads:
    """Per-sample gradients of one batch over the task's tracked parameters.

    Attributes:
        names: tracked parameter names in canonical (model) order.
        shapes: their shapes.
        dense: ``{name: (B, *shape)}`` for parameters the functional engine computed.
        factors: factored layers from the hook engine.
        batch_size: rows (examples, or groups for group gradients).
        objective: the differentiated objective of each *example* of the batch (``(n,)``,
            also for group gradients), when the hook engine computed it; None otherwise.
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: list[LayerFactors] = field(default_factory=list)
    batch_size: int = 0
    objective: torch.Tensor | None = None

    def blocks(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, (B, numel))`` per parameter in canonical order, one layer materialised at a time."""
        by_name = {n: f for f in self.factors for n in (f.weight, f.bias) if n is not None}
        for name in self.names:
            if name in self.dense:
                yield name, self.dense[name].reshape(self.batch_size, -1)
                continue
            f = by_name[name]
            # weight and bias straight from the factors: no (B, O, I + 1) matrix to split
            # (slicing off its bias column made the weight block a strided view, copied again)
            block = f.param_order().weight_grads() if name == f.weight else f.bias_grads()
            yield name, block.reshape(self.batch_size, -1)

    def flat(self) -> torch.Tensor:
        """All tracked gradients as ``(B, n_tracked)`` (only for small models)."""
        return torch.cat([b for _, b in self.blocks()], dim=1)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: b.reshape(self.batch_size, *self.shapes[n]) for n, b in self.blocks()}

    def scale(self, factor: torch.Tensor) -> None:
        """Multiply example ``n``'s gradient by ``factor[n]`` in place."""
        for n in self.dense:
            self.dense[n] = self.dense[n] * factor.view(-1, *([1] * (self.dense[n].ndim - 1)))
        for f in self.factors:
            f.g = f.g * factor.view(-1, 1, 1)


def _check_finite(psg: PerSampleGrads, which: str) -> None:
    # Fast path: a NaN/inf entry makes its tensor's sum, and the total, NaN/inf, so a finite
    # total proves every entry finite (one reduction per tensor and one sync instead of
    # isfinite's elementwise passes). A total that overflows with finite entries, or a real
    # NaN/inf, falls through to the exact check that names the culprits.
    tensors = [*psg.dense.values(), *(t for f in psg.factors for t in (f.a, f.g))]
    if tensors:
        total = tensors[0].sum()
        for t in tensors[1:]:
            total = total + t.sum()
        if bool(torch.isfinite(total)):
            return
    bad = [n for n, t in psg.dense.items() if not torch.isfinite(t).all()]
    bad += [
        f.module
        for f in psg.factors
        if not (torch.isfinite(f.a).all() and torch.isfinite(f.g).all())
    ]
    if bad:
        raise NumericalError(
            f"per-sample gradients of the {which} objective contain NaN/inf (in {bad[:5]}); check the "
            "inputs for NaN/inf, the loss for log(0), or lower the learning rate of the run."
        )


def compute_per_sample_grads(
    task: Task,
    batch: Batch,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    which: str = "loss",
    engine: Engine = "auto",
    chunk_size: int | None = None,
) -> PerSampleGrads:
    """Per-sample gradients of ``batch`` w.r.t. the task's tracked parameters.

    Args:
        task: the task.
        batch: one batch.
        state: parameters/buffers to evaluate at (default: the model's current weights).
        which: ``"loss"`` for the training loss, ``"query"`` for the query objective.
        engine: ``"hooks"`` (Linear/Conv2d from layer factors, others fall back to the
            functional engine), ``"functional"`` (vmap for everything) or ``"auto"`` (= hooks).
        chunk_size: vmap chunk size of the functional engine.

    Example:
        >>> model = torch.nn.Linear(3, 2).eval()
        >>> task = Task(model)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> compute_per_sample_grads(task, batch).flat().shape
        torch.Size([4, 8])
    """
    return _compute(task, batch, state, which, engine, chunk_size, None)


def group_members(local: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
    """``(G, k)`` batch indices of each group's members from ``(B,)`` local group indices.

    Groups smaller than the largest ``k`` are padded with ``-1``; members keep batch order.

    Example:
        >>> group_members(torch.tensor([1, 0, 1, 1])).tolist()
        [[1, -1, -1], [0, 2, 3]]
    """
    local = local.long().cpu()
    n = int(local.max()) + 1 if n_groups is None else n_groups
    counts = torch.bincount(local, minlength=n)
    k = int(counts.max())
    order = torch.argsort(local, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(local.numel()) - starts[local[order]]
    out = torch.full((n, k), -1, dtype=torch.long)
    out[local[order], pos] = order
    return out


def compute_group_grads(
    task: Task,
    batch: Batch,
    members: torch.Tensor,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    which: str = "loss",
    engine: Engine = "auto",
    chunk_size: int | None = None,
) -> PerSampleGrads:
    """Gradients of each group's summed objective, one row per group (GGDA).

    The hook engine runs one forward/backward over the batch and forms each group's layer
    gradient ``sum_{n in g} sum_t g_{n,t} a_{n,t}^T`` directly as factors with the members'
    positions concatenated (:func:`~datatrace.gradients.hooks.group_factors`); the
    functional engine takes ``grad`` of each group's summed objective, vmapped over groups.
    No per-sample gradient is materialised. Projectors are linear, so projecting these rows
    gives projected group gradients.

    Args:
        task: the task.
        batch: one batch.
        members: ``(G, k)`` batch indices of each group's members, ``-1`` as padding (see
            :func:`group_members`).
        state: as :func:`compute_per_sample_grads`.
        which: as :func:`compute_per_sample_grads`.
        engine: as :func:`compute_per_sample_grads`.
        chunk_size: as :func:`compute_per_sample_grads`.

    Example:
        >>> task = Task(torch.nn.Linear(3, 2).eval())
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> members = group_members(torch.tensor([0, 0, 1, 1]))
        >>> gg = compute_group_grads(task, batch, members).flat()
        >>> ps = compute_per_sample_grads(task, batch).flat()
        >>> torch.allclose(gg, torch.stack([ps[:2].sum(0), ps[2:].sum(0)]))
        True
    """
    if not isinstance(members, torch.Tensor) or members.ndim != 2 or members.dtype != torch.long:
        raise ConfigError(
            "members must be a (n_groups, k) int64 tensor of batch indices (-1 = padding); use "
            "group_members(local_group_ids)."
        )
    return _compute(task, batch, state, which, engine, chunk_size, members)


def _check_dense_memory(task: Task, batch: Batch, names: list[str]) -> None:
    """Refuse per-example dense gradients that would take over a quarter of the device's memory
    (the tied sums, projections and vmap intermediates need as much again).

    Parameters outside Linear/Conv layers get one full gradient per example; an LM's
    embedding (vocabulary x width, often tied to the head) makes that gigabytes per batch.
    """
    if not names:
        return
    params = task.tracked_params()
    sizes = {n: params[n].numel() * params[n].element_size() for n in names}
    need = batch_size_of(batch) * sum(sizes.values())
    limit = memory_of(task.device) // 4
    if need > limit:
        big = sorted(sizes, key=sizes.__getitem__, reverse=True)[:3]
        shapes = {n: tuple(params[n].shape) for n in big}
        raise ModelError(
            f"per-example gradients of the parameters outside Linear/Conv layers would take "
            f"{need / 2**30:.1f} GiB for this batch of {batch_size_of(batch)} (largest: "
            f"{shapes}), over a quarter of the {limit * 4 / 2**30:.0f} GiB of {task.device}. Track "
            "the layers only (Task(model, module_types='layers'), as kronfluence and Bergson "
            "do), leave these parameters out (params=[...]), or lower batch_size."
        )


def _group_sums(per_sample: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``(G, *shape)`` sums of the members' rows of ``(B, *shape)`` (``-1`` pads)."""
    index = members.clamp_min(0).to(per_sample.device)
    keep = (members >= 0).to(per_sample.device, per_sample.dtype)
    rows = per_sample[index.flatten()].reshape(*members.shape, *per_sample.shape[1:])
    return (rows * keep.view(*members.shape, *([1] * (per_sample.ndim - 1)))).sum(1)


def _compute(
    task: Task,
    batch: Batch,
    state: Mapping[str, torch.Tensor] | None,
    which: str,
    engine: Engine,
    chunk_size: int | None,
    members: torch.Tensor | None,
) -> PerSampleGrads:
    if engine not in ("auto", "functional", "hooks"):
        raise ConfigError(f"engine must be 'auto', 'functional' or 'hooks'; got {engine!r}.")
    task.check_batch(batch)
    state = task.state() if state is None else state
    names = task.tracked_names
    shapes = {n: tuple(p.shape) for n, p in task.tracked_params().items()}
    modules = hookable_modules(task) if engine != "functional" else {}
    factors: list[LayerFactors] = []
    dense: dict[str, torch.Tensor] = {}
    obj: torch.Tensor | None = None
    covered = {n for pair in modules.values() for n in pair if n is not None}
    rest = [n for n in names if n not in covered]
    b = 0
    _check_dense_memory(task, batch, rest)
    if engine != "functional":
        # one forward/backward: factors of the layers, per-module products for the rest
        owners = owner_modules(task, rest)
        factors, captured, batch_grads, obj = hook_pass(
            task, state, batch, modules, list(owners), rest, which
        )
        b = obj.shape[0]
        if owners:
            dense = module_per_sample_grads(task, state, owners, captured, b, chunk_size)
            fallback = check_batch_sums(dense, batch_grads)
            dense = {n: g for n, g in dense.items() if n not in fallback}
            if members is not None:
                dense = {n: _group_sums(g, members) for n, g in dense.items()}
            rest = fallback
        if members is not None:
            factors, b = group_factors(factors, members), members.shape[0]
    if rest:  # the whole-model functional engine (vmap over examples or groups)
        if members is None:
            more = functional_per_sample_grads(task, state, batch, rest, which, chunk_size)
        else:
            more = functional_group_grads(task, state, batch, rest, members, which, chunk_size)
        dense.update(more)
        b = next(iter(more.values())).shape[0]
    psg = PerSampleGrads(names, shapes, dense, factors, b, obj)
    _check_finite(psg, which)
    return psg
