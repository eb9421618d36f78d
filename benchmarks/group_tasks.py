"""Downstream group tasks on digits-mlp: dataset pruning and noisy-label identification.

    python benchmarks/group_tasks.py                       # both tasks, ~3 min on one thread
    python benchmarks/group_tasks.py --task prune --method grad-dot

``prune``: group values = total group attribution (``--method``, TRAK by default) of the 60
validation queries' margins, random groups of size 1 and 16; drop the lowest-valued groups,
retrain digits-mlp on the rest (``--train-seeds`` seeds, accuracy averaged) and report test
accuracy against dropping the *same number* of examples at random (``--random-seeds`` orders).

``mislabel``: the setting's memorised flipped-label variant (10% flips, 100% training
accuracy); random groups of size 1, 4 and 16 inspected in decreasing group self-influence
(grad-dot and TRAK), against random group order (mean of 50 orders) and the training loss
summed per group. The random groups use ``--group-seed`` 1: with seed 0 they share
``torch.randperm(n, seed 0)`` with the label flips, and the 10% flips fill the first groups. Reported: area under fraction-of-flips-found vs fraction-inspected, and the
fraction found after inspecting 10% and 20% of the training examples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datatrace import make_attributor
from datatrace.bench.group_tasks import (
    group_inspection_curve,
    group_pruning_curve,
    group_values,
    random_example_pruning_curve,
    random_group_inspection_curve,
    sum_per_group,
)
from datatrace.bench.mislabel import mislabel_ground_truth
from datatrace.bench.settings import get_setting
from datatrace.group import make_grouper


def prune(args: argparse.Namespace) -> dict[str, Any]:
    setting = get_setting("digits-mlp")
    model = setting.train(seed=0)
    task = setting.make_task(model)
    train = setting.data.train
    val = setting.data.queries("val")
    seeds = list(range(args.train_seeds))

    def retrain(kept: torch.Tensor) -> list[torch.nn.Module]:
        return [setting.train(indices=kept, seed=s) for s in seeds]

    def evaluate(models: list[torch.nn.Module]) -> float:
        return statistics.fmean(setting.evaluate(m, "test").accuracy for m in models)

    out: dict[str, Any] = {"method": args.method, "fractions_kept": args.fractions}
    for size in (1, 16):
        t0 = time.perf_counter()
        grouper = make_grouper("random", group_size=size, seed=0)
        attr = make_attributor(args.method, task, groups=grouper).fit(train)
        values = group_values(attr.attribute(val))
        secs = time.perf_counter() - t0
        assert attr.grouping is not None
        r = group_pruning_curve(values, attr.grouping, args.fractions, retrain, evaluate)
        rand = [
            random_example_pruning_curve(setting.n_train, r.n_kept, retrain, evaluate, seed=s)
            for s in range(args.random_seeds)
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


def mislabel(args: argparse.Namespace) -> dict[str, Any]:
    gt = mislabel_ground_truth(get_setting("digits-mlp"))
    print(gt.note(), flush=True)
    model, _ = gt.train()
    setting = gt.setting
    task = setting.make_task(model)
    x, y = setting.data.train
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none")

    def summary(r: Any) -> dict[str, float]:
        return {
            "area": round(r.area, 4),
            "found@10%": round(r.found_at(0.1), 4),
            "found@20%": round(r.found_at(0.2), 4),
        }

    out: dict[str, Any] = {"note": gt.note()}
    for size in (1, 4, 16):
        # Not seed 0: flip_labels and the random grouper both take torch.randperm(n) with
        # their seed, so seed 0 puts the 144 flips into exactly the first 9 groups of 16.
        grouper = make_grouper("random", group_size=size, seed=args.group_seed)
        grouping = grouper.group((x, y))
        row: dict[str, Any] = {}
        for method in ("grad-dot", "trak"):
            t0 = time.perf_counter()
            self_inf = make_attributor(method, task, groups=grouping).fit((x, y)).self_attribute()
            row[f"self-influence {method}"] = summary(
                group_inspection_curve(self_inf, grouping, gt.flipped)
            ) | {"seconds": round(time.perf_counter() - t0, 2)}
        row["training loss"] = summary(
            group_inspection_curve(sum_per_group(loss, grouping), grouping, gt.flipped)
        )
        rand = [random_group_inspection_curve(grouping, gt.flipped, seed=s) for s in range(50)]
        row["random (mean of 50)"] = {
            "area": round(statistics.fmean(r.area for r in rand), 4),
            "found@10%": round(statistics.fmean(r.found_at(0.1) for r in rand), 4),
            "found@20%": round(statistics.fmean(r.found_at(0.2) for r in rand), 4),
        }
        row["max flips in a group"] = int(grouping.sum_rows(gt.flipped.long()).max())
        out[f"size{size}"] = row
        print(f"size {size}: {json.dumps(row)}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=["prune", "mislabel", "both"], default="both")
    p.add_argument("--method", default="trak", help="attribution method for group values")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4, 0.2])
    p.add_argument("--train-seeds", type=int, default=2)
    p.add_argument("--random-seeds", type=int, default=2)
    p.add_argument("--group-seed", type=int, default=1, help="random grouper seed (mislabel)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    if args.task in ("prune", "both"):
        results["prune"] = prune(args)
    if args.task in ("mislabel", "both"):
        results["mislabel"] = mislabel(args)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
