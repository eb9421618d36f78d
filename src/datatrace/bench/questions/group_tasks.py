"""Downstream group tasks: dataset pruning and noisy-label identification (``group-tasks``).

``prune``: group values = total group attribution (``method``, TRAK by default) of the
validation queries' targets, random groups of size 1 and 16; drop the lowest-valued groups,
retrain the setting on the rest (``train_seeds`` seeds, accuracy averaged) and report test
accuracy against dropping the *same number* of examples at random (``random_seeds`` orders).

``mislabel``: the setting's memorised flipped-label variant (10% flips); random groups of
size 1, 4 and 16 inspected in decreasing group self-influence (grad-dot and TRAK), against
random group order (mean of 50 orders) and the training loss summed per group. The random
groups use ``group_seed`` 1: with seed 0 they share ``torch.randperm(n, seed 0)`` with the
label flips, and the 10% flips fill the first groups. Reported: area under
fraction-of-flips-found vs fraction-inspected, and the fraction found after inspecting 10% and
20% of the training examples. Metrics: :mod:`datatrace.metrics` with ``groups=``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from datatrace.bench.questions.harness import QuestionConfig, timed
from datatrace.errors import ConfigError

__all__ = ["GroupTasksConfig", "group_tasks"]


@dataclass(frozen=True)
class GroupTasksConfig(QuestionConfig):
    """Dataset pruning and noisy-label identification with groups (module docstring).

    Attributes:
        task: ``prune``, ``mislabel`` or ``both``.
        setting: the registered setting.
        method: attribution method of the group values (``prune``).
        fractions: fractions of the training set kept (``prune``).
        train_seeds: retrainings per pruned set (``prune``).
        random_seeds: random pruning orders (``prune``).
        group_seed: random grouper seed (``mislabel``).
    """

    task: Literal["prune", "mislabel", "both"] = "both"
    setting: str = "digits-mlp"
    method: str = "trak"
    fractions: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4, 0.2)
    train_seeds: int = 2
    random_seeds: int = 2
    group_seed: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        kept = list(self.fractions)
        if not kept or any(not 0.0 < f <= 1.0 for f in kept) or kept != sorted(set(kept))[::-1]:
            raise ConfigError(
                f"group-tasks fractions are fractions kept, strictly decreasing in (0, 1], "
                f"e.g. 1.0,0.6,0.2; got {kept}."
            )


def _prune(config: GroupTasksConfig) -> dict[str, Any]:
    from datatrace import make_attributor
    from datatrace.bench.settings import get_setting
    from datatrace.group import make_grouper
    from datatrace.metrics import pruning_curve, random_example_pruning_curve

    setting = get_setting(config.setting)
    task = setting.make_task(setting.train(seed=0))
    train, val = setting.data.train, setting.data.queries("val")

    def retrain(kept: torch.Tensor) -> list[torch.nn.Module]:
        return [setting.train(indices=kept, seed=s) for s in range(config.train_seeds)]

    def evaluate(models: list[torch.nn.Module]) -> float:
        return statistics.fmean(setting.evaluate(m, "test").accuracy for m in models)

    out: dict[str, Any] = {"method": config.method, "fractions_kept": list(config.fractions)}
    for size in (1, 16):
        grouper = make_grouper("random", group_size=size, seed=0)
        attr = make_attributor(config.method, task, groups=grouper)
        secs, scores = timed(lambda: attr.fit(train).attribute(val))  # noqa: B023
        assert attr.grouping is not None
        dropped = [1.0 - f for f in config.fractions]
        r = pruning_curve(scores, dropped, retrain, evaluate, groups=attr.grouping)
        rand = [
            random_example_pruning_curve(setting.n_train, r.n_kept, retrain, evaluate, seed=s)
            for s in range(config.random_seeds)
        ]
        rand_acc = torch.stack([x.accuracy for x in rand]).mean(0)
        out[f"size{size}"] = {
            "attribution_s": round(secs, 2),
            "n_kept": r.n_kept.tolist(),
            "accuracy": [round(a, 4) for a in r.accuracy.tolist()],
            "random_accuracy": [round(a, 4) for a in rand_acc.tolist()],
        }
        print(f"size {size}: {json.dumps(out[f'size{size}'])}", flush=True)
    return out


def _curves(curves: list[Any]) -> dict[str, float]:
    """Area and fraction found at 10% and 20% inspected, averaged over ``curves``."""
    summary = {"area": [c.area for c in curves]}
    summary |= {f"found@{p}%": [c.found_at(p / 100) for c in curves] for p in (10, 20)}
    return {key: round(statistics.fmean(values), 4) for key, values in summary.items()}


def _uniform(n: int, seed: int) -> torch.Tensor:
    """Random group scores: a seeded random inspection order."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mislabel(config: GroupTasksConfig) -> dict[str, Any]:
    from datatrace import make_attributor
    from datatrace.bench.mislabel import mislabel_ground_truth
    from datatrace.bench.settings import get_setting
    from datatrace.group import make_grouper
    from datatrace.metrics import mislabel_detection

    gt = mislabel_ground_truth(get_setting(config.setting))
    print(gt.note(), flush=True)
    model, _ = gt.train()
    task = gt.setting.make_task(model)
    x, y = gt.setting.data.train
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none")
    out: dict[str, Any] = {"note": gt.note()}
    for size in (1, 4, 16):
        # Not seed 0: flip_labels and the random grouper both take torch.randperm(n) with
        # their seed, so seed 0 puts the 144 flips into exactly the first 9 groups of 16.
        grouping = make_grouper("random", group_size=size, seed=config.group_seed).group((x, y))
        row: dict[str, Any] = {}
        for method in ("grad-dot", "trak"):
            attr = make_attributor(method, task, groups=grouping)
            secs, self_inf = timed(lambda: attr.fit((x, y)).self_attribute())  # noqa: B023
            curve = mislabel_detection(self_inf, gt.flipped, groups=grouping)
            row[f"self-influence {method}"] = _curves([curve]) | {"seconds": round(secs, 2)}
        summed = grouping.sum_rows(loss.double())
        row["training loss"] = _curves([mislabel_detection(summed, gt.flipped, groups=grouping)])
        rand = [
            mislabel_detection(_uniform(grouping.n_groups, s), gt.flipped, groups=grouping)
            for s in range(50)
        ]
        row["random (mean of 50)"] = _curves(rand)
        row["max flips in a group"] = int(grouping.sum_rows(gt.flipped.long()).max())
        out[f"size{size}"] = row
        print(f"size {size}: {json.dumps(row)}", flush=True)
    return out


def group_tasks(config: GroupTasksConfig) -> dict[str, Any]:
    """Run ``group-tasks``; prints one JSON line per group size, then everything."""
    results: dict[str, Any] = {}
    if config.task in ("prune", "both"):
        results["prune"] = _prune(config)
    if config.task in ("mislabel", "both"):
        results["mislabel"] = _mislabel(config)
    print(json.dumps(results, indent=1))
    return results
