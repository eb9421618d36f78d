"""What every question shares: its config's checks, warm medians and one process per run."""

from __future__ import annotations

import dataclasses
import statistics
import time
import typing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from datatrace.bench.runner import _peak_rss
from datatrace.errors import ConfigError

__all__ = ["QuestionConfig", "median_time", "peak_rss_mib", "run_isolated", "timed", "warm_medians"]


@dataclasses.dataclass(frozen=True)
class QuestionConfig:
    """Base of the questions' options: a closed choice (``Literal``) must be one of its values."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            hint, value = hints[field.name], getattr(self, field.name)
            if typing.get_origin(hint) is tuple:
                hint, values = typing.get_args(hint)[0], value
            else:
                values = (value,)
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            bad = [v for v in values if choices is not None and v not in choices]
            if bad:
                raise ConfigError(
                    f"{field.name}={bad[0]!r} is not one of {list(choices or ())}; choose one."
                )


def _wait_for_gpu() -> None:
    if torch.cuda.is_initialized():  # kernels run asynchronously: time them to their end
        torch.cuda.synchronize()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Wall seconds of ``fn(*args, **kwargs)`` (CUDA work included) and its result."""
    _wait_for_gpu()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _wait_for_gpu()
    return time.perf_counter() - t0, out


def warm_medians(
    fn: Callable[[], dict[str, float]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Per key, the median over ``repeats`` runs of ``fn`` (seconds by phase) after ``warmup``
    runs that are not counted: times are medians of warm repeated runs (DESIGN.md §9)."""
    runs = [fn() for _ in range(warmup + repeats)][warmup:]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` warm runs of ``fn``."""
    return warm_medians(lambda: {"s": timed(fn)[0]}, repeats, warmup)["s"]


def peak_rss_mib() -> float:
    """This process's peak resident memory (``ru_maxrss``) in MiB."""
    return _peak_rss() / 2**20


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process, so that its peak memory is its own (DESIGN.md
    §9); a failure comes back as ``{"error": "Type: message"}`` instead of stopping the run."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except Exception as exc:  # report the config that failed, run the others
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
