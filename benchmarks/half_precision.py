"""K-FAC/EK-FAC scores of half-precision models against the float32 model's (issue 21).

    .venv/bin/python benchmarks/half_precision.py --settings digits-mlp digits-cnn

For each setting's seed-0 model (float32) and the README's methods at their defaults, the
model is rounded to bfloat16 and to float16 and attributed two ways: in its own precision
(``Task(half)``) and with ``Task(half, compute_dtype=torch.float32)``. Printed: the relative
Frobenius error of the score matrix (train x 300 test queries) against the float32
model's, and the worst query's relative error. The rounding of weights and inputs is part
of both errors; ``compute_dtype`` removes the rest (its scores equal those of the float32
model with the rounded weights, bit for bit — tests/methods/test_dtypes.py).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

from datatrace import make_attributor
from datatrace.bench.settings import Setting, get_setting


def _cast(batch: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def _errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    per_query = (a - ref).norm(dim=1) / ref.norm(dim=1)  # values: (n_query, n_train)
    return float((a - ref).norm() / ref.norm()), float(per_query.max())


def _scores(
    setting: Setting, method: str, model: nn.Module, dtype: torch.dtype, **opts: Any
) -> torch.Tensor:
    """``method``'s test-query scores, inputs cast to ``dtype``, as float32."""
    attr = make_attributor(method, setting.make_task(model, **opts))
    attr.fit(_cast(setting.data.train, dtype))
    return attr.attribute(_cast(setting.data.queries("test"), dtype)).values.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits-mlp", "digits-cnn"])
    parser.add_argument("--methods", nargs="+", default=["if-ekfac", "if-kfac"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| setting | method | weights | compute | relative error | worst query |")
    print("|---|---|---|---|---|---|")
    for name in args.settings:
        setting = get_setting(name)
        model = setting.train(seed=0)
        for method in args.methods:
            ref = _scores(setting, method, model, torch.float32)
            for half in (torch.bfloat16, torch.float16):
                hm = copy.deepcopy(model).to(half)
                for label, opts in (("model's", {}), ("float32", {"compute_dtype": torch.float32})):
                    err, worst = _errors(_scores(setting, method, hm, half, **opts), ref)
                    kind = str(half).removeprefix("torch.")
                    print(f"| {name} | {method} | {kind} | {label} | {err:.4f} | {worst:.3f} |")


if __name__ == "__main__":
    main()
