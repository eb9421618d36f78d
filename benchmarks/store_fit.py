"""``fit`` with ``store=`` vs in memory, back to back in one process (issue 21).

    python benchmarks/store_fit.py                   # TRAK factored 16x16, 200,000 examples
    python benchmarks/store_fit.py --n-train 50000 --config grad-dot

The job is ``benchmarks/scale_jobs.py``'s ``million`` MLP (32-64-10, Gaussian inputs
labelled by a random linear teacher, trained one epoch) at ``--n-train`` examples; a config
of that job (default ``trak-factored``: TRAK, factored projection 16x16 per layer) at the
default batch size 64, once in memory and once writing its features through a fresh store,
alternating which goes first (``--repeats`` pairs). Reported: seconds per
variant, the ratio (goal: store at most 1.3x in memory), the number of shard files and the
bytes stored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scale_jobs import CONFIGS, mlp, mlp_data, prepare


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--config", default="trak-factored", choices=sorted(CONFIGS["million"]))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs (order alternates)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from datatrace import Task, make_attributor

    with tempfile.TemporaryDirectory(prefix="datatrace-store-fit-") as tmp:
        prepare("million", args.n_train, Path(tmp) / "model.pt")
        model = mlp()
        model.load_state_dict(torch.load(Path(tmp) / "model.pt", weights_only=True))
        model.eval()
        train = mlp_data(args.n_train, seed=1)
        method, settings = CONFIGS["million"][args.config]
        settings = {**settings, "batch_size": args.batch_size}
        task = Task(model, target="margin" if method == "trak" else "loss")
        print(
            f"{args.config}, {args.n_train:,} examples, batch {args.batch_size}, "
            f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
        )
        times: dict[str, list[float]] = {"memory": [], "store": []}
        for r in range(args.repeats):
            order = ["memory", "store"] if r % 2 == 0 else ["store", "memory"]
            for variant in order:
                store = Path(tmp) / f"store-{r}" if variant == "store" else None
                attr = make_attributor(method, task, store=store, **settings)
                t0 = time.perf_counter()
                attr.fit(train)
                times[variant].append(time.perf_counter() - t0)
                extra = ""
                if store is not None:
                    files = len(list(store.glob("shard-*.npy")))
                    size = sum(f.stat().st_size for f in store.glob("shard-*.npy"))
                    extra = f"  {files} shard files, {size / 2**20:,.0f} MiB"
                print(f"  {variant:6s} fit {times[variant][-1]:7.2f} s{extra}", flush=True)
                del attr
        mem, st = min(times["memory"]), min(times["store"])
        print(
            f"best: memory {mem:.2f} s, store {st:.2f} s, ratio {st / mem:.2f}x "
            f"(load {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
