"""The checks a :class:`~datatrace.task.Task` runs on data and weights before attribution:
input dtypes and devices, NaN/inf in inputs, labels and weights, labels the built-in losses and
targets cannot take, and one probing forward pass. Each names the bad value and the fix."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from datatrace.data import Batch
from datatrace.errors import DataError, DatatraceError, ModelError, NumericalError

if TYPE_CHECKING:
    from datatrace.task import Task, _SplitBatch


def _rows(split: _SplitBatch) -> int:
    """Examples in a split batch (its first tensor's leading dimension)."""
    for t in [*split.args, *split.kwargs.values(), split.labels]:
        if isinstance(t, torch.Tensor) and t.ndim:
            return int(t.shape[0])
    return 0


def _describe(split: _SplitBatch) -> str:
    """The inputs of a split batch for a message: shapes and dtypes by position or key."""

    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        return type(t).__name__

    parts = [one(t) for t in split.args] + [f"{k}={one(t)}" for k, t in split.kwargs.items()]
    return "[" + ", ".join(parts) + "]"


def check_batch(task: Task, batch: Batch) -> None:
    """:meth:`Task.check_batch <datatrace.task.Task.check_batch>`."""
    split = task._split(batch)
    leaves = list(split.args) + list(split.kwargs.values())
    if split.labels is not None:
        leaves.append(split.labels)
    device = task.device
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            continue
        if t.device != device and not task._moves_batches:
            raise DataError(
                f"an input tensor is on {t.device} but the model is on {device}; move the "
                f"batch to the model (e.g. x.to({str(device)!r}) for each tensor), or use an "
                "attributor, which moves batches to the model's device itself."
            )
        if t is split.labels:
            continue
        if t.is_floating_point() and t.dtype != task.dtype:
            raise DataError(
                f"an input tensor has dtype {t.dtype} but the model's parameters are "
                f"{task.dtype}; cast the data (e.g. x.to({task.dtype})) or the model."
            )


def check_data(task: Task, data: Any, batch_size: int, what: str) -> None:
    """:meth:`Task.check_data <datatrace.task.Task.check_data>`."""
    from datatrace.data import iter_batches

    n_out: tuple[int, ...] | None = None
    offset = 0
    for batch in iter_batches(data, batch_size):
        split = task.split_batch(batch)
        _check_finite_batch(task, split, what, offset)
        if n_out is None:
            n_out = _probe_outputs(task, split, what)
        _check_labels(task, split.labels, n_out, what, offset)
        offset += _rows(split)


def check_finite_state(task: Task, state: Mapping[str, torch.Tensor], what: str) -> None:
    """:meth:`Task.check_finite_state <datatrace.task.Task.check_finite_state>`."""
    for name in task._tracked:
        t = state.get(name)
        if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise NumericalError(
                f"parameter {name!r} of {what} holds {bad} {kind} value(s); attribution "
                "of a model with non-finite weights is meaningless. Load finite weights "
                "(a checkpoint saved before the divergence), or lower the learning rate."
            )


def _check_finite_batch(task: Task, split: _SplitBatch, what: str, offset: int) -> None:
    _check_input_dtypes(task, split)
    named = [(f"positional input {i}", t) for i, t in enumerate(split.args)]
    named += [(f"input {k!r}", t) for k, t in split.kwargs.items()]
    named.append(("labels", split.labels))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        row = int((~finite).reshape(t.shape[0], -1).any(1).nonzero()[0, 0]) if t.ndim else 0
        value = t.reshape(-1)[int((~finite).reshape(-1).nonzero()[0, 0])].item()
        raise NumericalError(
            f"the {what} data's {name} holds {value} at example {offset + row}; scores of "
            "non-finite data would be NaN. Clean or drop that example (torch.isfinite "
            "finds them)."
        )


def _check_input_dtypes(task: Task, split: _SplitBatch) -> None:
    leaves = list(split.args) + list(split.kwargs.values())
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != task.dtype:
            raise DataError(
                f"an input tensor has dtype {t.dtype} but the model's parameters are "
                f"{task.dtype}; cast the data (e.g. x.to({task.dtype})) or the model."
            )


def _probe_outputs(task: Task, split: _SplitBatch, what: str) -> tuple[int, ...]:
    """One forward pass of the first batch: the shape of one example's outputs."""
    try:
        with torch.no_grad():
            out = task.outputs(task.state(), split)
    except DatatraceError:
        raise
    except Exception as exc:  # the user's model refused these inputs
        raise DataError(
            f"the model cannot take the {what} data: with inputs {_describe(split)} its "
            f"forward raised {type(exc).__name__}: {exc}. Check the data's feature sizes, "
            "dtypes and keys against what the model expects (or pass batch_to_inputs=)."
        ) from exc
    if out.ndim == 0 or not bool(torch.isfinite(out).all()):
        if out.ndim == 0:
            raise ModelError(
                f"the model returned a scalar on the {what} data; it must return one row "
                "of outputs per example."
            )
        raise NumericalError(
            f"the model's outputs on the {what} data hold NaN/inf although the inputs "
            f"{_describe(split)} are finite: the forward pass overflows; check the weights "
            "and the inputs' scale."
        )
    return tuple(out.shape[1:])


def _check_labels(
    task: Task, labels: torch.Tensor | None, n_out: tuple[int, ...], what: str, offset: int
) -> None:
    """Labels the built-in losses and targets cannot take, named (custom ones: no check)."""
    if not isinstance(labels, torch.Tensor) or not n_out:
        return
    uses = {task.loss_name if task._builtin_loss else "", task.target.name}
    classes: int | None = None
    ignore = False
    if uses & {"cross_entropy", "margin"}:
        classes, ignore = n_out[0], "margin" not in uses
        if labels.is_floating_point() and "margin" not in uses:
            # class probabilities: shaped like the outputs
            if tuple(labels.shape[1:]) != n_out:
                raise DataError(
                    f"the {what} data's float labels have shape {tuple(labels.shape)} but "
                    f"the outputs have {n_out} per example; cross-entropy takes integer class "
                    "labels (B,) or class probabilities shaped like the outputs."
                )
            return
    elif uses & {"lm", "log_prob"}:
        classes, ignore = n_out[-1], True
    elif "mse" in uses:
        per_example = math.prod(n_out)
        if labels.ndim == 0 or labels[0].numel() != per_example:
            raise DataError(
                f"loss='mse' got {what} labels of shape {tuple(labels.shape)} for outputs of "
                f"shape {n_out} per example; give targets shaped like the outputs (for "
                "class labels use loss='cross_entropy', or one-hot encode them: "
                f"F.one_hot(y, {per_example}).float())."
            )
    if classes is None:
        return
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(
            f"the {what} data's labels have dtype {labels.dtype}; the task's "
            f"{sorted(uses - {''})} need integer class labels in [0, {classes})."
        )
    bad = (labels < 0) | (labels >= classes)
    if ignore:
        bad &= labels != -100
    if bool(bad.any()):
        first = bad.reshape(labels.shape[0], -1).any(1).nonzero()[0, 0] if labels.ndim else 0
        value = int(labels.reshape(-1)[bad.reshape(-1)][0])
        allowed = f"[0, {classes})" + (" or -100 (ignored)" if ignore else "")
        raise DataError(
            f"the {what} data has label {value} at example {offset + int(first)}, but the "
            f"model has {classes} classes: labels must lie in {allowed}. Fix the labels or "
            "the model's output size."
        )
