"""datatrace next to traker and dattri on the legacy digits MLP and its LDS ground truth.

    python benchmarks/peers/peers.py --json out/peers.json

TRAK, Grad-Dot, Grad-Cos and IF-CG, each peer in its own venv through ``peer_runner.py``: what
is compared, the flags and every published command are in docs/peers.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import common
from benchmarks.peers.peer_runner import SLOW, timed
from datatrace import Task, make_attributor
from datatrace._io import atomic_write
from datatrace.bench.cache import default_cache_dir
from datatrace.bench.groundtruth import SubsetGroundTruth, noise_ceiling, subset_ground_truth
from datatrace.bench.settings import Setting, get_setting
from datatrace.metrics import lds, spearman_batched
from datatrace.task import margin

LEGACY = {"dropout": 0.0, "n_test": 200}  # digits-mlp overrides: the legacy recipe's model
M, SEEDS, SEED_OFFSET = 100, 2, 1000  # the legacy LDS protocol
METHODS = ["trak-1", "trak-5", "trak-last-exact", "grad-dot", "grad-cos", "if-cg"]
PEER_METHODS = {"traker": METHODS[:3], "dattri": METHODS}  # what each peer implements


def legacy_ground_truth(setting: Setting) -> SubsetGroundTruth:
    """LDS ground truth of the legacy recipe, cached beside the bench's stores: 100
    half-subsets x 2 retrainings with training seeds 1000 + 2 j + s (the bench's
    ``lds_ground_truth`` numbers seeds from 0), margins of the val + test queries."""
    name = f"{setting.name}-{setting.recipe_hash()}-lds-m{M}-s{SEEDS}-legacy.pt"
    path = default_cache_dir() / name
    if path.exists():
        return SubsetGroundTruth(**torch.load(path, weights_only=True))
    x, y = setting.data.queries("all")

    def measure(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():  # all queries in one batch, as the legacy recipe measured them
            return margin(model(x), y)

    gt = subset_ground_truth(lambda indices, seed: setting.train(indices, seed=SEED_OFFSET + seed),
                             measure, setting.n_train, M, 0.5, SEEDS, 0)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(vars(gt), f))
    return gt


def last_layer_damping(model: Any, x: torch.Tensor, y: torch.Tensor, rel: float) -> float:
    """``rel`` x the mean diagonal of the exact last-layer TRAK kernel ``G^T G``: a last-layer
    margin gradient is ``delta h^T`` (weight) and ``delta`` (bias), of squared norm
    ``|delta|^2 (|h|^2 + 1)``; the sum over examples is the kernel's trace."""
    with torch.no_grad():
        h = model[:-1](x)
    z = model[-1](h).detach().requires_grad_(True)
    (delta,) = torch.autograd.grad(margin(z, y).sum(), z)
    trace = float(((delta**2).sum(1) * ((h**2).sum(1) + 1)).sum())
    return rel * trace / sum(p.numel() for p in model[-1].parameters())


def ours_methods(model: Any, sds: list[dict[str, torch.Tensor]], args: Any, lam_last: float,
                 last: list[str]) -> dict[str, tuple[str, Task, dict[str, Any]]]:  # fmt: skip
    """Our side of every row: (method id, task, options), matched to the peers."""
    full, one = Task(model, target="margin"), {"batch_size": args.batch_size, "members": sds[:1]}
    # relative_damping 1e-4: near the peers' plain inverse (the library default is 1.0)
    trak = {"projector": args.trak_projector, "proj_dim": args.trak_proj_dim or args.proj_dim,
            "relative_damping": args.trak_relative_damping, "batch_size": args.batch_size}  # fmt: skip
    # "cg": dattri's algorithm (same Hessian, damping and CG steps); "ekfac"/"kfac": our
    # closed-form influence instead (another estimator: compare LDS and time)
    if_cg = ("if-cg", {"curvature": "hessian", "damping": args.damping,
                       "solver_options": {"max_iter": args.cg_iter}})  # fmt: skip
    if args.if_cg_ours != "cg":
        if_cg = (f"if-{args.if_cg_ours}", {"damping": "heuristic", "fisher": "true"})
    return {
        "trak-1": ("trak", full, {**trak, "members": sds[:1]}),
        "trak-5": ("trak", full, {**trak, "members": sds[:5]}),
        "trak-last-exact": ("trak", Task(model, target="margin", params=last),
                            {"projector": "none", "damping": lam_last, **one}),
        "grad-dot": ("grad-dot", full, one),
        "grad-cos": ("grad-cos", full, one),
        "if-cg": (if_cg[0], full, {**if_cg[1], **one}),
    }  # fmt: skip


def run_ours(method: str, task: Task, opts: dict[str, Any], train: Any, queries: Any, reps: int,
             warm: int) -> dict[str, Any]:  # fmt: skip
    caught: list[str] = []

    def attribute(attr: Any) -> torch.Tensor:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            values = attr.attribute(queries).values
        # only our own numerical warnings (e.g. CG not converged), not torch deprecations
        caught[:] = sorted({str(x.message) for x in w if issubclass(x.category, RuntimeWarning)})
        return values

    res = timed(lambda: make_attributor(method, task, **opts).fit(train), attribute, reps, warm)
    return {**res, "warnings": caught}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--peers", default="traker,dattri", help="comma-separated: traker,dattri")
    add("--methods", default=",".join(METHODS), help="comma-separated keys")
    add("--trak-projector", default="gaussian", help="our TRAK rows' projector (gaussian = the "
        "peers' own; another, e.g. factored: compare LDS and time, not scores)")  # fmt: skip
    add("--trak-relative-damping", type=float, default=1e-4, help="our TRAK rows' damping")
    add("--trak-proj-dim", type=int, default=None, help="our TRAK rows' proj_dim (--proj-dim)")
    add("--repeats", type=int, default=3, help="timed runs (median) per method")
    add("--warmup", type=int, default=1, help="untimed runs before them")
    add("--slow-repeats", type=int, default=1, help="timed runs of IF-CG (no warm-up run)")
    add("--proj-dim", type=int, default=512, help="TRAK projection dimension")
    add("--damping", type=float, default=0.1, help="IF-CG damping; > -lambda_min(H) ~ 0.045")
    add("--cg-iter", type=int, default=30, help="CG iterations (both libraries)")
    add("--if-cg-ours", default="cg", choices=["cg", "ekfac", "kfac"], help="our side of the "
        "if-cg row: cg (dattri's algorithm) or our K-FAC/EK-FAC influence (another estimator)")  # fmt: skip
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
    bad = [p for p in args.peers if p not in PEER_METHODS]
    bad += [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown {bad}; peers are {sorted(PEER_METHODS)}, methods {METHODS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = args.methods
    t_start, load_before = time.perf_counter(), os.getloadavg()
    pythons, problems, ours, peer_out = {}, {}, {}, {}
    for p in args.peers:
        try:
            pythons[p] = common.setup_peer(p, args.venv_root)
        except Exception as exc:  # CalledProcessError, OSError
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
    spec = {"proj_dim": args.proj_dim, "damping": args.damping, "cg_iter": args.cg_iter,
            "batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup,
            "slow_repeats": args.slow_repeats, "slow_warmup": 0, "threads": args.threads,
            "last_layer": last, "last_layer_damping": lam_last, "seed": 0,
            "if_query_batch": args.if_query_batch, "if_cg_ours": args.if_cg_ours}  # fmt: skip

    table = ours_methods(model0, sds, args, lam_last, last)
    for key in methods:
        t0 = time.perf_counter()
        reps, warm = (args.slow_repeats, 0) if key in SLOW else (args.repeats, args.warmup)
        ours[key] = run_ours(*table[key], train, q_test, reps, warm)
        print(f"[datatrace] {key}: {time.perf_counter() - t0:.1f}s", flush=True)
    other_seed: dict[str, torch.Tensor] = {}  # projection noise: TRAK with projection seed 1
    for key in [k for k in ("trak-1", "trak-5") if k in methods]:
        method_id, task, opts = table[key]
        attr = make_attributor(method_id, task, **{**opts, "seed": 1}).fit(train)
        other_seed[key] = attr.attribute(q_test).values

    with tempfile.TemporaryDirectory(prefix="datatrace-peers-") as tmp:
        inputs = Path(tmp) / "inputs.pt"
        data = {"model": "sequential", "layers": common.describe(model0), "dtype": "float32"}
        data.update(x_train=train[0], y_train=train[1], x_query=q_test[0], y_query=q_test[1])
        torch.save({**data, "members": sds}, inputs)
        for p, py in pythons.items():
            t0, todo = time.perf_counter(), [m for m in methods if m in PEER_METHODS[p]]
            peer_out[p] = common.run_peer(p, py, inputs, Path(tmp) / f"{p}.pt",
                                   {**spec, "methods": todo}, args.peer_timeout)  # fmt: skip
            print(f"[{p}] total {time.perf_counter() - t0:.1f}s", flush=True)

    rows: list[dict[str, Any]] = []
    for p, out in peer_out.items():
        if "failed" in out or "crashed" in out:
            problems[p] = out.get("failed") or out["crashed"]
        problems.update({f"{p}/{key}": err for key, err in out.get("errors", {}).items()})
        for key in [k for k in methods if k in out.get("results", {}) and k in ours]:
            mine, theirs = ours[key], out["results"][key][0]
            row = {"method": key, "peer": f"{p} {out['version']}"}
            row.update(common.compare(mine["scores"], theirs["scores"], gt.subsets, targets))
            if key in other_seed:
                rho = spearman_batched(mine["scores"].double(), other_seed[key].double(), dim=1)
                row["spearman_ours_other_seed"] = float(rho.mean())
                row["lds_ours_other_seed"] = lds(other_seed[key], gt.subsets, targets).mean
            row.update(time_ours_s=mine["total_s"], time_peer_s=theirs["total_s"])
            row.update(fit_ours_s=mine["fit_s"], attribute_ours_s=mine["attribute_s"])
            row.update(fit_peer_s=theirs["fit_s"], attribute_peer_s=theirs["attribute_s"])
            row.update(timed_runs=theirs["runs"], ours_warnings=mine["warnings"])
            rows.append(row)
    both = [o["results"] for o in peer_out.values() if "results" in o]
    peer_vs_peer: dict[str, float] = {}  # their CPU projectors share code and seeds
    if len(both) == 2:
        for key in [k for k in methods if k in both[0] and k in both[1]]:
            a, b = (r[key][0]["scores"].double() for r in both)
            peer_vs_peer[key] = float(spearman_batched(a, b, dim=1).mean())

    print(f"\ndigits MLP 64-128-64-10, {setting.n_train} train, {setting.n_test} test queries, "
          f"LDS over {M} subsets (alpha=0.5); noise ceiling {ceiling.mean:.3f}, random scores "
          f"{random_lds.mean:+.3f}; CPU, {args.threads} threads\n")  # fmt: skip
    header = ["method", "peer", "Spearman ours vs peer (per query / flat)", "ours vs ours, other "
              "proj. seed", "rel. L2 diff", "LDS ours", "LDS peer", "ours - peer LDS, 95% CI",
              "time ours (s)", "time peer (s)", "peer / ours"]  # fmt: skip
    common.print_table(header, [
        [r["method"], r["peer"], f"{r['spearman_per_query']:.3f} / {r['spearman_flat']:.3f}",
         f"{r['spearman_ours_other_seed']:.3f}" if "spearman_ours_other_seed" in r else "-",
         f"{r['rel_err_after_scale']:.1e}", f"{r['lds_ours']:.3f}", f"{r['lds_peer']:.3f}",
         common.fmt_diff(r), f"{r['time_ours_s']:.2f}", f"{r['time_peer_s']:.2f}",
         f"{r['time_peer_s'] / r['time_ours_s']:.1f}x"] for r in rows])  # fmt: skip
    print()
    if args.trak_projector != "gaussian" or args.if_cg_ours != "cg":  # docs/peers.md
        print("- NOTE: another projector or if-cg estimator than the peers': compare LDS, time")
    for r in rows:
        extra = f"scale peer/ours {r['scale_peer_over_ours']:.4g}"
        if "lds_ours_other_seed" in r:
            extra += f"; LDS of ours with projection seed 1: {r['lds_ours_other_seed']:.3f}"
        print(f"- {r['method']} vs {r['peer']}: {extra}")
    for key, agreement in peer_vs_peer.items():
        print(f"- {key}: traker vs dattri Spearman (per query) {agreement:.3f}")
    for r in [r for r in rows if r["ours_warnings"]]:
        print(f"- datatrace {r['method']} warned: {r['ours_warnings']}")
    for k, v in problems.items():
        print(f"- PROBLEM {k}: {v.splitlines()[0] if v else v}")
    wall, load_after = time.perf_counter() - t_start, os.getloadavg()
    print(common.load_line(wall, load_before, load_after))
    versions = {p: {"version": o.get("version"), "torch": o.get("torch")}
                for p, o in peer_out.items() if "failed" not in o}  # fmt: skip
    common.write_json(args.json, {
        "command": " ".join(["python", "benchmarks/peers/peers.py", *(argv or sys.argv[1:])]),
        "settings": vars(args), "setting": setting.to_json(), "spec": spec,
        "versions": {"datatrace_torch": torch.__version__, **versions},
        "noise_ceiling": ceiling.mean, "random": random_lds.mean, "rows": rows,
        "spearman_traker_vs_dattri": peer_vs_peer, "problems": problems, "wall_s": wall,
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "cpu_count": os.cpu_count(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
