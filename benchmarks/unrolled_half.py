"""Exact unrolled metagradients under half-subset LDS: where to linearise, and seeds (issue 20).

    python benchmarks/unrolled_half.py --setting digits-mlp-short \\
        --others out/unr/digits-mlp-short-lds-half.json --json out/unr/short-half.json

Variants of ``unrolled`` on the setting's runs (``train_recipe(seed=k)``; seed 0 unless
said):

- ``weight=w`` for ``w`` in ``--weights``: the metagradient with every example's loss weight
  at ``w`` (1: the recorded run; 0.5: the centre of a half-subset ablation);
- ``path`` : the average of the metagradients at the 3 Gauss-Legendre points between 0.5
  and 1 (integrated gradients along the weights from the full run to the half-weighted one),
  from the ``weight=`` attributions at those points;
- ``seeds K``: the mean of the ``weight=w`` metagradients of the runs with seeds 0..K-1,
  which is what ``UnrolledAttributor(task, recipe=[r_0..r_K-1], members=[...])`` returns.

The weight is chosen on the validation queries (DESIGN.md §9) among ``--weights``, single run
and seed mean separately; LDS on the test queries with a 95% bootstrap interval, and the
paired-bootstrap interval of the difference to the best other method of ``--others`` (the
JSON of ``datatrace bench --json`` on the same setting and protocol). Ground truth: the
bench's cache (:func:`datatrace.bench.protocols.ground_truth`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datatrace.bench.protocols import ground_truth, parse_protocol
from datatrace.bench.settings import get_setting
from datatrace.methods import UnrolledAttributor
from datatrace.metrics import lds, paired_bootstrap

# 3-point Gauss-Legendre on [0.5, 1]: nodes 0.75 + 0.25 x, weights c / 2
PATH = [
    (0.75 + 0.25 * x, c / 2)
    for x, c in ((-math.sqrt(0.6), 5 / 9), (0.0, 8 / 9), (math.sqrt(0.6), 5 / 9))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="digits-mlp-short")
    parser.add_argument("--protocol", default="lds-half")
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--weights", default="1,0.5,0.25")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument(
        "--others",
        action="append",
        default=[],
        help="datatrace bench --json output to compare against (repeatable; rows of "
        "ensembles independent:K are compared with the seed means)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    setting = get_setting(args.setting)
    gt = ground_truth(setting, parse_protocol(args.protocol, m=args.m), progress=False)
    val, test = slice(0, setting.n_val), slice(setting.n_val, None)
    train, queries = setting.data.train, setting.data.queries("all")
    runs = [setting.train_recipe(seed=k) for k in range(args.seeds)]
    grid = [float(w) for w in args.weights.split(",")]

    cache: dict[tuple[float, int], torch.Tensor] = {}

    def scores(weight: float, seed: int) -> torch.Tensor:
        if (weight, seed) not in cache:
            model, recipe = runs[seed]
            attr = UnrolledAttributor(
                setting.make_task(model), recipe=recipe, weight=weight, batch_size=256
            )
            t0 = time.perf_counter()
            cache[weight, seed] = attr.fit(train).attribute(queries).values.double()
            print(f"  weight {weight:g} seed {seed}: {time.perf_counter() - t0:.1f} s", flush=True)
        return cache[weight, seed]

    variants: dict[str, dict[float, torch.Tensor]] = {"single run": {}, f"seeds {args.seeds}": {}}
    for w in grid:
        variants["single run"][w] = scores(w, 0)
        variants[f"seeds {args.seeds}"][w] = torch.stack(
            [scores(w, k) for k in range(args.seeds)]
        ).mean(0)
    path = sum(c * scores(w, 0) for w, c in PATH)

    # the other methods' per-query LDS: single models, and ensembles of as many seeds
    others: dict[str, torch.Tensor] = {}
    ensembles: dict[str, torch.Tensor] = {}
    for path_ in args.others:
        for row in json.loads(Path(path_).read_text())["rows"]:
            if row["method"] == "unrolled" or "lds" not in row:
                continue
            per_query = torch.tensor(row["per_query_lds"], dtype=torch.float64)
            if row.get("ensemble") is None:
                others[row["method"]] = per_query
            elif row["label"].endswith(f"independent:{args.seeds}"):
                ensembles[row["label"]] = per_query

    rows: list[dict[str, Any]] = []

    def report(
        label: str, values: torch.Tensor, chosen: str, pool: dict[str, torch.Tensor]
    ) -> None:
        best = max(pool, key=lambda k: float(pool[k].nanmean())) if pool else None
        res = lds(values[test], gt.subsets, gt.targets[:, test])
        low, high = res.bootstrap_ci()
        row = {"variant": label, "chosen": chosen, "lds": res.mean, "ci": [low, high]}
        row["val_lds"] = lds(values[val], gt.subsets, gt.targets[:, val]).mean
        if best is not None:
            row["vs"] = best
            row["diff_ci"] = list(paired_bootstrap(res.per_query, pool[best]))
        rows.append(row)
        diff = f"  - {best}: [{row['diff_ci'][0]:+.3f}, {row['diff_ci'][1]:+.3f}]" if best else ""
        print(
            f"{label:28s} {res.mean:.3f} [{low:.3f}, {high:.3f}] val {row['val_lds']:.3f}"
            f" {chosen:18s}{diff}",
            flush=True,
        )

    print(f"{setting.name}, {args.protocol}: test LDS [95% CI], validation LDS")
    for name, by_weight in variants.items():
        pool = others if name == "single run" else ensembles
        for w, values in by_weight.items():
            report(f"unrolled weight={w:g}, {name}", values, "", pool)
        val_lds = {
            w: lds(v[val], gt.subsets, gt.targets[:, val]).mean for w, v in by_weight.items()
        }
        w_best = max(val_lds, key=val_lds.__getitem__)
        report(f"unrolled {name}, chosen", by_weight[w_best], f"weight={w_best:g}", pool)
    report("unrolled path 0.5..1 (3 pts)", path, "", others)
    for name, per_query in {**others, **ensembles}.items():
        print(f"{name:28s} {float(per_query.nanmean()):.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"setting": setting.name, "protocol": args.protocol, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
