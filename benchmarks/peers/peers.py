"""datatrace next to the peer libraries (traker, dattri, kronfluence) on one digits MLP and ground truth.

    .venv/bin/python benchmarks/peers/peers.py --json out/peers.json

The model is the registered ``digits-mlp`` setting without dropout and with 200 test queries
(``LEGACY``: the 64-128-64-10 ReLU MLP of every table in docs/peers.md; its ``Dropout(0.0)``
layers are the identity), members ``setting.train(seed=k)`` for k < ``--members``. Its LDS
ground truth is the legacy one (:func:`legacy_ground_truth`: 100 half-subsets x 2
retrainings with training seeds 1000 + j * 2 + s), which the bench's ``lds_ground_truth``
(seeds from 0) does not reproduce; it is cached beside the bench's stores.

Each peer lives in its own throw-away virtualenv (``--venv-root``, default ``/tmp``), made on
first use by ``common.setup_peer`` (``--setup-only`` only builds them); ``peer_runner.py``
runs there on saved states and data (torch + the peer only). For every algorithm both sides
implement (TRAK with 1 and 5 members at the same ``proj_dim``, TRAK on the last layer without
projection, Grad-Dot, Grad-Cos, IF with CG on the damped exact Hessian; with kronfluence,
K-FAC and EK-FAC influence on the true Fisher) it reports the Spearman correlation of our
scores with the peer's (per query, and flat), for TRAK also ours against ours with another
projection seed, the LDS of both on the test queries with the paired-bootstrap interval of
ours - peer (DESIGN.md §9), and median warm fit + attribute times. Nothing is tuned (settings
are matched to the peer or the libraries' defaults), so only the test queries are attributed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers.common import PEERS, compare, describe, load_line, run_peer, setup_peer
from benchmarks.peers.runner import SLOW, timed
from datatrace import Task, make_attributor
from datatrace.bench.cache import default_cache_dir
from datatrace.bench.groundtruth import SubsetGroundTruth, noise_ceiling, subset_ground_truth
from datatrace.bench.settings import Setting, get_setting
from datatrace.metrics import lds, spearman_batched
from datatrace.task import margin

LEGACY = {"dropout": 0.0, "n_test": 200}  # digits-mlp overrides: the legacy recipe's model
M, SEEDS, SEED_OFFSET = 100, 2, 1000  # the legacy LDS protocol
# Which of our method keys each peer implements.
PEER_METHODS = {
    "traker": ["trak-1", "trak-5", "trak-last-exact"],
    "dattri": ["trak-1", "trak-5", "trak-last-exact", "grad-dot", "grad-cos", "if-cg"],
    "kronfluence": ["if-ekfac", "if-kfac"],
}
ALL_METHODS = [*PEER_METHODS["dattri"], "if-ekfac", "if-kfac"]
EXPLAIN = {  # the full notes per row: docs/peers.md
    "trak-1": "same estimator; each library draws its own projection, so agreement is bounded "
    "by the seed-to-seed agreement of ours ('ours vs ours' column)",
    "trak-5": "as trak-1, averaged over 5 members (which also averages projection noise)",
    "trak-last-exact": "no projection (last layer): deterministic; the same damping, rescaled "
    "by each peer's 1/sqrt(n_params) normalisation; traker's float32 inv costs ~1%",
    "grad-dot": "dattri TracIn, one checkpoint, projection off; equal to float32 rounding",
    "grad-cos": "as grad-dot with normalised gradients",
    "if-cg": "dattri IFAttributorCG: the same damped Hessian and CG steps, no 1/n: peer = n x ours",
    "if-ekfac": "kronfluence EK-FAC, true Fisher (own label draws), heuristic damping, no 1/n",
    "if-kfac": "as if-ekfac with strategy 'kfac'",
}


def legacy_ground_truth(setting: Setting) -> SubsetGroundTruth:
    """LDS ground truth of the legacy recipe (margins of the val + test queries), cached."""
    path = (
        default_cache_dir() / f"{setting.name}-{setting.recipe_hash()}-lds-m{M}-s{SEEDS}-legacy.pt"
    )
    if path.exists():
        return SubsetGroundTruth(**torch.load(path, weights_only=True))
    x, y = setting.data.queries("all")

    def measure(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():  # all queries in one batch, as the legacy recipe measured them
            return margin(model(x), y)

    gt = subset_ground_truth(
        lambda indices, seed: setting.train(indices, seed=SEED_OFFSET + seed),
        measure, setting.n_train, M, 0.5, SEEDS, 0,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vars(gt), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return gt


def last_layer_damping(model: Any, x: torch.Tensor, y: torch.Tensor, rel: float) -> float:
    """``rel`` x the mean diagonal of the exact last-layer TRAK kernel ``G^T G``.

    A last-layer margin gradient is ``delta h^T`` (weight) and ``delta`` (bias), so its squared
    norm is ``|delta|^2 (|h|^2 + 1)``; summing over examples gives the kernel's trace.
    """
    with torch.no_grad():
        h = model[:-1](x)
    z = model[-1](h).detach().requires_grad_(True)
    (delta,) = torch.autograd.grad(margin(z, y).sum(), z)
    trace = float(((delta**2).sum(1) * ((h**2).sum(1) + 1)).sum())
    return rel * trace / sum(p.numel() for p in model[-1].parameters())


def ours_methods(
    model: Any, sds: list[dict[str, torch.Tensor]], args: Any, lam_last: float, last: list[str]
) -> dict[str, Any]:
    full = Task(model, target="margin")
    common = {"batch_size": args.batch_size, "members": sds[:1]}
    trak = {
        "projector": args.trak_projector,
        "proj_dim": args.trak_proj_dim or args.proj_dim,
        "relative_damping": args.trak_relative_damping,  # 1e-4: near the peers' plain inverse
        "batch_size": args.batch_size,
    }
    # K-FAC / EK-FAC with kronfluence's defaults: true Fisher (sampled labels) and, unless
    # --kfac-damping is a number, 0.1 x each layer's mean eigenvalue.
    kfac = {"damping": args.kfac_damping, "fisher": args.kfac_fisher}
    kfac["fisher_samples"] = args.kfac_fisher_samples
    # our side of the if-cg row: "cg" runs dattri's algorithm (same Hessian, damping and CG
    # steps); "ekfac"/"kfac" our closed-form influence instead (compare LDS and time)
    if args.if_cg_ours == "cg":
        if_cg = ("if-cg", full, {"curvature": "hessian", "damping": args.damping, **common})
        if_cg[2]["solver_options"] = {"max_iter": args.cg_iter}
    else:
        if_cg = (
            f"if-{args.if_cg_ours}",
            full,
            {"damping": "heuristic", "fisher": "true", **common},
        )
    return {
        "trak-1": ("trak", full, {**trak, "members": sds[:1]}),
        "trak-5": ("trak", full, {**trak, "members": sds[:5]}),
        "trak-last-exact": (
            "trak",
            Task(model, target="margin", params=last),
            {"projector": "none", "damping": lam_last, **common},
        ),
        "grad-dot": ("grad-dot", full, common),
        "if-ekfac": ("if-ekfac", full, {**kfac, **common}),
        "if-kfac": ("if-kfac", full, {**kfac, **common}),
        "grad-cos": ("grad-cos", full, common),
        "if-cg": if_cg,
    }


def run_ours(
    method_id: str, task: Task, opts: dict[str, Any], train: Any, queries: Any, reps: int, warm: int
) -> dict[str, Any]:
    caught: list[str] = []

    def attribute(attr: Any) -> torch.Tensor:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            values = attr.attribute(queries).values
        # Only our own numerical warnings (e.g. CG not converged), not torch deprecations.
        caught[:] = sorted({str(x.message) for x in w if issubclass(x.category, RuntimeWarning)})
        return values

    res = timed(lambda: make_attributor(method_id, task, **opts).fit(train), attribute, reps, warm)
    return {**res, "warnings": caught}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="datatrace vs traker / dattri / kronfluence on the digits MLP"
    )
    add = ap.add_argument
    add("--peers", default="traker,dattri,kronfluence", help="comma-separated: " + ",".join(PEERS))
    add("--methods", default=",".join(ALL_METHODS), help="comma-separated keys")
    add("--trak-projector", default="gaussian", help="our TRAK rows' projector (gaussian = the "
        "peers' own; another sketch, e.g. factored: compare LDS and time, not scores)")  # fmt: skip
    add("--trak-relative-damping", type=float, default=1e-4, help="our TRAK rows' "
        "relative_damping (1e-4: near the peers' plain inverse; the library default is 1.0)")  # fmt: skip
    add(
        "--trak-proj-dim",
        type=int,
        default=None,
        help="our TRAK rows' proj_dim (default --proj-dim)",
    )
    add("--repeats", type=int, default=3, help="timed runs (median) per method")
    add("--warmup", type=int, default=1, help="untimed runs before them")
    add("--slow-repeats", type=int, default=1, help="timed runs of IF-CG (no warm-up run)")
    add("--proj-dim", type=int, default=512, help="TRAK projection dimension")
    add(
        "--damping",
        type=float,
        default=0.1,
        help="IF-CG damping; must exceed -lambda_min(H) ~ 0.045",
    )
    add("--cg-iter", type=int, default=30, help="CG iterations (both libraries)")
    add("--if-cg-ours", default="cg", choices=["cg", "ekfac", "kfac"], help="our side of the "
        "if-cg row: cg (dattri's algorithm) or our K-FAC/EK-FAC influence (another estimator)")  # fmt: skip
    add("--kfac-damping", type=lambda t: t if t == "heuristic" else float(t), default="heuristic",
        help="K-FAC/EK-FAC damping: a number, or 'heuristic' (0.1 x mean eigenvalue per layer)")  # fmt: skip
    add("--kfac-fisher", default="true", choices=["true", "empirical", "exact"], help="our "
        "K-FAC/EK-FAC Fisher (kronfluence: 'true', one sampled label per example)")  # fmt: skip
    add("--kfac-fisher-samples", type=int, default=1, help="sampled labels per example (ours)")
    add("--batch-size", type=int, default=256, help="featurization batch size")
    add("--if-query-batch", type=int, default=25, help="queries per CG batch in dattri's IF")
    add("--members", type=int, default=5)
    add("--threads", type=int, default=2)
    add("--venv-root", type=Path, default=Path(tempfile.gettempdir()))
    add("--setup-only", action="store_true", help="only build the peer venvs")
    add("--peer-timeout", type=float, default=900.0, help="seconds per peer run")
    add("--json", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    args.methods = [m for m in args.methods.split(",") if m]
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from {sorted(PEERS)}")
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {ALL_METHODS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = args.methods
    t_start, load_before = time.perf_counter(), os.getloadavg()
    pythons: dict[str, Path] = {}
    problems: dict[str, Any] = {}
    for p in args.peers:
        try:
            pythons[p] = setup_peer(p, args.venv_root)
        except (OSError, Exception) as exc:  # CalledProcessError included
            problems[p] = f"setup failed: {exc}"
            print(f"{p}: {problems[p]}", flush=True)
    if args.setup_only:
        return

    torch.set_num_threads(args.threads)
    setting = get_setting("digits-mlp", **LEGACY)
    gt = legacy_ground_truth(setting)
    train, q_test = setting.data.train, setting.data.test_queries
    targets = gt.targets[:, setting.n_val :]
    ceiling = noise_ceiling(gt.per_seed[:, :, setting.n_val :])
    g = torch.Generator().manual_seed(0)
    random_scores = torch.randn(setting.n_test, setting.n_train, generator=g, dtype=torch.float64)
    random_lds = lds(random_scores, gt.subsets, targets)
    models = [setting.train(seed=k) for k in range(args.members)]
    sds = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    model0: Any = models[0]
    lam_last = last_layer_damping(model0, train[0], train[1], rel=1e-3)
    last = [f"{len(model0) - 1}.{p}" for p, _ in model0[-1].named_parameters()]

    spec = {
        "proj_dim": args.proj_dim,
        "damping": args.damping,
        "cg_iter": args.cg_iter,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "slow_repeats": args.slow_repeats,
        "slow_warmup": 0,
        "threads": args.threads,
        "last_layer": last,
        "last_layer_damping": lam_last,
        "seed": 0,
        "if_query_batch": args.if_query_batch,
        "if_cg_ours": args.if_cg_ours,
        "dampings": [None if args.kfac_damping == "heuristic" else args.kfac_damping],
    }

    # ---- ours
    ours: dict[str, dict[str, Any]] = {}
    table = ours_methods(model0, sds, args, lam_last, last)
    for key in methods:
        slow = key in SLOW
        t0 = time.perf_counter()
        reps, warm = (args.slow_repeats, 0) if slow else (args.repeats, args.warmup)
        method_id, task, opts = table[key]
        ours[key] = run_ours(method_id, task, opts, train, q_test, reps, warm)
        print(f"[datatrace] {key}: {time.perf_counter() - t0:.1f}s", flush=True)
    # Projection-noise reference: the same TRAK with another projection seed.
    other_seed: dict[str, torch.Tensor] = {}
    for key in ("trak-1", "trak-5"):
        if key in methods:
            method_id, task, opts = table[key]
            attr = make_attributor(method_id, task, **{**opts, "seed": 1}).fit(train)
            other_seed[key] = attr.attribute(q_test).values

    # ---- peers
    peer_out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="datatrace-peers-") as tmp:
        inputs = Path(tmp) / "inputs.pt"
        data = {"model": "sequential", "layers": describe(model0), "dtype": "float32"}
        data.update(x_train=train[0], y_train=train[1], x_query=q_test[0], y_query=q_test[1])
        torch.save({**data, "members": sds}, inputs)
        for p, py in pythons.items():
            todo = [m for m in methods if m in PEER_METHODS[p]]
            t0 = time.perf_counter()
            out_file = Path(tmp) / f"{p}.pt"
            peer_out[p] = run_peer(
                p, py, inputs, out_file, {**spec, "methods": todo}, args.peer_timeout
            )
            print(f"[{p}] total {time.perf_counter() - t0:.1f}s", flush=True)

    # ---- compare
    rows: list[dict[str, Any]] = []
    for p, out in peer_out.items():
        if "failed" in out:
            problems[p] = out["failed"]
            continue
        if "crashed" in out:
            problems[p] = out["crashed"]
        for key, err in out["errors"].items():
            problems[f"{p}/{key}"] = err
        for key in methods:
            if key not in out["results"] or key not in ours:
                continue
            mine, theirs = ours[key], out["results"][key][0]
            row = {"method": key, "peer": f"{p} {out['version']}"}
            row.update(compare(mine["scores"], theirs["scores"], gt.subsets, targets))
            if key in other_seed:
                rho = spearman_batched(mine["scores"].double(), other_seed[key].double(), dim=1)
                row["spearman_ours_other_seed"] = float(rho.mean())
                row["lds_ours_other_seed"] = lds(other_seed[key], gt.subsets, targets).mean
            row.update(time_ours_s=mine["total_s"], time_peer_s=theirs["total_s"])
            row.update(fit_ours_s=mine["fit_s"], attribute_ours_s=mine["attribute_s"])
            row.update(fit_peer_s=theirs["fit_s"], attribute_peer_s=theirs["attribute_s"])
            row.update(timed_runs=theirs["runs"], ours_warnings=mine["warnings"])
            rows.append(row)

    print(
        f"\ndigits MLP 64-128-64-10, {setting.n_train} train, {setting.n_test} test queries, "
        f"LDS over {M} subsets (alpha=0.5); noise ceiling {ceiling.mean:.3f}, "
        f"random scores {random_lds.mean:+.3f}; CPU, {args.threads} threads\n"
    )
    print(
        "| method | peer | Spearman ours vs peer (per query / flat) | ours vs ours, other "
        "proj. seed | rel. L2 diff | LDS ours | LDS peer | ours - peer LDS, 95% CI | "
        "time ours (s) | time peer (s) | peer / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = r.get("spearman_ours_other_seed")
        lo, hi = r["lds_diff_ci"]
        print(
            f"| {r['method']} | {r['peer']} | {r['spearman_per_query']:.3f} / "
            f"{r['spearman_flat']:.3f} | {'-' if ref is None else f'{ref:.3f}'} | "
            f"{r['rel_err_after_scale']:.1e} | {r['lds_ours']:.3f} | {r['lds_peer']:.3f} | "
            f"[{lo:+.3f}, {hi:+.3f}] {r['verdict']} | {r['time_ours_s']:.2f} | "
            f"{r['time_peer_s']:.2f} | {r['time_peer_s'] / r['time_ours_s']:.1f}x |"
        )
    # traker vs dattri where both ran (their CPU projectors share code and seeds).
    both = [o["results"] for o in peer_out.values() if "results" in o]
    peer_vs_peer: dict[str, float] = {}
    if len(both) == 2:
        ra, rb = both
        for key in (k for k in methods if k in ra and k in rb):
            a, b = ra[key][0]["scores"].double(), rb[key][0]["scores"].double()
            peer_vs_peer[key] = float(spearman_batched(a, b, dim=1).mean())

    print()
    if args.trak_projector != "gaussian" or args.trak_relative_damping != 1e-4:
        print(
            f"- NOTE: our TRAK rows use projector={args.trak_projector!r} "
            f"(proj_dim {args.trak_proj_dim or args.proj_dim}, relative_damping "
            f"{args.trak_relative_damping}), not the peers' Gaussian "
            "projection: same estimator, another random sketch; compare LDS and time."
        )
    if args.if_cg_ours != "cg":
        print(
            f"- NOTE: our if-cg row runs if-{args.if_cg_ours} (true Fisher, heuristic damping), "
            "not CG on the Hessian: another estimator; compare LDS and time."
        )
    for key in methods:
        if any(r["method"] == key for r in rows):
            print(f"- {key}: {EXPLAIN[key]}")
    for r in rows:
        extra = f"scale peer/ours {r['scale_peer_over_ours']:.4g}"
        if "lds_ours_other_seed" in r:
            extra += f"; LDS of ours with projection seed 1: {r['lds_ours_other_seed']:.3f}"
        print(f"- {r['method']} vs {r['peer']}: {extra}")
    for key, agreement in peer_vs_peer.items():
        print(f"- {key}: traker vs dattri Spearman (per query) {agreement:.3f}")
    for r in rows:
        if r["ours_warnings"]:
            print(f"- datatrace {r['method']} warned: {r['ours_warnings']}")
    for k, v in problems.items():
        print(f"- PROBLEM {k}: {v.splitlines()[0] if v else v}")
    wall, load_after = time.perf_counter() - t_start, os.getloadavg()
    print(load_line(wall, load_before, load_after))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = [".venv/bin/python", "benchmarks/peers/peers.py", *(argv or sys.argv[1:])]
        out_json = {
            "command": " ".join(command),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "setting": setting.to_json(),
            "spec": spec,
            "versions": {
                "datatrace_torch": torch.__version__,
                **{
                    p: {"version": o.get("version"), "torch": o.get("torch")}
                    for p, o in peer_out.items()
                    if "failed" not in o
                },
            },
            "noise_ceiling": ceiling.mean,
            "random": random_lds.mean,
            "rows": rows,
            "spearman_traker_vs_dattri": peer_vs_peer,
            "problems": problems,
            "explanations": {k: EXPLAIN[k] for k in methods},
            "wall_s": wall,
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
            "cpu_count": os.cpu_count(),
        }
        args.json.write_text(json.dumps(out_json, indent=2, default=str))


if __name__ == "__main__":
    main()
