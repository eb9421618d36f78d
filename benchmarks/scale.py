"""Scale goal: featurize 50,000 examples of a 1M-parameter MLP through the store, then attribute.

    python benchmarks/scale.py                           # every config, 50,000 train examples
    python benchmarks/scale.py --configs trak-sjlt --n-train 8192

Synthetic job: inputs ``x ~ N(0, I_512)``, labels ``argmax(x W)`` of a random linear teacher,
an MLP 512-1024-512-10 (1,055,242 parameters) trained for one epoch on them. Each config
runs in its own subprocess (peak memory is per process, DESIGN.md §9): it builds
``TRAKAttributor(..., store=<tmp dir>)``, so ``fit`` streams feature shards (about
``datatrace.store.SHARD_BYTES`` each) to disk and the kernel and scores stream over the shards; then it takes the streaming top-10 of
100 queries (``attributor.topk``) and the full ``attribute`` of the same queries. Reported:
fit seconds and train examples/s, top-k and attribute seconds, bytes stored, and the
process's peak resident memory (``ru_maxrss``, which includes torch itself and the data).
The goal is a peak under 4 GiB. One run per config (a fit of 50,000 examples is its own
warm-up for all but its first batch).

Dense projections (Gaussian/Rademacher) cost ``2 x n_params x proj_dim`` flops per example
(4.3 GFLOP at proj_dim 2048 here) and their 8.6 GB matrix cannot be cached, so it is
regenerated for every batch: the dense config runs on ``--dense-n`` examples and its 50,000
time is an extrapolation, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import run_child

D_IN, HIDDEN, N_CLASSES, N_QUERY, TOPK = 512, (1024, 512), 10, 100, 10

# config -> (TRAK settings, which n to use). relative_damping 1e-3 where the kernel is
# singular: factored features of the 10-way output layer have rank <= 9 x k_in, and a dense
# run on fewer examples than proj_dim has rank <= n.
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "trak-factored": (
        {"projector": "factored", "proj_dim": 1024, "relative_damping": 1e-3, "batch_size": 1024},
        "n",
    ),
    "trak-sjlt": ({"projector": "sjlt", "proj_dim": 4096, "batch_size": 1024}, "n"),
    "trak-rademacher": (
        {"projector": "rademacher", "proj_dim": 2048, "relative_damping": 1e-3, "batch_size": 512},
        "dense_n",
    ),
}


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    width = D_IN
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, N_CLASSES))
    return nn.Sequential(*layers)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random linear teacher."""
    teacher = torch.randn(D_IN, N_CLASSES, generator=torch.Generator().manual_seed(12345))
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher).argmax(1)


def train_model(n: int, path: Path) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, y = data(n, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for idx in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(256):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    torch.save(model.state_dict(), path)


def child(config: str, n: int, model_path: Path, store_dir: Path) -> dict[str, Any]:
    from datatrace import Task, TRAKAttributor

    settings, _ = CONFIGS[config]
    model = mlp()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    train, queries = data(n, seed=1), data(N_QUERY, seed=2)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    attributor = TRAKAttributor(Task(model, target="margin"), store=store_dir, **settings)
    t0 = time.perf_counter()
    attributor.fit(train)
    t_fit = time.perf_counter() - t0
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    top = attributor.topk(queries, TOPK)
    t_topk = time.perf_counter() - t0
    assert tuple(top.proponent_ids.shape) == (N_QUERY, TOPK)
    t0 = time.perf_counter()
    scores = attributor.attribute(queries)
    t_attr = time.perf_counter() - t0
    assert tuple(scores.values.shape) == (N_QUERY, n)
    assert attributor.store is not None
    return {
        "config": config,
        "settings": settings,
        "n_train": n,
        "n_params": sum(p.numel() for p in model.parameters()),
        "fit_s": t_fit,
        "train_per_s": n / t_fit,
        "topk_s": t_topk,
        "attribute_s": t_attr,
        "store_bytes": attributor.store.nbytes(),
        "peak_rss_mib_after_data": rss_data,
        "peak_rss_mib_after_fit": rss_fit,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--dense-n", type=int, default=1024, help="examples for dense projections")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        n = args.n_train if CONFIGS[args.child][1] == "n" else args.dense_n
        out = child(args.child, n, args.dir / "model.pt", args.dir / f"store-{args.child}")
        print("RESULT " + json.dumps(out))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="datatrace-scale-") as tmp:
        t0 = time.perf_counter()
        train_model(args.n_train, Path(tmp) / "model.pt")
        print(
            f"trained the 1,055,242-parameter MLP for one epoch in {time.perf_counter() - t0:.1f} s"
        )
        print(
            "| config | settings | n_train | fit s | train ex/s | top-10 s | attribute s | "
            "stored MiB | peak RSS MiB | < 4 GiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for config in args.configs.split(","):
            cmd = [sys.executable, __file__, "--child", config, "--dir", tmp]
            cmd += ["--n-train", str(args.n_train), "--dense-n", str(args.dense_n)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            r = run_child(cmd[1], cmd[2:])
            if "error" in r:
                print(f"| {config} | failed (exit {r['returncode']}): {' / '.join(r['error'])} |")
                rows.append({"config": config, **r})
                continue
            rows.append(r)
            kw = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            print(
                f"| {config} | {kw} | {r['n_train']} | {r['fit_s']:.1f} | "
                f"{r['train_per_s']:.0f} | {r['topk_s']:.2f} | {r['attribute_s']:.2f} | "
                f"{r['store_bytes'] / 2**20:.0f} | {r['peak_rss_mib']:.0f} | "
                f"{'yes' if r['peak_rss_mib'] < 4096 else 'no'} |",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
