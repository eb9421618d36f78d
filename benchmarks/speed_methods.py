"""Fit + attribute time of Grad-Cos and TRAK on the digits MLP (speed goal 2).

    python benchmarks/speed_methods.py
    python benchmarks/speed_methods.py --threads 1 --repeats 5

1,000 training and 200 query digits, the 64-128-64-10 MLP trained by ``train_digits_mlp``
(17,226 parameters), one member, in-memory features. Each row times a fresh attributor's
``fit(train)`` and then ``attribute(queries)`` (the projector, and so its matrix, is built in
``fit``, as a user would run it); times are medians of warm repeated runs (DESIGN.md §9). The
goal is well under one second for fit + attribute on 2 CPU cores.

Cost model: the dense projections (TRAK's default Rademacher matrix) cost
``2 x 1,200 x 17,226 x proj_dim`` flops, 85 GFLOP at proj_dim 2048, plus generating the
``17,226 x proj_dim`` matrix once per fit; SJLT and the factored projector are memory-bound
and far cheaper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datatrace import Task, make_attributor
from datatrace.bench.digits import load_digits_split, train_digits_mlp

N_TRAIN, N_QUERY = 1000, 200

# (label, method id, settings); TRAK's defaults are projector="rademacher", proj_dim=2048.
# With proj_dim near or above n_train (or the factored projector, whose output-layer block has
# rank <= 10 x k_in) the kernel is singular and the default relative_damping=1e-6 can fail in
# float32: those rows are also run with relative_damping=1e-3 (same cost).
R3 = {"relative_damping": 1e-3}
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("grad-cos (default: no projection)", "grad-cos", {}),
    ("grad-cos, sjlt 1024", "grad-cos", {"projector": "sjlt", "proj_dim": 1024}),
    ("trak (default: rademacher 2048)", "trak", {}),
    ("trak, rademacher 2048, rel. damping 1e-3", "trak", R3),
    ("trak, rademacher 1024, rel. damping 1e-3", "trak", {"proj_dim": 1024, **R3}),
    ("trak, rademacher 512", "trak", {"proj_dim": 512}),
    ("trak, rademacher 256", "trak", {"proj_dim": 256}),
    ("trak, gaussian 512", "trak", {"projector": "gaussian", "proj_dim": 512}),
    ("trak, sjlt 2048, rel. damping 1e-3", "trak", {"projector": "sjlt", **R3}),
    ("trak, sjlt 512", "trak", {"projector": "sjlt", "proj_dim": 512}),
    (
        "trak, factored 16x16/layer (768), rel. 1e-3",
        "trak",
        {"projector": "factored", "proj_dim": 256, **R3},
    ),
    (
        "trak, factored 32x32/layer (3072), rel. 1e-3",
        "trak",
        {"projector": "factored", "proj_dim": 1024, **R3},
    ),
]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(
    method: str, kw: dict[str, Any], model: torch.nn.Module, train: Any, queries: Any, repeats: int
) -> dict[str, Any]:
    """Median fit, attribute and total seconds over ``repeats`` warm runs (after one warm-up)."""
    fits, attrs, totals = [], [], []
    for i in range(repeats + 1):
        task = Task(model, target="margin")
        attributor = make_attributor(method, task, **kw)
        t_fit, _ = _timed(lambda attributor=attributor: attributor.fit(train))
        t_attr, scores = _timed(lambda attributor=attributor: attributor.attribute(queries))
        assert scores.values.shape == (N_QUERY, N_TRAIN)
        if i > 0:  # the first run warms up
            fits.append(t_fit)
            attrs.append(t_attr)
            totals.append(t_fit + t_attr)
    return {
        "fit": statistics.median(fits),
        "attribute": statistics.median(attrs),
        "total": statistics.median(totals),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (x, y), (xq, yq) = load_digits_split()
    train, queries = (x[:N_TRAIN], y[:N_TRAIN]), (xq[:N_QUERY], yq[:N_QUERY])
    model = train_digits_mlp(train, seed=0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {N_TRAIN} train x "
        f"{N_QUERY} queries, MLP 64-128-64-10 ({sum(p.numel() for p in model.parameters())} params)"
    )
    print("| method (settings) | fit s | attribute s | total s | < 1 s |")
    print("|---|---|---|---|---|")
    rows = []
    for label, method, kw in SETTINGS:
        try:
            t = measure(method, kw, model, train, queries, args.repeats)
        except Exception as exc:  # report, e.g. a kernel that is not positive definite
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            print(f"| {label} | fails | | | {msg} |", flush=True)
            rows.append({"setting": label, "method": method, "kw": kw, "error": msg})
            continue
        ok = "yes" if t["total"] < 1.0 else "no"
        print(
            f"| {label} | {t['fit']:.3f} | {t['attribute']:.3f} | {t['total']:.3f} | {ok} |",
            flush=True,
        )
        rows.append({"setting": label, "method": method, "kw": kw, **t})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
