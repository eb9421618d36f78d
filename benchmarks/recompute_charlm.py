"""EK-FAC influence on ``pydoc-charlm`` with stored vs recomputed training factors (ours only).

    .venv/bin/python benchmarks/recompute_charlm.py --threads 1 --json out/recompute_charlm.json

The model, data, task and attributor of ``benchmarks/kronfluence_charlm.py`` (the setting's
seed-0 model, cached in ``benchmarks/.cache/``; 4,000 training chunks of 64 characters, the
300 test queries; the 13 ``nn.Linear`` layers; ``if-ekfac`` with the true Fisher, one
sampled label, batch size 64, damping ``--damping``, default the 1e-4 chosen there on the
validation queries), without kronfluence and without ground truth: for
``train_features="factored"`` (every chunk's layer factors kept by ``fit``) and
``"recompute"`` (none kept; ``attribute`` recomputes them), the median fit / attribute
seconds of ``--repeats`` warm runs in memory at ``--threads``, the bytes of train features
held in memory, then one more fit + attribute of each into a fresh store (seconds and bytes
on disk), and the largest score difference between the two (they must agree to rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kronfluence_charlm import parse_damping, trained_model
from benchmarks.peer_runner import timed
from datatrace import make_attributor
from datatrace.bench.settings import get_setting

MODES = ("factored", "recompute")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument("--batch-size", type=int, default=64, help="chunks per batch")
    ap.add_argument("--damping", type=parse_damping, default=1e-4, help="number or 'heuristic'")
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    setting = get_setting("pydoc-charlm")
    model = trained_model(setting)
    train, queries = setting.data.train, setting.data.test_queries
    task = setting.make_task(model, module_types=(nn.Linear,))

    def attributor(mode: str, store: Path | None = None) -> Any:
        return make_attributor(
            "if-ekfac",
            task,
            damping=args.damping,
            fisher="true",
            fisher_samples=1,
            batch_size=args.batch_size,
            train_features=mode,
            store=store,
        )

    rows: dict[str, dict[str, Any]] = {}
    scores: dict[str, torch.Tensor] = {}
    for mode in MODES:
        load = list(os.getloadavg())
        kept: list[int] = []

        def fit(mode: str = mode, kept: list[int] = kept) -> Any:
            attr = attributor(mode).fit(train)
            kept[:] = [sum(f.nbytes for ctx in attr._contexts for f in ctx.features)]
            return attr

        run = timed(fit, lambda attr: attr.attribute(queries).values, args.repeats, args.warmup)
        scores[mode] = run.pop("scores")
        with tempfile.TemporaryDirectory(prefix="datatrace-recompute-") as tmp:
            t0 = time.perf_counter()
            attr = attributor(mode, Path(tmp) / "store").fit(train)
            t1 = time.perf_counter()
            attr.attribute(queries)
            t2 = time.perf_counter()
            store_bytes = _dir_bytes(Path(tmp) / "store")
        rows[mode] = {
            **{k: float(v) for k, v in run.items()},
            "load_avg_at_start": load,
            "memory_feature_bytes": kept[0],
            "store_bytes": store_bytes,
            "store_fit_s": t1 - t0,
            "store_attribute_s": t2 - t1,
        }
        print(f"[{mode}] {rows[mode]}", flush=True)
    a, b = scores["factored"], scores["recompute"]
    result = {
        "setting": setting.to_json(),
        "recipe_hash": setting.recipe_hash(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "damping": str(args.damping),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "n_train": setting.n_train,
        "n_query": int(a.shape[0]),
        "max_abs_score_diff": float((a - b).abs().max()),
        "max_abs_score": float(a.abs().max()),
        "modes": rows,
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "torch": torch.__version__,
    }
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


def print_table(r: dict[str, Any]) -> None:
    """The markdown table of docs/benchmarks.md."""
    print(
        f"\npydoc-charlm if-ekfac, {r['n_train']} train chunks x {r['n_query']} test queries, "
        f"{r['threads']} thread(s), damping {r['damping']}; largest score difference "
        f"{r['max_abs_score_diff']:.2e} (largest score {r['max_abs_score']:.2e})\n"
    )
    print(
        "| train_features | load avg (1/5/15 min) | fit + attribute = total s (in memory, "
        "median) | train features in memory | fit + attribute s (store) | store bytes |"
    )
    print("|---|---|---|---|---|---|")
    for mode, m in r["modes"].items():
        print(
            f"| {mode} | {' / '.join(f'{x:.2f}' for x in m['load_avg_at_start'])} | "
            f"{m['fit_s']:.1f} + {m['attribute_s']:.1f} = {m['total_s']:.1f} | "
            f"{m['memory_feature_bytes'] / 1e6:.1f} MB | "
            f"{m['store_fit_s']:.1f} + {m['store_attribute_s']:.1f} | "
            f"{m['store_bytes'] / 1e6:.1f} MB |"
        )


if __name__ == "__main__":
    main()
