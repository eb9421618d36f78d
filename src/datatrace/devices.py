"""Devices and dtypes: where attribution runs and in which precision (DESIGN.md §6).

- **Device.** The task's model decides it. ``Task(device=...)`` and every attributor's
  ``device=`` accept ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device`` and
  move the model there *in place* (``nn.Module.to``). :func:`resolve_device` checks the value
  before anything runs.
- **Working dtype.** Gradients and features are computed in the model's dtype; everything
  that accumulates or inverts (curvature, kernels, solves, scores) runs in
  :func:`working_dtype`: float64 for a float64 model, float32 otherwise. A bfloat16 or
  float16 model therefore gets float32 curvature and float32 scores.
- **Feature storage.** ``feature_dtype=`` (every method's setting) rounds stored train
  features to a narrower (or wider) float type; they are upcast to the working dtype when
  scored. :func:`check_feature_dtype` normalises and validates it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from datatrace.errors import ConfigError

__all__ = [
    "FEATURE_DTYPES",
    "cast_floating",
    "check_feature_dtype",
    "map_tensors",
    "move_to_device",
    "resolve_device",
    "working_dtype",
]

FEATURE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_KINDS = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Check a ``device=`` value and return it as a ``torch.device`` (None stays None).

    ``"cuda"`` without an index becomes the current CUDA device (``cuda:0`` by default), so
    that it compares equal to the device of tensors placed there.

    Raises:
        ConfigError: an unparsable string, a kind other than cpu/cuda/mps (``"meta"``
            tensors hold no data), or a device this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device(None) is None
        True
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ConfigError(
            f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', or a torch.device; got "
            f"{device!r} ({type(device).__name__})."
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"device={device!r} is not a device torch understands ({exc}); use 'cpu', 'cuda', "
            "'cuda:<index>' or 'mps'."
        ) from exc
    if dev.type not in _KINDS:
        extra = " (meta tensors hold no data to compute with)" if dev.type == "meta" else ""
        raise ConfigError(
            f"device={device!r} has kind {dev.type!r}{extra}; datatrace runs on {list(_KINDS)}."
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ConfigError(
                f"device={device!r} was requested but CUDA is not available here (torch "
                f"{torch.__version__}, {build}); pass device='cpu', or run on a machine with "
                "a GPU and a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise ConfigError(
                f"device={device!r} names CUDA device {index}, but this machine has {count} "
                f"(indices 0..{count - 1}); pick one of them."
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device={device!r} was requested but the MPS backend is not available here; pass "
            "device='cpu'."
        )
    return dev


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature, kernels, solves and scores use for a model of ``dtype``.

    float64 stays float64; float32, bfloat16 and float16 work in float32: half precision
    keeps ~3 significant digits, too few to accumulate a Gram matrix or invert a curvature.

    Example:
        >>> working_dtype(torch.bfloat16), working_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_feature_dtype(value: str | torch.dtype | None) -> str | None:
    """Normalise a ``feature_dtype=`` setting to its name (None stays None).

    Raises:
        ConfigError: anything but None, a name in :data:`FEATURE_DTYPES` or such a dtype.

    Example:
        >>> check_feature_dtype(torch.bfloat16)
        'bfloat16'
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
    else:
        name = ""
    if name not in FEATURE_DTYPES:
        raise ConfigError(
            f"feature_dtype must be None (the model's dtype) or one of {list(FEATURE_DTYPES)}; "
            f"got {value!r}."
        )
    return name


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (nested tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def move_to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    # non_blocking only towards a GPU: a non-blocking copy *to* the CPU may be read early
    return map_tensors(obj, lambda t: t.to(device, non_blocking=device.type == "cuda"))


def cast_floating(obj: Any, source: torch.dtype, target: torch.dtype) -> Any:
    """``obj`` with every tensor of dtype ``source`` in it cast to ``target`` (others kept)."""
    return map_tensors(obj, lambda t: t.to(target) if t.dtype == source else t)


def memory_of(device: torch.device) -> int:
    """Bytes of memory of ``device``: total GPU memory, or the machine's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return 1 << 62
