"""Group attribution: speed-up of group vs per-sample attribution, and group LDS per grouper.

    python benchmarks/groups.py speed --job digits              # digits-mlp, sizes 1,4,16,64
    python benchmarks/groups.py speed --job large               # 20,000 x 1.05M-param MLP
    python benchmarks/groups.py lds --m 30                      # group LDS on digits-mlp

``speed`` times every method/projector per-sample (``groups=None``) and with random groups
of each size, with phases timed separately (exclusive wall time; a phase nested in another
is not counted twice): grouping, gradients (forward/backward and group factor formation),
projection, kernel/curvature (``_fit_member``), precondition (query transform), scoring,
storage (shard writes and reads; the large job streams features through a store) and the
rest of the loop. End to end = grouping + fit + attribute. The floor is one forward
+ backward of the summed loss over the training set to the Linear layers' outputs (median of
3; the output gradients that with the layer inputs make every gradient feature): every group
path pays it, so fastest per-sample / floor bounds any group speed-up. The per-sample baseline of a
method is the fastest of its per-sample runs over the projectors tried ("our fastest
per-sample path"); the speed-up of a group run is that baseline over its end-to-end time,
with the grouping cost of ``kmeans-grad`` groups added (the most expensive grouper, at most
``--kmeans-iter`` Lloyd iterations; random groups cost milliseconds). Single warm runs (a warm-up run precedes the timed ones).

``lds`` retrains digits-mlp on random half-subsets of *groups*
(:mod:`datatrace.bench.groups`) for each grouper and size, scores TRAK group attributions
against them and compares groupers with the paired bootstrap (DESIGN.md §9).

The large job is ``benchmarks/scale.py``'s: an MLP 512-1024-512-10 (1,055,242 parameters)
on Gaussian inputs labelled by a random linear teacher, trained for one epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datatrace import Task, make_attributor
from datatrace.group import Grouping, make_grouper
from datatrace.methods import hooks as base_module
from datatrace.methods.base import Attributor

PHASES = (
    "grouping",
    "gradients",
    "projection",
    "kernel",
    "precondition",
    "scoring",
    "storage",
    "other",
)


class PhaseTimer:
    """Exclusive wall time per phase: nested phases are subtracted from their parents."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list[Any]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame = [name, time.perf_counter(), 0.0]  # name, start, time of nested phases
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.totals[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time ``owner.attr`` (a function or method) under ``name``; returns an undo."""
        original = owner.__dict__[attr]
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            with timer.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


@contextmanager
def instrumented(timer: PhaseTimer) -> Iterator[None]:
    from datatrace import projection, store

    undo = [
        timer.wrap(base_module, "compute_per_sample_grads", "gradients"),
        timer.wrap(base_module, "compute_group_grads", "gradients"),
        timer.wrap(store.Store, "write_shard", "storage"),
        timer.wrap(store.Store, "read_shard", "storage"),
    ]
    for cls in (
        projection.dense._ChunkedProjector,
        projection.SJLTProjector,
        projection.FactoredProjector,
        projection.IdentityProjector,
    ):
        undo.append(timer.wrap(cls, "project", "projection"))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def _wrap_method(timer: PhaseTimer, attr: Attributor) -> None:
    """Per-instance timing of the kernel/curvature and the query transform."""
    for name, phase in (("_fit_member", "kernel"), ("_transform_queries", "precondition")):
        original = getattr(attr, name)

        def timed(*a: Any, _o: Callable = original, _p: str = phase, **k: Any) -> Any:
            with timer.phase(_p):
                return _o(*a, **k)

        setattr(attr, name, timed)


def timed_run(
    build: Callable[[Any], Attributor],
    train: Any,
    queries: Any,
    grouping: Grouping | None,
    store_dir: Path | None,
) -> dict[str, Any]:
    timer = PhaseTimer()
    with instrumented(timer):
        attr = build(grouping, store_dir)
        _wrap_method(timer, attr)
        t0 = time.perf_counter()
        with timer.phase("other"):
            attr.fit(train)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        with timer.phase("scoring"):
            scores = attr.attribute(queries)
        t_attr = time.perf_counter() - t0
    stored = attr.store.nbytes() if attr.store is not None else 0
    return {
        "fit_s": t_fit,
        "attribute_s": t_attr,
        "phases": {k: round(v, 4) for k, v in timer.totals.items() if k != "grouping"},
        "n_units": scores.shape[1],
        "bytes_stored": stored,
    }


# ----------------------------------------------------------------------------- jobs
def digits_job() -> dict[str, Any]:
    from datatrace.bench.settings import get_setting

    setting = get_setting("digits-mlp")
    model = setting.train(seed=0)
    task_loss = setting.make_task(model)
    return {
        "name": "digits-mlp",
        "train": setting.data.train,
        "queries": setting.data.test_queries,
        "model": model,
        "task": task_loss,
        "store": False,
        "configs": {
            "trak": [
                ("rademacher", {"projector": "rademacher", "proj_dim": 2048}),
                ("sjlt", {"projector": "sjlt", "proj_dim": 2048}),
                ("factored", {"projector": "factored", "proj_dim": 256}),
            ],
            "influence": [
                ("rademacher", {"projector": "rademacher", "proj_dim": 1024}),
                ("sjlt", {"projector": "sjlt", "proj_dim": 1024}),
                ("factored", {"projector": "factored", "proj_dim": 256}),
            ],
            "grad-dot": [
                ("none", {"projector": "none"}),
                ("sjlt", {"projector": "sjlt", "proj_dim": 2048}),
            ],
        },
        "batch_size": 256,
    }


def large_job(n_train: int, factored_dims: tuple[int, ...] = (1024,)) -> dict[str, Any]:
    from benchmarks import scale

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp()) / "model.pt"
    scale.train_model(n_train, path)
    model = scale.mlp()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    # "factored" = 32 x 32 per layer (3 x 1024 features); "factored-4096" = LoGra's 64 x 64
    factored = [
        ("factored" if k == 1024 else f"factored-{k}", {"projector": "factored", "proj_dim": k})
        for k in factored_dims
    ]
    return {
        "name": f"synthetic-{n_train}-mlp1M",
        "train": scale.data(n_train, seed=1),
        "queries": scale.data(scale.N_QUERY, seed=2),
        "model": model,
        "task": Task(model),
        "store": True,
        "configs": {
            "trak": [*factored, ("sjlt", {"projector": "sjlt", "proj_dim": 4096})],
            "influence": [*factored, ("sjlt", {"projector": "sjlt", "proj_dim": 4096})],
            "grad-dot": [("sjlt", {"projector": "sjlt", "proj_dim": 4096})],
        },
        "batch_size": 1024,
    }


def _builder(method: str, job: dict[str, Any], settings: dict[str, Any]) -> Callable:
    model = job["model"]

    def build(grouping: Grouping | None, store: Path | None) -> Attributor:
        common = {"batch_size": job["batch_size"], "groups": grouping, "store": store, **settings}
        if method == "trak":
            return make_attributor(
                "trak", Task(model, target="margin"), relative_damping=1e-3, **common
            )
        if method == "influence":  # empirical Fisher of the projected features, explicit solve
            # damping 0.1: group features have rank <= n_groups < proj_dim at large sizes
            return make_attributor(
                "if-explicit", Task(model), curvature="fisher", damping=0.1, **common
            )
        return make_attributor(method, Task(model), **common)

    return build


def speed(args: argparse.Namespace) -> dict[str, Any]:
    dims = tuple(int(k) for k in args.factored_dims.split(","))
    job = digits_job() if args.job == "digits" else large_job(args.n_train, dims)
    train, queries = job["train"], job["queries"]
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    n = int(train[0].shape[0])
    groupings: dict[int, Grouping] = {}
    grouping_cost: dict[int, dict[str, float]] = {}
    for k in sizes:
        groupings[k] = make_grouper("random", group_size=k, seed=0).group(train)
        km_s = 0.0  # singletons need no clustering
        if k > 1 and not args.skip_kmeans_cost:
            km = make_grouper("kmeans-grad", group_size=k, seed=0, max_iter=args.kmeans_iter)
            km_s = km.group(train, job["task"]).seconds
        grouping_cost[k] = {"random": groupings[k].seconds, "kmeans-grad": km_s}
        print(f"grouping size {k}: {grouping_cost[k]}", flush=True)
    rows = []
    keep = None if args.projectors is None else set(args.projectors.split(","))
    for method in methods:
        for proj_name, settings in job["configs"][method]:
            if keep is not None and proj_name not in keep:
                continue
            build = _builder(method, job, settings)
            for k in [None, *sizes]:
                grouping = None if k is None else groupings[k]
                store = Path(tempfile.mkdtemp()) / "store" if job["store"] else None
                if not rows or args.warmup_each:
                    timed_run(build, _head(train, 256), queries, None, None)  # warm-up
                r = timed_run(build, train, queries, grouping, store)
                cost = 0.0 if k is None else grouping_cost[k]["kmeans-grad"]
                r.update(
                    job=job["name"],
                    n_train=n,
                    method=method,
                    projector=proj_name,
                    settings=settings,
                    group_size=k or 0,
                    grouping_s_kmeans_grad=cost,
                    grouping_s_random=0.0 if k is None else grouping_cost[k]["random"],
                    end_to_end_s=r["fit_s"] + r["attribute_s"] + cost,
                    threads=torch.get_num_threads(),
                )
                rows.append(r)
                print(json.dumps(r), flush=True)
    floor = floor_seconds(job)
    _speedups(rows, floor)
    return {"rows": rows, "floor_s": floor}


def floor_seconds(job: dict[str, Any], repeats: int = 3) -> float:
    """Median seconds of one forward + backward of the summed loss over the training set, in
    the job's batches, back-propagated to the Linear layers' outputs only (the output
    gradients that, with the layer inputs, make every gradient feature; no weight-gradient
    products). Every group path pays at least this: a group's gradient needs each member's
    forward and backward. So ``fastest per-sample / floor`` bounds the speed-up."""
    model, (x, y), bs = job["model"], job["train"], job["batch_size"]
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in layers]
    times = []
    try:
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            for s in range(0, x.shape[0], bs):
                outs.clear()
                with torch.enable_grad():
                    z = model(x[s : s + bs])
                    loss = torch.nn.functional.cross_entropy(z, y[s : s + bs], reduction="sum")
                    torch.autograd.grad(loss, outs)
            times.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    return sorted(times[1:])[len(times[1:]) // 2]


def _head(train: Any, n: int) -> Any:
    return tuple(t[:n] for t in train)


def _speedups(rows: list[dict[str, Any]], floor: float) -> None:
    print(
        f"\nfloor: one forward + backward (to the layer outputs) over the {rows[0]['n_train']} "
        "training examples "
        f"{floor:.3f} s (median of 3)"
    )
    print(
        "\nmethod      projector   size  end-to-end s  speed-up vs same proj  vs fastest per-sample"
    )
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        per_sample = {r["projector"]: r["end_to_end_s"] for r in mine if r["group_size"] == 0}
        fastest = min(per_sample.values())
        print(
            f"{method}: fastest per-sample {fastest:.2f} s; no group path can beat "
            f"{fastest / floor:.1f}x (fastest per-sample / floor)"
        )
        for r in mine:
            same = per_sample[r["projector"]] / r["end_to_end_s"]
            r["speedup_same_projector"] = same
            r["speedup_vs_fastest_per_sample"] = fastest / r["end_to_end_s"]
            print(
                f"{method:11s} {r['projector']:10s} {r['group_size']:5d} {r['end_to_end_s']:12.2f} "
                f"{same:21.1f}x {fastest / r['end_to_end_s']:21.1f}x   "
                + " ".join(f"{k}={v:.2f}" for k, v in r["phases"].items() if v > 0.005)
            )


# ----------------------------------------------------------------------------- LDS
def lds_bench(args: argparse.Namespace) -> dict[str, Any]:
    from datatrace.bench.groups import group_lds, group_subset_ground_truth
    from datatrace.bench.settings import get_setting
    from datatrace.metrics.lds import beats

    setting = get_setting("digits-mlp")
    model = setting.train(seed=0)
    task = setting.make_task(model)
    train, queries = setting.data.train, setting.data.test_queries

    def trak(grouping: Grouping | None) -> torch.Tensor:
        attr = make_attributor(
            "trak", task, proj_dim=2048, relative_damping=1.0, groups=grouping, batch_size=256
        )
        return attr.fit(train).attribute(queries).values

    per_sample = trak(None)
    seeds = [int(x) for x in args.grouping_seeds.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    plan = [(g, 16) for g in args.groupers.split(",")] if 16 in sizes else []
    plan += [(g, k) for k in sizes if k != 16 for g in ("random", "kmeans-grad")]
    out: dict[str, Any] = {"m": args.m, "alpha": 0.5, "grouping_seeds": seeds, "rows": []}
    # per-query LDS of each (grouper, size), averaged over the grouping seeds
    per_query: dict[tuple[str, int], torch.Tensor] = {}
    for grouper, k, seed in [(g, k, s) for g, k in plan for s in seeds]:
        grouping = make_grouper(grouper, group_size=k, seed=seed).group(train, task)
        t0 = time.perf_counter()
        gt = group_subset_ground_truth(
            lambda idx, s: setting.train(idx, seed=s),
            lambda mdl: setting.measure(mdl, "test"),
            grouping,
            m=args.m,
            seed=1,
        )
        t_gt = time.perf_counter() - t0
        res = group_lds(trak(grouping), gt)
        summed = group_lds(grouping.sum_rows(per_sample.T).T, gt)  # per-sample, summed
        key = (grouper, k)
        per_query[key] = per_query.get(key, 0) + res.per_query / len(seeds)
        row = {
            "grouper": grouper,
            "group_size": k,
            "grouping_seed": seed,
            "max_group": int(grouping.sizes().max()),
            "n_groups": grouping.n_groups,
            "grouping_s": grouping.seconds,
            "lds_group_trak": res.mean,
            "lds_per_sample_trak_summed": summed.mean,
            "ground_truth_s": t_gt,
        }
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    for (grouper, k), pq in per_query.items():
        row = {"grouper": grouper, "group_size": k, "mean_over_seeds": float(pq.nanmean())}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    comparisons = []
    for k in sorted({k for _, k in plan}):
        if ("kmeans-grad", k) in per_query and ("random", k) in per_query:
            c = beats(per_query[("kmeans-grad", k)], per_query[("random", k)])
            comparisons.append(
                {"group_size": k, "kmeans_grad_beats_random": bool(c.holds), "interval": c.interval}
            )
            print(json.dumps(comparisons[-1]), flush=True)
    out["comparisons"] = comparisons
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--job", choices=("digits", "large"), default="digits")
    sp.add_argument("--n-train", type=int, default=20_000)
    sp.add_argument("--sizes", default="1,4,16,64")
    sp.add_argument("--methods", default="trak,influence,grad-dot")
    sp.add_argument("--warmup-each", action="store_true", help="warm up before every run")
    sp.add_argument("--kmeans-iter", type=int, default=20, help="Lloyd iterations (cost)")
    sp.add_argument("--skip-kmeans-cost", action="store_true", help="do not time kmeans-grad")
    sp.add_argument(
        "--factored-dims",
        default="1024",
        help="large job: factored proj_dim per layer to try (perfect squares; 4096 = LoGra's 64x64)",
    )
    sp.add_argument("--projectors", default=None, help="only these projector names (comma list)")
    sl = sub.add_parser("lds")
    sl.add_argument("--m", type=int, default=30, help="random subsets of groups per grouping")
    sl.add_argument(
        "--groupers", default="random,class-random,kmeans-input,kmeans-repr,kmeans-grad"
    )
    sl.add_argument("--sizes", default="4,16,64", help="group sizes (16: every grouper)")
    sl.add_argument(
        "--grouping-seeds",
        default="0",
        help="grouper seeds; each grouping gets its own ground truth, per-query LDS averaged",
    )
    for p in (sp, sl):
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: Any = speed(args) if args.cmd == "speed" else lds_bench(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
