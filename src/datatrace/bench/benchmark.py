"""The benchmark run behind ``datatrace bench``: every method on one setting, every task.

Tasks (``--tasks``):

- ``lds`` (always): LDS on the test queries with a 95% bootstrap interval, the grid point
  chosen on the validation queries (DESIGN.md §9), beside random scores and the noise
  ceiling, under one ground-truth protocol (:mod:`datatrace.bench.protocols`): ``lds-half``
  (random half-subsets, retraining seeds vary; the default) or ``fixed-seed-drop:k`` (the
  seed-0 run replayed without a random fraction ``k`` of its examples). The payload and
  every row name the protocol.
- ``mislabel``: AUROC of each method's self-influence at finding flipped labels on a model
  that memorised them (:mod:`datatrace.bench.mislabel`), beside the training-loss ranking.
  Skipped with a note on settings that do not memorise, or are not classifiers.
- ``loo``: Pearson correlation (and slope) of scores with retrained leave-one-out effects on
  the test queries, for convex settings only (``Setting.convex``).
- ``removal`` (opt-in): fraction of correctly predicted test queries whose prediction flips
  after removing their top-k proponents and retraining (:mod:`datatrace.bench.brittleness`).

Every row keeps its per-query test LDS (``per_query_lds`` in the JSON) for paired-bootstrap
comparisons between methods (``datatrace.metrics.paired_bootstrap``).

Each method runs in its own process (:mod:`datatrace.bench.runner`), which gives its peak
memory; bytes stored is the size of its fitted state.

Ensembles (``--ensembles``, :mod:`datatrace.bench.ensembles`): every method also runs once per
ensemble, through ``members=``, after its plain row. Every row carries its cost: training
seconds of every training it needs (the plain method: the seed-0 model), serving seconds
(fit + attribute), member weight bytes and fitted-state bytes. The mislabel task is run for
plain methods only (ensemble members are trained on the clean labels).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from datatrace._progress import progress_bar
from datatrace.bench.cache import GroundTruthSpec, LOOSpec, loo_ground_truth
from datatrace.bench.ensembles import EnsembleCost, EnsembleSpec, MemberBank
from datatrace.bench.mislabel import MislabelSpec, mislabel_ground_truth
from datatrace.bench.protocols import DropSpec, Protocol, ground_truth, protocol_json
from datatrace.bench.runner import (
    MethodJob,
    MethodResult,
    reads_trajectory,
    replays_training,
    run_method,
    run_method_isolated,
)
from datatrace.bench.settings import Setting
from datatrace.errors import ConfigError

__all__ = [
    "DEFAULT_GRIDS",
    "DEFAULT_METHODS",
    "DEFAULT_TASKS",
    "SETTING_GRIDS",
    "TASKS",
    "BenchConfig",
    "grid_for",
    "parse_tasks",
    "run_benchmark",
]

# What ``datatrace bench`` runs without ``--methods``: the methods the README recommends
# (K-FAC/EK-FAC influence, LoGra, Source) beside the baselines they are measured against.
# The GGN solvers are left out so that ``make bench`` stays under 3 minutes on 2 cores:
# ``if-cg`` and ``if-lissa`` pay a pass over the training set per iteration and query column
# (minutes per grid point), ``if-arnoldi`` 100 such passes per grid point for a lower LDS
# (docs/benchmarks.md, digits-mlp); ask for them with ``--methods``.
DEFAULT_METHODS = (
    "if-ekfac,if-kfac,logra,source,trak,if-explicit,if-datainf,rps,tracin,grad-dot,grad-cos"
)
TASKS = ("lds", "mislabel", "loo", "removal")
DEFAULT_TASKS = "lds,mislabel,loo"

# The documented default grids (chosen on validation queries; DESIGN.md §9).
DEFAULT_GRIDS: dict[str, list[dict[str, Any]]] = {
    "trak": [{"proj_dim": k, "relative_damping": r} for k in (512, 1024, 2048) for r in (0.1, 1.0)],
    "if-explicit": [
        {"curvature": "fisher", "projector": "rademacher", "proj_dim": 1024, "damping": d}
        for d in (1e-3, 1e-2)
    ],
    "if-datainf": [{"damping": 1e-2}],
    # the point of linearisation: 1 for small drops, the centre of the ablated weights (0.5)
    # or below for half-subsets (docs/notes/unrolled-weight.md)
    "unrolled": [{"weight": w} for w in (1.0, 0.5, 0.25)],
    "if-cg": [{"damping": d, "solver_options": {"max_iter": 50}} for d in (1e-3, 1e-2)],
    "if-arnoldi": [{"damping": d, "solver_options": {"rank": 100}} for d in (1e-2, 1e-1)],
    "if-lissa": [{"damping": 0.1, "solver_options": {"depth": 100}}],
    "rps": [{"damping": d} for d in (1e-2, 1e-1)],
    # K-FAC / EK-FAC: the sampled (true) and empirical Fisher, per-layer heuristic damping
    # (0.1 x each layer's mean eigenvalue) or a fixed one.
    **{
        kind: [
            {"fisher": f, "damping": d}
            for f in ("true", "empirical")
            for d in ("heuristic", 1e-3, 1e-2)
        ]
        for kind in ("if-kfac", "if-ekfac")
    },
    "logra": [
        {"fisher": f, "damping": d} for f in ("true", "empirical") for d in ("heuristic", 1e-2)
    ],
    # Source: one segment per recorded interval or 2 segments; damping on top of the unrolled
    # response (0 = the closed form alone).
    "source": [{"segments": s, "damping": d} for s in (None, 2) for d in (0.0, 1e-2)],
}

# Setting-specific grids replace the default grid of a method on that setting. digits-lr has
# 650 parameters: influence uses the exact Hessian, unprojected, with damping from a grid that
# brackets the objective's own L2 term (weight_decay = 1e-3).
_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
SETTING_GRIDS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "digits-lr": {
        "if-explicit": [{"curvature": "hessian", "damping": d} for d in _DAMPINGS],
        "if-cg": [
            {"curvature": "hessian", "damping": d, "solver_options": {"max_iter": 200}}
            for d in _DAMPINGS
        ],
        "if-datainf": [{"damping": d} for d in _DAMPINGS],
    },
}


def grid_for(setting_name: str, method: str) -> list[dict[str, Any]]:
    """The grid of ``method`` on ``setting_name``: its setting-specific grid, else the default."""
    specific = SETTING_GRIDS.get(setting_name, {})
    return specific.get(method, DEFAULT_GRIDS.get(method, [{}]))


def parse_tasks(spec: str) -> tuple[str, ...]:
    """``"lds,mislabel"`` -> ``("lds", "mislabel")``; ``lds`` is always included.

    Raises:
        ConfigError: On an unknown task name.
    """
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {unknown} in --tasks {spec!r}; choose from {list(TASKS)}."
        )
    return tuple(t for t in TASKS if t in names or t == "lds")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Attributes:
        setting: the setting.
        methods: ``(method id, options or None for the grid)`` pairs.
        ensembles: ensembles every method also runs with (after its plain row).
        spec: LDS ground-truth protocol: ``GroundTruthSpec`` (``lds-half``) or ``DropSpec``
            (``fixed-seed-drop``).
        tasks: tasks to run (see the module docstring).
        mislabel: flip rate and seed of the mislabel task.
        loo: leave-one-out sample of the ``loo`` task.
        removal_ks: removal budgets of the ``removal`` task.
        removal_queries: correctly predicted test queries the removal task tests.
        cache_dir: ground-truth cache (None: the default).
        workers: retraining processes.
        isolate: run every method in its own process (gives peak memory).
        threads: torch threads of the run (model trainings and each method's process). 1 by
            default: on a shared 2-core machine two threads per process spin-wait on each
            other (the default bench used 3x the CPU time with 2 threads at load 8).
        progress: show progress bars.
    """

    setting: Setting
    methods: Sequence[tuple[str, dict[str, Any] | None]]
    ensembles: Sequence[EnsembleSpec] = ()
    spec: Protocol = field(default_factory=GroundTruthSpec)
    tasks: tuple[str, ...] = ("lds", "mislabel", "loo")
    mislabel: MislabelSpec = field(default_factory=MislabelSpec)
    loo: LOOSpec = field(default_factory=LOOSpec)
    removal_ks: tuple[int, ...] = (10, 20, 40)
    removal_queries: int = 5
    cache_dir: Path | None = None
    workers: int = 2
    isolate: bool = True
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.spec, (GroundTruthSpec, DropSpec)):
            raise ConfigError(
                f"spec must be a GroundTruthSpec or a DropSpec (see parse_protocol); got "
                f"{type(self.spec).__name__}."
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads must be an int >= 1; got {self.threads!r}.")
        q = self.removal_queries
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ConfigError(f"removal_queries must be an int >= 1; got {q!r}.")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; choose from {list(TASKS)}.")
        wrong = [e for e in self.ensembles if not isinstance(e, EnsembleSpec)]
        if wrong:
            raise ConfigError(
                f"ensembles must be EnsembleSpec objects (see parse_ensembles); got {wrong!r}."
            )


@dataclass
class BenchOutcome:
    """A run's JSON payload plus what the plots need.

    Attributes:
        payload: JSON-able results (rows, baselines, notes).
        per_query: method id -> per-query test LDS.
        values: method id -> ``(n_val + n_test, n_train)`` scores.

    Rows of ensembles are keyed by their label, ``"<method> <ensemble>"`` (e.g.
    ``"trak dropout:4"``), in ``per_query`` and ``values``.
    """

    payload: dict[str, Any]
    per_query: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


def _train_losses(setting: Setting, model: torch.nn.Module) -> torch.Tensor:
    x, y = setting.data.train
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none").double()


def run_benchmark(cfg: BenchConfig) -> BenchOutcome:
    """Run every method of ``cfg`` on its setting; see the module docstring.

    Runs with ``cfg.threads`` torch threads (restored afterwards): the model trainings here
    and every method's process. Training results do not depend on it (the recipes gave
    bitwise equal weights with 1 and 2 threads).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg)
    finally:
        torch.set_num_threads(previous)


def _run_benchmark(cfg: BenchConfig) -> BenchOutcome:
    from datatrace.metrics import lds, loo_correlation, mislabel_detection

    setting = cfg.setting
    for ensemble in cfg.ensembles:  # before any training: a bad ensemble fails at once
        ensemble.check(setting)
    notes: list[str] = []
    gt = ground_truth(
        setting, cfg.spec, cache_dir=cfg.cache_dir, workers=cfg.workers, progress=cfg.progress
    )
    protocol = protocol_json(cfg.spec)
    if isinstance(cfg.spec, DropSpec):
        notes.append(
            f"{protocol['protocol']}: the seed-0 run replayed without {cfg.spec.n_dropped(setting.n_train)} "
            f"random examples (loss weight 0, batches kept), {cfg.spec.m} times; deterministic, "
            "so there is no noise ceiling"
        )
    n_val = setting.n_val
    val, test = slice(0, n_val), slice(n_val, None)
    t0 = time.perf_counter()
    model, trajectory = setting.train_trajectory(seed=0)
    seed0_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    random_lds = lds(
        torch.randn(gt.targets.shape[1], setting.n_train, generator=g)[test],
        gt.subsets,
        gt.targets[:, test],
    )
    ceiling = gt.noise_ceiling() if gt.per_seed.shape[1] >= 2 else None
    payload: dict[str, Any] = {
        "setting": setting.to_json(),
        "recipe_hash": setting.recipe_hash(),
        "protocol": protocol["protocol"],
        "ground_truth": protocol,
        "tasks": list(cfg.tasks),
        "threads": cfg.threads,
        "random_lds": random_lds.mean,
        "noise_ceiling": None if ceiling is None else ceiling.mean,
    }

    mislabel_kwargs: dict[str, Any] = {}
    noisy_setting: Setting | None = None  # the flipped-label variant, when the task runs
    flipped: torch.Tensor | None = None
    if "mislabel" in cfg.tasks:
        if setting.kind != "classification":
            notes.append(f"mislabel task skipped: {setting.name} is not a classification setting")
        else:
            mgt = mislabel_ground_truth(setting, cfg.mislabel, cache_dir=cfg.cache_dir)
            payload["mislabel"] = {
                "p": cfg.mislabel.p,
                "seed": cfg.mislabel.seed,
                "n_flipped": int(mgt.flipped.sum()),
                "memorised": mgt.memorised,
                "train_accuracy": mgt.train_accuracy,
                "memorise_overrides": dict(setting.memorise),
                "note": mgt.note(),
            }
            notes.append(mgt.note())
            if mgt.memorised:
                flipped = mgt.flipped
                noisy_setting = mgt.setting
                noisy_model, noisy_trajectory = mgt.train()
                loss_auroc = mislabel_detection(
                    _train_losses(mgt.setting, noisy_model), flipped
                ).auroc
                payload["mislabel"]["training_loss_auroc"] = loss_auroc
                mislabel_kwargs = {
                    "mislabel_labels": mgt.labels,
                    "mislabel_setting": setting.replace(**setting.memorise),
                    "mislabel_state": noisy_model.state_dict(),
                    "mislabel_trajectory": noisy_trajectory,
                }

    loo = None
    if "loo" in cfg.tasks:
        if setting.convex:
            loo = loo_ground_truth(
                setting,
                cfg.loo,
                cache_dir=cfg.cache_dir,
                workers=cfg.workers,
                progress=cfg.progress,
            )
            payload["loo"] = {"n_points": cfg.loo.n_points, "seed": cfg.loo.seed}
        else:
            notes.append(f"LOO task skipped: {setting.name} is not convex")

    recipes: dict[str, Any] = {}
    if any(replays_training(method) for method, _ in cfg.methods):
        # the same seed-0 runs, recorded for replay (the replay checks it ends at their weights)
        try:
            recipes["recipe"] = setting.train_recipe(seed=0)[1]
            if noisy_setting is not None:
                recipes["mislabel_recipe"] = noisy_setting.train_recipe(seed=0)[1]
        except ConfigError as exc:
            notes.append(f"no replay recipe for methods that replay the run: {exc}")

    bank = MemberBank(setting, trajectory, seed0_s)
    runs: list[tuple[str, dict[str, Any] | None, EnsembleSpec | None]] = [
        (method, opts, ensemble)
        for method, opts in cfg.methods
        for ensemble in (None, *cfg.ensembles)
    ]
    rows: list[dict[str, Any]] = []
    per_query: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    bar = progress_bar(runs, desc=f"{setting.name}: methods", enabled=cfg.progress)
    for method, opts, ensemble in bar:
        label = method if ensemble is None else f"{method} {ensemble.label}"
        bar.set_postfix_str(label)
        whole_run = reads_trajectory(method)
        cost: EnsembleCost = (
            bank.plain(whole_run) if ensemble is None else bank.cost(ensemble, whole_run)
        )
        job = MethodJob(
            setting=setting,
            method=method,
            grid=[opts] if opts is not None else grid_for(setting.name, method),
            model_state=model.state_dict(),
            trajectory=trajectory,
            subsets=gt.subsets,
            val_targets=gt.targets[:, val],
            members=cost.members,
            **(mislabel_kwargs if ensemble is None else {}),
            **(recipes if replays_training(method) else {}),
        )
        result: MethodResult = (
            run_method_isolated(job, threads=cfg.threads) if cfg.isolate else run_method(job)
        )
        head: dict[str, Any] = {
            "method": method,
            "label": label,
            "ensemble": None if ensemble is None else ensemble.to_json(),
            "protocol": protocol["protocol"],
        }
        if result.values is None:
            rows.append({**head, "error": result.grid})
            continue
        res = lds(result.values[test], gt.subsets, gt.targets[:, test])
        per_query[label] = res.per_query
        values[label] = result.values
        low, high = res.bootstrap_ci()
        row: dict[str, Any] = {
            **head,
            "setting": result.chosen,
            "val_lds": result.val_lds,
            "lds": res.mean,
            "ci": [low, high],
            "per_query_lds": res.per_query.tolist(),  # for paired comparisons (DESIGN.md §9)
            "train_s": cost.train_s,
            "trainings": cost.trainings,
            "adapters": cost.adapters,
            "fit_s": result.fit_s,
            "attribute_s": result.attribute_s,
            "serve_s": result.fit_s + result.attribute_s,
            "peak_rss_bytes": result.peak_rss,
            "peak_rss_total_bytes": result.peak_rss_total,
            "bytes_stored": result.bytes_stored,
            "weight_bytes": cost.weight_bytes,
            "total_bytes": cost.weight_bytes + result.bytes_stored,
            "grid": result.grid,
        }
        if flipped is not None:
            if ensemble is not None:
                row["mislabel_error"] = "not run for ensembles (members use the clean labels)"
            elif result.self_scores is not None:
                det = mislabel_detection(result.self_scores.double(), flipped)
                row["mislabel_auroc"] = det.auroc
                row["mislabel_auprc"] = det.auprc
            else:
                row["mislabel_error"] = result.mislabel_error
        if loo is not None:
            predicted = result.values[test][:, loo.indices].T.double()
            corr = loo_correlation(predicted, loo.effects[:, test])
            row["loo_pearson"], row["loo_spearman"], row["loo_slope"] = corr
        rows.append(row)
    bar.close()
    payload["rows"] = rows

    if "removal" in cfg.tasks and values:
        from datatrace.bench.brittleness import correct_queries, removal_brittleness

        queries = correct_queries(setting, model, cfg.removal_queries)
        curves = removal_brittleness(
            setting,
            values,
            queries,
            cfg.removal_ks,
            cache_dir=cfg.cache_dir,
            workers=cfg.workers,
            progress=cfg.progress,
        )
        payload["removal"] = {
            "ks": list(cfg.removal_ks),
            "queries": queries.tolist(),
            "fraction_flipped": {m: c.fraction_flipped.tolist() for m, c in curves.items()},
        }
    payload["notes"] = notes
    return BenchOutcome(payload, per_query, values)
