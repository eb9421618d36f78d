"""Questions the LDS table does not answer: speed, scale, the store's cost, groups, precision.

``datatrace bench --question NAME[:key=value...]`` runs one, prints its table and, with
``--json``, writes what it measured; ``datatrace questions`` lists them with their options.
Options are the fields of the question's frozen config (documented there); lists are
comma-separated. ``--threads`` sets torch's threads (default: the question's, else torch's)::

    datatrace bench --question speed-grads:repeats=5 --json out/speed_grads.json
    datatrace bench --question scale:job=million --threads 1
    datatrace bench --question group-speed:job=large:methods=trak:sizes=16,64 --threads 1

A question is registered here, by name, with its config class and the function that runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datatrace.bench.questions.group_tasks import GroupTasksConfig, group_tasks
from datatrace.bench.questions.groups import (
    GroupLDSConfig,
    GroupSpeedConfig,
    group_lds,
    group_speed,
)
from datatrace.bench.questions.harness import QuestionConfig
from datatrace.bench.questions.precision import HalfPrecisionConfig, half_precision
from datatrace.bench.questions.scale import (
    ScaleConfig,
    StoreFitConfig,
    StoreWriteConfig,
    scale,
    store_fit,
    store_write,
)
from datatrace.bench.questions.speed import (
    SpeedGradsConfig,
    SpeedMethodsConfig,
    speed_grads,
    speed_methods,
)

__all__ = ["QUESTIONS", "Question", "QuestionConfig", "describe_questions"]


@dataclass(frozen=True)
class Question:
    """A registered question: its options, what runs it and its default torch threads.

    Example:
        >>> QUESTIONS["store-write"].config(shards=8).rows
        64
    """

    config: type[QuestionConfig]
    run: Callable[[Any], Any]
    threads: int | None = None  # None: torch's default


QUESTIONS: dict[str, Question] = {
    "speed-grads": Question(SpeedGradsConfig, speed_grads),
    "speed-methods": Question(SpeedMethodsConfig, speed_methods),
    "scale": Question(ScaleConfig, scale),
    "store-fit": Question(StoreFitConfig, store_fit),
    "store-write": Question(StoreWriteConfig, store_write),
    "group-speed": Question(GroupSpeedConfig, group_speed),
    "group-lds": Question(GroupLDSConfig, group_lds),
    "group-tasks": Question(GroupTasksConfig, group_tasks, threads=1),
    "half-precision": Question(HalfPrecisionConfig, half_precision, threads=1),
}


def describe_questions() -> list[str]:
    """One line per question (its summary), then one per option with its default."""
    lines = []
    for name, question in QUESTIONS.items():
        summary = (question.config.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{name}: {summary}")
        for field in dataclasses.fields(question.config):
            default = field.default
            text = ",".join(map(str, default)) if isinstance(default, tuple) else default
            lines.append(f"    {field.name}={text}")
    return lines
