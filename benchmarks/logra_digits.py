"""LoGra vs EK-FAC influence on the digits MLP: LDS and fit+attribute time per projection size.

    python benchmarks/logra_digits.py --json out/logra_digits.json

Same model, queries, cached LDS ground truth and protocol as ``benchmarks/ekfac_digits.py``
(margin target; settings chosen on the 60 validation queries, reported on the 200 test
queries with a 95% bootstrap interval; each method compared with if-ekfac by a paired
bootstrap). LoGra runs at several per-layer projection sizes ``(k_in, k_out)`` with EK-FAC
preconditioning in the projected space (damping x Fisher grid below) and with the identity
(one setting). ``(None, None)`` is the unprojected LoGra, equal to if-ekfac by construction.
Times: medians of 3 warm runs of the chosen setting (all 260 queries at once), 2 threads.
The digits MLP (64-128-64-10) is small enough for if-ekfac, so LoGra's point here is the
accuracy lost to the projection at a given feature size, not feasibility.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import digits_bench, median_time
from benchmarks.ekfac_digits import DAMPINGS, run
from datatrace.metrics import beats, lds, not_worse

FISHERS = ("empirical", "exact")  # if-ekfac's best points on this model (ekfac_digits.py)
SIZES: list[tuple[int | None, int | None]] = [(8, 8), (16, 16), (32, 16), (None, None)]


def grid() -> list[tuple[str, str, dict[str, Any]]]:
    """``(row label, method id, settings)`` of every grid point."""
    out = [("if-ekfac", "if-ekfac", {"damping": d, "fisher": f}) for f in FISHERS for d in DAMPINGS]
    for k_in, k_out in SIZES:
        dims = {"proj_dim_in": k_in, "proj_dim_out": k_out}
        label = f"logra-ekfac k=({k_in},{k_out})"
        out += [
            (label, "logra", {**dims, "damping": d, "fisher": f}) for f in FISHERS for d in DAMPINGS
        ]
        if k_in is not None:
            ident = {**dims, "preconditioner": "identity"}
            out.append((f"logra-identity k=({k_in},{k_out})", "logra", ident))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    bench = digits_bench()
    recipe, gt, train, queries = bench.recipe, bench.gt, bench.train, bench.queries
    val, test, model = bench.val, bench.test, bench.model
    print(f"ground truth: {recipe}; noise ceiling {gt.noise_ceiling().mean:.3f}")

    best: dict[str, tuple[float, str, dict[str, Any], torch.Tensor]] = {}
    for label, method_id, opts in grid():
        values, fit_s, attr_s = run(method_id, model, train, queries, opts)
        v = lds(values[val], gt.subsets, gt.targets[:, val]).mean
        print(
            f"  {label:28s} {json.dumps(opts):70s} val LDS {v:.3f}  "
            f"fit {fit_s:.2f}s attribute {attr_s:.2f}s",
            flush=True,
        )
        if label not in best or v > best[label][0]:
            best[label] = (v, method_id, opts, values)

    rows: dict[str, dict[str, Any]] = {}
    per_query: dict[str, torch.Tensor] = {}
    for label, (v, method_id, opts, values) in best.items():
        total, _ = median_time(lambda m=method_id, o=opts: run(m, model, train, queries, o), 3, 1)
        result = lds(values[test], gt.subsets, gt.targets[:, test])
        per_query[label] = result.per_query
        layers = [(128, 65), (64, 129), (10, 65)]  # (O, I') of the digits MLP's layers
        k_in, k_out = opts.get("proj_dim_in"), opts.get("proj_dim_out")
        feats = sum((k_out or o) * (k_in or i) for o, i in layers)
        rows[label] = {
            "setting": opts,
            "val_lds": v,
            "test_lds": result.mean,
            "ci": list(result.bootstrap_ci()),
            "fit_attribute_s": total,
            "features_per_example": feats,
        }

    print(
        "\n| method | setting (chosen on val) | features/example | test LDS | 95% CI | "
        "fit+attribute s |"
    )
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(
            f"| {m} | `{json.dumps(r['setting'])}` | {r['features_per_example']} | "
            f"{r['test_lds']:.3f} | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
            f"{r['fit_attribute_s']:.2f} |"
        )
    comparisons = {}
    for m in [m for m in rows if m != "if-ekfac"]:
        nw, b = (
            not_worse(per_query[m], per_query["if-ekfac"]),
            beats(per_query[m], per_query["if-ekfac"]),
        )
        comparisons[m] = {"interval": list(nw.interval), "not_worse": nw.holds, "beats": b.holds}
        print(
            f"{m} - if-ekfac: 95% paired-bootstrap interval "
            f"[{nw.interval[0]:+.3f}, {nw.interval[1]:+.3f}] -> "
            f"{'beats' if b.holds else 'not worse' if nw.holds else 'worse'}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"recipe": recipe.__dict__, "rows": rows, "vs_ekfac": comparisons}
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
