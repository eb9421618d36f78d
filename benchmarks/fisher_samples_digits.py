"""EK-FAC influence with k sampled labels per example (``fisher_samples``) on the digits MLP.

    python benchmarks/fisher_samples_digits.py --json out/fisher_samples_digits.json

Same model, queries, ground truth and protocol as ``benchmarks/ekfac_digits.py``: for each k,
the damping is chosen on the 60 validation queries and the test LDS (200 queries) reported
with a 95% bootstrap interval. ``fisher="true"`` with one sample was the noisiest Fisher kind
there; averaging k samples should approach ``fisher="exact"`` (the expectation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import digits_bench
from benchmarks.ekfac_digits import DAMPINGS, run
from datatrace.metrics import lds

SETTINGS = [("true", 1), ("true", 4), ("true", 16), ("exact", 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    bench = digits_bench()
    recipe, gt, train, queries = bench.recipe, bench.gt, bench.train, bench.queries
    val, test, model = bench.val, bench.test, bench.model
    rows = []
    for fisher, k in SETTINGS:
        best = None
        for d in DAMPINGS:
            opts = {"damping": d, "fisher": fisher, "fisher_samples": k}
            values, fit_s, _ = run("if-ekfac", model, train, queries, opts)
            v = lds(values[val], gt.subsets, gt.targets[:, val]).mean
            print(f"  {json.dumps(opts):70s} val LDS {v:.3f}  fit {fit_s:.2f}s", flush=True)
            if best is None or v > best[0]:
                best = (v, opts, values, fit_s)
        assert best is not None
        result = lds(best[2][test], gt.subsets, gt.targets[:, test])
        ci = result.bootstrap_ci()
        rows.append(
            {
                "setting": best[1],
                "val_lds": best[0],
                "test_lds": result.mean,
                "ci": list(ci),
                "fit_s": best[3],
            }
        )
    print("\n| fisher | samples | damping (val) | test LDS | 95% CI | fit s (single run) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["setting"]
        print(
            f"| {s['fisher']} | {s['fisher_samples']} | {s['damping']} | {r['test_lds']:.3f} "
            f"| [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['fit_s']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"recipe": recipe.__dict__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
