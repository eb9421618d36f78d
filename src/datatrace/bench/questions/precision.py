"""K-FAC/EK-FAC scores of half-precision models against the float32 model's
(``half-precision``, issue 21).

For each setting's seed-0 model (float32) and each method at its defaults, the model is
rounded to bfloat16 and to float16 and attributed two ways: in its own precision
(``Task(half)``) and with ``Task(half, compute_dtype=torch.float32)``. Printed: the relative
Frobenius error of the score matrix (train x test queries) against the float32 model's, and
the worst query's relative error. The rounding of weights and inputs is part of both errors;
``compute_dtype`` removes the rest (its scores equal those of the float32 model with the
rounded weights, bit for bit: tests/methods/test_dtypes.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from datatrace.bench.questions.harness import QuestionConfig

__all__ = ["HalfPrecisionConfig", "half_precision"]


@dataclass(frozen=True)
class HalfPrecisionConfig(QuestionConfig):
    """Scores of bfloat16/float16 models against the float32 model's (module docstring).

    Attributes:
        settings: registered settings.
        methods: method ids.
    """

    settings: tuple[str, ...] = ("digits-mlp", "digits-cnn")
    methods: tuple[str, ...] = ("if-ekfac", "if-kfac")


def _cast(batch: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def half_precision(config: HalfPrecisionConfig) -> list[dict[str, Any]]:
    """Run ``half-precision``; prints one table row per case, returns the rows."""
    from datatrace import make_attributor
    from datatrace.bench.settings import get_setting

    print("| setting | method | weights | compute | relative error | worst query |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in config.settings:
        setting = get_setting(name)
        model = setting.train(seed=0)

        def scores(
            method: str, model: Any, dtype: torch.dtype, setting: Any = setting, **opts: Any
        ) -> torch.Tensor:
            """``method``'s test-query scores, inputs cast to ``dtype``, as float32."""
            attr = make_attributor(method, setting.make_task(model, **opts))
            attr.fit(_cast(setting.data.train, dtype))
            return attr.attribute(_cast(setting.data.queries("test"), dtype)).values.float()

        for method in config.methods:
            ref = scores(method, model, torch.float32)
            for half in (torch.bfloat16, torch.float16):
                for label, opts in (("model's", {}), ("float32", {"compute_dtype": torch.float32})):
                    diff = scores(method, copy.deepcopy(model).to(half), half, **opts) - ref
                    err = float(diff.norm() / ref.norm())
                    worst = float((diff.norm(dim=1) / ref.norm(dim=1)).max())  # per query
                    kind = str(half).removeprefix("torch.")
                    row = {"setting": name, "method": method, "weights": kind, "compute": label}
                    rows.append(row | {"relative_error": err, "worst_query": worst})
                    print(f"| {name} | {method} | {kind} | {label} | {err:.4f} | {worst:.3f} |")
    return rows
