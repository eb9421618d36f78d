"""Per-sample gradients + projection vs one plain batched forward/backward (speed goal 1).

    python benchmarks/speed_grads.py                 # both MLPs, batch sizes 100 and 1000
    python benchmarks/speed_grads.py --quick         # one repeat, fewer settings

For 1,000 digits inputs and an MLP (64-128-64-10 and 64-512-512-10) it times, per batch
size, one plain ``cross_entropy(model(x), y).backward()`` per batch (the baseline) and the
hook engine's per-sample gradients (``compute_per_sample_grads``) followed by each
projector's ``project(psg)``. The goal is a ratio of at most 3. Times are medians of warm
repeated runs (DESIGN.md §9); the projection matrices are built in the warm-up run (they are
cached by the projector up to its ``cache_bytes``, as in ``fit``).

Cost model, to read the ratios: a plain forward/backward costs about ``6 n_params`` flops
per example; a dense (Gaussian/Rademacher) projection of the full gradient costs
``2 n_params k`` more, so its ratio is bounded below by about ``k / 3`` whatever the code
does. SJLT touches every gradient coordinate ``nnz`` times (memory-bound); the factored
(LoGra) projector never forms the gradient and costs ``O(B (I k_in + O k_out))`` per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median_time
from datatrace import Task
from datatrace.bench.digits import digits_mlp, load_digits_split
from datatrace.gradients import compute_per_sample_grads
from datatrace.projection import make_projector

N = 1000
GOAL = 3.0


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)]


def _projectors(n_params: int, quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, kind, settings) of the projectors compared.

    Dense projections of the wide MLP use k=128 only: at k=1024 one run is ~0.6 TFLOP and the
    1.2 GB matrix exceeds the default 256 MiB chunk cache (it is regenerated every batch).
    """
    dims = [1024] if quick else [128, 1024]
    out: list[tuple[str, str, dict[str, Any]]] = []
    for k in dims:
        out.append((f"sjlt k={k}", "sjlt", {"proj_dim": k}))
    for k in dims if n_params < 100_000 else [128]:
        out.append((f"gaussian k={k}", "gaussian", {"proj_dim": k}))
        out.append((f"rademacher k={k}", "rademacher", {"proj_dim": k}))
    out.append(("factored 16x16/layer", "factored", {"proj_dim": 256}))
    out.append(("factored 32x32/layer", "factored", {"proj_dim": 1024}))
    return out


def run(hidden: tuple[int, ...], batch_sizes: list[int], repeats: int, quick: bool) -> list[dict]:
    (x, y), _ = load_digits_split()
    x, y = x[:N], y[:N]
    model = digits_mlp(hidden, seed=0).eval()
    task = Task(model)
    n_params = sum(p.numel() for p in model.parameters())
    arch = "-".join(str(w) for w in (64, *hidden, 10))
    rows: list[dict] = []
    for bs in batch_sizes:
        batches = _batches(x, y, bs)

        def plain(batches: list = batches) -> None:
            for xb, yb in batches:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()

        def psg_only(batches: list = batches) -> None:
            for b in batches:
                compute_per_sample_grads(task, b)

        base, _ = median_time(plain, repeats=repeats)
        t_psg, _ = median_time(psg_only, repeats=repeats)
        rows.append(_row(arch, n_params, bs, "per-sample factors only", t_psg, base))
        print(_fmt(rows[-1]), flush=True)
        for label, kind, kw in _projectors(n_params, quick):
            proj = make_projector(kind, kw["proj_dim"], seed=0)

            def full(batches: list = batches, proj: Any = proj) -> None:
                for b in batches:
                    proj.project(compute_per_sample_grads(task, b))

            t, _ = median_time(full, repeats=repeats)
            rows.append(_row(arch, n_params, bs, label, t, base))
            print(_fmt(rows[-1]), flush=True)
    return rows


def _row(arch: str, n_params: int, bs: int, what: str, t: float, base: float) -> dict:
    return {
        "model": arch,
        "n_params": n_params,
        "batch_size": bs,
        "what": what,
        "seconds": t,
        "plain_seconds": base,
        "ratio": t / base,
        "goal_holds": t / base <= GOAL,
    }


def _fmt(r: dict) -> str:
    return (
        f"| {r['model']} | {r['batch_size']} | {r['what']} | {r['plain_seconds'] * 1e3:.1f} | "
        f"{r['seconds'] * 1e3:.1f} | {r['ratio']:.1f}x | {'yes' if r['goal_holds'] else 'no'} |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, k=1024 only")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--models", default="small,wide", help="small (64-128-64-10), wide (64-512-512-10)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {N} examples")
    print("| model | batch | per-sample path | plain fwd+bwd ms | ms | ratio | <= 3x |")
    print("|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    models = {"small": (128, 64), "wide": (512, 512)}
    for name in args.models.split(","):
        hidden, sizes = models[name], [100, 1000]
        rows += run(hidden, sizes, repeats, args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
