"""Group attribution: speed-up over per-sample attribution, and group LDS per grouper (the
``group-speed`` and ``group-lds`` questions).

``group-speed`` times every method/projector per-sample (``groups=None``) and with random
groups of each size, with phases timed separately (exclusive wall time; a phase nested in
another is not counted twice): gradients (forward/backward and group factor formation),
projection, kernel/curvature (``_fit_member``), precondition (query transform), scoring,
storage (shard writes and reads; the ``large`` job streams features through a store) and the
rest of the loop. End to end = fit + attribute + the grouping cost of ``kmeans-grad`` groups
(the most expensive grouper, at most ``kmeans_iter`` Lloyd iterations; random groups cost
milliseconds). The floor is one forward + backward of the summed loss over the training set
to the Linear layers' outputs (median of 3): every group path pays it, so fastest
per-sample / floor bounds any group speed-up. A method's per-sample baseline is the fastest
of its per-sample runs over the projectors tried. Single warm runs (a warm-up run precedes
the timed ones). Jobs: ``digits`` (the ``setting``, default digits-mlp) and ``large`` (the
``mlp1m`` job of ``scale`` at ``n_train`` examples).

``group-lds`` retrains the setting on random half-subsets of *groups*
(:mod:`datatrace.bench.groups`) for each grouper and size, scores TRAK group attributions
against them and compares kmeans-grad with random groups by the paired bootstrap
(DESIGN.md §9).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from datatrace.bench.questions.harness import QuestionConfig, median_time, timed
from datatrace.group import Grouping, make_grouper

__all__ = ["GroupLDSConfig", "GroupSpeedConfig", "group_lds", "group_speed"]


class PhaseTimer:
    """Exclusive wall time per phase: nested phases are subtracted from their parents."""

    def __init__(self) -> None:
        phases = ("gradients", "projection", "kernel", "precondition", "scoring", "storage")
        self.totals = dict.fromkeys((*phases, "other"), 0.0)
        self._stack: list[list[Any]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame: list[Any] = [time.perf_counter(), 0.0]  # start, time of nested phases
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[0]
            self.totals[name] += elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed

    @contextmanager
    def wrap(self, owner: Any, attr: str, name: str) -> Iterator[None]:
        """Time ``owner.attr`` (a function, method or bound method) under ``name`` meanwhile."""
        own = attr in vars(owner)  # a module's or class's own; else an instance's method
        original = vars(owner)[attr] if own else getattr(owner, attr)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed_call)
        try:
            yield
        finally:
            if own:
                setattr(owner, attr, original)
            else:  # the instance's own attribute goes: its class's method shows again
                delattr(owner, attr)


def _timed_run(
    build: Callable[..., Any], train: Any, queries: Any, grouping: Any, store: Any
) -> dict[str, Any]:
    from datatrace import projection
    from datatrace import store as store_module
    from datatrace.methods import hooks

    timer = PhaseTimer()
    attr = build(grouping, store)
    wrapped = [
        (hooks, "compute_per_sample_grads", "gradients"),
        (hooks, "compute_group_grads", "gradients"),
        (store_module.Store, "write_shard", "storage"),
        (store_module.Store, "read_shard", "storage"),
        (attr, "_fit_member", "kernel"),
        (attr, "_transform_queries", "precondition"),
    ]
    for cls in (
        projection.dense._ChunkedProjector,
        projection.SJLTProjector,
        projection.FactoredProjector,
        projection.IdentityProjector,
    ):
        wrapped.append((cls, "project", "projection"))
    with ExitStack() as stack:
        for owner, name, phase in wrapped:
            stack.enter_context(timer.wrap(owner, name, phase))
        with timer.phase("other"):
            t_fit, _ = timed(attr.fit, train)
        with timer.phase("scoring"):
            t_attr, scores = timed(attr.attribute, queries)
    return {
        "fit_s": t_fit,
        "attribute_s": t_attr,
        "phases": {k: round(v, 4) for k, v in timer.totals.items()},
        "n_units": scores.shape[1],
        "bytes_stored": attr.store.nbytes() if attr.store is not None else 0,
    }


@dataclass(frozen=True)
class _GroupJob:
    name: str
    model: torch.nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    queries: Any
    store: bool
    batch_size: int
    configs: dict[str, list[tuple[str, dict[str, Any]]]]  # method -> (projector name, settings)


def _proj(kind: str, k: int | None = None) -> dict[str, Any]:
    return {"projector": kind} if k is None else {"projector": kind, "proj_dim": k}


def _named(kind: str, k: int | None = None) -> tuple[str, dict[str, Any]]:
    return kind, _proj(kind, k)


def _digits_job(setting_name: str) -> _GroupJob:
    from datatrace.bench.settings import get_setting

    setting = get_setting(setting_name)
    configs = {
        "trak": [_named("rademacher", 2048), _named("sjlt", 2048), _named("factored", 256)],
        "influence": [_named("rademacher", 1024), _named("sjlt", 1024), _named("factored", 256)],
        "grad-dot": [_named("none"), _named("sjlt", 2048)],
    }
    train, queries = setting.data.train, setting.data.test_queries
    return _GroupJob(setting.name, setting.train(seed=0), train, queries, False, 256, configs)


def _large_job(n_train: int, factored_dims: tuple[int, ...]) -> _GroupJob:
    from datatrace.bench.questions.scale import JOBS

    job = JOBS["mlp1m"]
    # "factored" = 32 x 32 per layer (3 x 1024 features); "factored-4096" = LoGra's 64 x 64
    factored = [
        ("factored" if k == 1024 else f"factored-{k}", _proj("factored", k)) for k in factored_dims
    ]
    sjlt = [_named("sjlt", 4096)]
    configs = {"trak": factored + sjlt, "influence": factored + sjlt, "grad-dot": sjlt}
    name = f"synthetic-{n_train}-mlp1M"
    return _GroupJob(
        name, job.model(n_train), job.train(n_train), job.queries(n_train), True, 1024, configs
    )


def _builder(method: str, job: _GroupJob, settings: dict[str, Any]) -> Callable[..., Any]:
    from datatrace import Task, make_attributor

    def build(grouping: Grouping | None, store: Path | None) -> Any:
        common = {"batch_size": job.batch_size, "groups": grouping, "store": store, **settings}
        if method == "trak":
            task = Task(job.model, target="margin")
            return make_attributor("trak", task, relative_damping=1e-3, **common)
        if method == "influence":  # empirical Fisher of the projected features, explicit solve
            # damping 0.1: group features have rank <= n_groups < proj_dim at large sizes
            return make_attributor(
                "if-explicit", Task(job.model), curvature="fisher", damping=0.1, **common
            )
        return make_attributor(method, Task(job.model), **common)

    return build


@dataclass(frozen=True)
class GroupSpeedConfig(QuestionConfig):
    """Speed-up of group over per-sample attribution, by phase (module docstring).

    Attributes:
        job: ``digits`` or ``large``.
        setting: the registered setting of the ``digits`` job.
        n_train: training examples of the ``large`` job.
        sizes: random group sizes.
        methods: ``trak`` (margin, relative damping 1e-3), ``influence`` (if-explicit on the
            Fisher of the projected features, damping 0.1) and/or ``grad-dot``.
        warmup_each: warm up before every run (default: before the first only).
        kmeans_iter: Lloyd iterations of the timed kmeans-grad grouping.
        skip_kmeans_cost: do not time kmeans-grad (its cost counts as 0).
        factored_dims: the large job's factored proj_dims per layer (perfect squares; 4096 =
            LoGra's 64x64).
        projectors: only these projector names (default: all of the job's).
    """

    job: Literal["digits", "large"] = "digits"
    setting: str = "digits-mlp"
    n_train: int = 20_000
    sizes: tuple[int, ...] = (1, 4, 16, 64)
    methods: tuple[Literal["trak", "influence", "grad-dot"], ...] = (
        "trak",
        "influence",
        "grad-dot",
    )
    warmup_each: bool = False
    kmeans_iter: int = 20
    skip_kmeans_cost: bool = False
    factored_dims: tuple[int, ...] = (1024,)
    projectors: tuple[str, ...] = ()


def group_speed(config: GroupSpeedConfig) -> dict[str, Any]:
    """Run ``group-speed``; prints each run as JSON, then the speed-ups."""
    from datatrace import Task

    job = (
        _digits_job(config.setting)
        if config.job == "digits"
        else _large_job(config.n_train, config.factored_dims)
    )
    train, n = job.train, int(job.train[0].shape[0])
    groupings: dict[int, Grouping] = {}
    kmeans_s: dict[int, float] = {}
    for k in config.sizes:
        groupings[k] = make_grouper("random", group_size=k, seed=0).group(train)
        kmeans_s[k] = 0.0  # singletons need no clustering
        if k > 1 and not config.skip_kmeans_cost:
            km = make_grouper("kmeans-grad", group_size=k, seed=0, max_iter=config.kmeans_iter)
            kmeans_s[k] = km.group(train, Task(job.model)).seconds
        print(
            f"grouping size {k}: {{'random': {groupings[k].seconds}, 'kmeans-grad': {kmeans_s[k]}}}",
            flush=True,
        )
    rows: list[dict[str, Any]] = []
    for method in config.methods:
        for proj_name, settings in job.configs[method]:
            if config.projectors and proj_name not in config.projectors:
                continue
            build = _builder(method, job, settings)
            for k in [0, *config.sizes]:
                grouping = groupings[k] if k else None
                store = Path(tempfile.mkdtemp()) / "store" if job.store else None
                if not rows or config.warmup_each:  # warm-up
                    _timed_run(build, tuple(t[:256] for t in train), job.queries, None, None)
                r = _timed_run(build, train, job.queries, grouping, store)
                cost = kmeans_s[k] if k else 0.0
                r.update(job=job.name, n_train=n, method=method, projector=proj_name)
                r.update(settings=settings, group_size=k, grouping_s_kmeans_grad=cost)
                r.update(grouping_s_random=groupings[k].seconds if k else 0.0)
                r.update(end_to_end_s=r["fit_s"] + r["attribute_s"] + cost)
                r.update(threads=torch.get_num_threads())
                rows.append(r)
                print(json.dumps(r), flush=True)
    floor = median_time(lambda: _forward_backward(job), repeats=3)
    _speedups(rows, floor)
    return {"rows": rows, "floor_s": floor}


def _forward_backward(job: _GroupJob) -> None:
    """One forward + backward of the summed loss over the training set, in the job's batches,
    back-propagated to the Linear layers' outputs only (the output gradients that, with the
    layer inputs, make every gradient feature; no weight-gradient products)."""
    (x, y), bs = job.train, job.batch_size
    layers = [m for m in job.model.modules() if isinstance(m, torch.nn.Linear)]
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in layers]
    try:
        for s in range(0, x.shape[0], bs):
            outs.clear()
            with torch.enable_grad():
                z = job.model(x[s : s + bs])
                loss = torch.nn.functional.cross_entropy(z, y[s : s + bs], reduction="sum")
                torch.autograd.grad(loss, outs)
    finally:
        for h in handles:
            h.remove()


def _speedups(rows: list[dict[str, Any]], floor: float) -> None:
    print(
        f"\nfloor: one forward + backward (to the layer outputs) over the {rows[0]['n_train']} "
        f"training examples {floor:.3f} s (median of 3)"
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
            r["speedup_same_projector"] = same = per_sample[r["projector"]] / r["end_to_end_s"]
            r["speedup_vs_fastest_per_sample"] = fastest / r["end_to_end_s"]
            phases = " ".join(f"{k}={v:.2f}" for k, v in r["phases"].items() if v > 0.005)
            print(
                f"{method:11s} {r['projector']:10s} {r['group_size']:5d} {r['end_to_end_s']:12.2f} "
                f"{same:21.1f}x {fastest / r['end_to_end_s']:21.1f}x   {phases}"
            )


@dataclass(frozen=True)
class GroupLDSConfig(QuestionConfig):
    """Group LDS of TRAK per grouper and group size (module docstring).

    Attributes:
        setting: the registered setting.
        m: random subsets of groups per grouping.
        groupers: the grouper ids compared at size 16.
        sizes: group sizes (at 16 every grouper, otherwise random and kmeans-grad).
        grouping_seeds: grouper seeds; each grouping gets its own ground truth, per-query LDS
            averaged.
    """

    setting: str = "digits-mlp"
    m: int = 30
    groupers: tuple[str, ...] = (
        "random",
        "class-random",
        "kmeans-input",
        "kmeans-repr",
        "kmeans-grad",
    )
    sizes: tuple[int, ...] = (4, 16, 64)
    grouping_seeds: tuple[int, ...] = (0,)


def group_lds(config: GroupLDSConfig) -> dict[str, Any]:
    """Run ``group-lds``; prints one JSON line per grouping, mean and comparison."""
    from datatrace import make_attributor
    from datatrace.bench.groups import group_lds as lds_of_groups
    from datatrace.bench.groups import group_subset_ground_truth
    from datatrace.bench.settings import get_setting
    from datatrace.metrics.lds import beats

    setting = get_setting(config.setting)
    task = setting.make_task(setting.train(seed=0))
    train, queries = setting.data.train, setting.data.test_queries

    def trak(grouping: Grouping | None) -> torch.Tensor:
        attr = make_attributor(
            "trak", task, proj_dim=2048, relative_damping=1.0, groups=grouping, batch_size=256
        )
        return attr.fit(train).attribute(queries).values

    per_sample = trak(None)
    plan = [(g, 16) for g in config.groupers] if 16 in config.sizes else []
    plan += [(g, k) for k in config.sizes if k != 16 for g in ("random", "kmeans-grad")]
    seeds = list(config.grouping_seeds)
    out: dict[str, Any] = {"m": config.m, "alpha": 0.5, "grouping_seeds": seeds, "rows": []}
    per_query: dict[tuple[str, int], torch.Tensor] = {}  # averaged over the grouping seeds
    for grouper, k, seed in [(g, k, s) for g, k in plan for s in seeds]:
        grouping = make_grouper(grouper, group_size=k, seed=seed).group(train, task)
        measure = partial(setting.measure, queries="test")
        t_gt, gt = timed(
            group_subset_ground_truth, setting.train, measure, grouping, m=config.m, seed=1
        )
        res = lds_of_groups(trak(grouping), gt)
        summed = lds_of_groups(grouping.sum_rows(per_sample.T).T, gt)  # per-sample, summed
        per_query[grouper, k] = per_query.get((grouper, k), 0) + res.per_query / len(seeds)
        row = {"grouper": grouper, "group_size": k, "grouping_seed": seed}
        row |= {"max_group": int(grouping.sizes().max()), "n_groups": grouping.n_groups}
        row |= {"grouping_s": grouping.seconds, "lds_group_trak": res.mean}
        row |= {"lds_per_sample_trak_summed": summed.mean, "ground_truth_s": t_gt}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    for (grouper, k), pq in per_query.items():
        row = {"grouper": grouper, "group_size": k, "mean_over_seeds": float(pq.nanmean())}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["comparisons"] = []
    for k in sorted({k for _, k in plan}):
        if ("kmeans-grad", k) in per_query and ("random", k) in per_query:
            c = beats(per_query["kmeans-grad", k], per_query["random", k])
            out["comparisons"].append(
                {"group_size": k, "kmeans_grad_beats_random": bool(c.holds), "interval": c.interval}
            )
            print(json.dumps(out["comparisons"][-1]), flush=True)
    return out
