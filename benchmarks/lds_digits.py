"""LDS of every method on the digits MLP, with hyperparameters chosen on validation queries.

    python benchmarks/lds_digits.py --json out/lds_digits.json

Protocol (DESIGN.md §9): each method's grid is scored on the validation queries, the best
setting is reported on the separate test queries with a 95% bootstrap interval; the table
also shows a random-score baseline and the noise ceiling of the ground truth. Then TRAK with
5 independently trained members is compared with TRAK with 1 by a paired bootstrap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import digits_bench
from datatrace import DatatraceError, Task, make_attributor
from datatrace.bench.digits import train_digits_mlp_trajectory
from datatrace.metrics import beats, lds

# method id -> list of settings to try (the documented grid)
GRID: dict[str, list[dict[str, Any]]] = {
    "grad-dot": [{}],
    "grad-cos": [{}],
    "tracin": [{}],
    "trak": [
        {"proj_dim": k, "relative_damping": r}
        for k in (256, 512, 1024, 2048)
        for r in (1e-3, 1e-2, 1e-1, 1.0)
    ],
    "rps": [{"damping": d} for d in (1e-3, 1e-2, 1e-1)],
    "if-datainf": [{"damping": d} for d in (1e-3, 1e-2, 1e-1)],
    "if-explicit": [
        {"damping": d, "curvature": "fisher", "projector": "rademacher", "proj_dim": 2048}
        for d in (1e-3, 1e-2, 1e-1)
    ],
    "if-arnoldi": [{"damping": d, "solver_options": {"rank": 100}} for d in (1e-3, 1e-2, 1e-1)],
    # The GGN solvers cost one pass over the train set per iteration for every query column:
    # the grid is kept short (2 CPU cores).
    "if-cg": [{"damping": d, "solver_options": {"max_iter": 50}} for d in (1e-3, 1e-2)],
    "if-lissa": [{"damping": 0.1, "solver_options": {"depth": 100}}],
}


def run_method(
    method_id: str, model: torch.nn.Module, checkpoints: list, members: list, train, queries, opts
):
    task = Task(model, target="margin", checkpoints=checkpoints if method_id == "tracin" else None)
    attr = make_attributor(method_id, task, batch_size=256, members=members or None, **opts)
    t0 = time.perf_counter()
    attr.fit(train)
    t1 = time.perf_counter()
    scores = attr.attribute(queries).values
    t2 = time.perf_counter()
    return scores, t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LDS of every method on the digits MLP")
    parser.add_argument("--methods", default=",".join(GRID), help="comma-separated method ids")
    parser.add_argument(
        "--members", type=int, default=5, help="TRAK ensemble size to compare with 1"
    )
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    bench = digits_bench()
    recipe, gt, train, queries = bench.recipe, bench.gt, bench.train, bench.queries
    val, test, model, checkpoints = bench.val, bench.test, bench.model, bench.checkpoints

    def score(values: torch.Tensor, part: slice):
        return lds(values[part], gt.subsets, gt.targets[:, part])

    rows: list[dict[str, Any]] = []
    ceiling = gt.noise_ceiling()
    g = torch.Generator().manual_seed(0)
    rand = score(
        torch.randn(queries[1].shape[0], train[1].shape[0], generator=g, dtype=torch.float64), test
    )
    print(
        f"ground truth: m={recipe.m} subsets x {recipe.seeds} seeds, alpha={recipe.alpha}; "
        f"noise ceiling {ceiling.mean:.3f}; random scores {rand.mean:+.3f}"
    )
    per_query: dict[str, torch.Tensor] = {}
    for method_id in args.methods.split(","):
        best = None
        for opts in GRID[method_id]:
            try:
                values, fit_s, attr_s = run_method(
                    method_id, model, checkpoints, [], train, queries, opts
                )
            except (
                DatatraceError
            ) as exc:  # e.g. a singular kernel: the grid point is reported, skipped
                print(f"  {method_id:12s} {json.dumps(opts):70s} failed: {exc}")
                continue
            v = score(values, val).mean
            print(
                f"  {method_id:12s} {json.dumps(opts):70s} val LDS {v:.3f}  fit {fit_s:.2f}s attribute {attr_s:.2f}s"
            )
            if best is None or v > best[0]:
                best = (v, opts, values, fit_s, attr_s)
        assert best is not None
        v, opts, values, fit_s, attr_s = best
        result = score(values, test)
        lo, hi = result.bootstrap_ci()
        per_query[method_id] = result.per_query
        rows.append(
            {
                "method": method_id,
                "setting": opts,
                "val_lds": v,
                "test_lds": result.mean,
                "ci": [lo, hi],
                "fit_s": fit_s,
                "attribute_s": attr_s,
            }
        )

    # TRAK: 1 vs K independently trained members at the validation-chosen proj_dim.
    trak_opts = next((r["setting"] for r in rows if r["method"] == "trak"), {"proj_dim": 2048})
    member_models = [model] + [
        train_digits_mlp_trajectory(train, seed=s, epochs=recipe.epochs, hidden=recipe.hidden)[0]
        for s in range(1, args.members)
    ]
    states = [m.state_dict() for m in member_models]
    ens_values, fit_s, attr_s = run_method("trak", model, [], states, train, queries, trak_opts)
    ens = score(ens_values, test)
    lo, hi = ens.bootstrap_ci()
    rows.append(
        {
            "method": f"trak x{args.members}",
            "setting": trak_opts,
            "val_lds": score(ens_values, val).mean,
            "test_lds": ens.mean,
            "ci": [lo, hi],
            "fit_s": fit_s,
            "attribute_s": attr_s,
        }
    )
    comparison = beats(ens.per_query, per_query["trak"]) if "trak" in per_query else None

    print()
    print("| method | setting (chosen on val) | test LDS | 95% CI | fit s | attribute s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | `{json.dumps(r['setting'])}` | {r['test_lds']:.3f} | "
            f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['fit_s']:.2f} | {r['attribute_s']:.2f} |"
        )
    print(f"| random scores | - | {rand.mean:.3f} | - | - | - |")
    print(f"| noise ceiling | - | {ceiling.mean:.3f} | - | - | - |")
    if comparison is not None:
        ok, (clo, chi) = comparison
        print(
            f"\nTRAK x{args.members} vs TRAK x1: LDS difference 95% paired-bootstrap interval "
            f"[{clo:.3f}, {chi:.3f}] -> {'beats' if ok else 'does not beat'}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "recipe": recipe.__dict__,
            "noise_ceiling": ceiling.mean,
            "random": rand.mean,
            "rows": rows,
        }
        if comparison is not None:
            out["trak_ensemble_vs_single"] = {
                "beats": comparison[0],
                "interval": list(comparison[1]),
            }
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
