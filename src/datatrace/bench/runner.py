"""Run one attribution method on a setting, in its own process, and measure what it cost.

``datatrace bench`` hands every method to :func:`run_method_isolated`: a fresh process
(``multiprocessing`` spawn) rebuilds the trained model from its weights, scores each point of
the method's grid on the validation queries (DESIGN.md §9), keeps the best and, when the
mislabel task runs, fits the chosen setting on the flipped-label model and returns its
self-influence. Running each method alone in a process makes its peak memory its own:

- **peak memory** (``peak_rss``) is the process's peak resident set size (``ru_maxrss``)
  during the grid search, minus the resident size measured just before it (after importing
  torch and rebuilding the data and model). It counts everything the method allocates on
  the CPU (torch tensors, NumPy arrays, Python objects) at its high-water mark, for the most
  expensive grid point. The absolute peak is kept as ``peak_rss_total``.
- **bytes stored** (``bytes_stored``) is the size of the fitted state the method keeps for
  ``attribute``: its train features and fitted tensors (curvature, kernel inverses), summed
  over members, for the chosen grid point: what its store directory would hold.

Times are wall seconds of ``fit`` and ``attribute`` of the chosen grid point, single cold runs.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import torch

from datatrace.bench.settings import Setting
from datatrace.errors import DatatraceError
from datatrace.replay import TrainingRecipe
from datatrace.task import Checkpoint, Member

__all__ = [
    "MethodJob",
    "MethodResult",
    "layer_params_only",
    "reads_trajectory",
    "replays_training",
    "run_method",
    "run_method_isolated",
]


def _method_class(method: str) -> Any:
    from datatrace.methods import METHODS

    entry = METHODS.get(method)
    return None if entry is None else entry[0]


def replays_training(method: str) -> bool:
    """Whether ``method`` replays the training run (``unrolled``): it gets the run's recipe."""
    cls = _method_class(method)
    return cls is not None and cls.replays_training


def reads_trajectory(method: str) -> bool:
    """Whether ``method`` reads every checkpoint (TracIn, Source): its task gets the run's."""
    cls = _method_class(method)
    return cls is not None and cls.reads_trajectory


def layer_params_only(method: str) -> bool:
    """Whether ``method``'s curvature covers Linear/Conv2d layers only (K-FAC factors), with
    its registered settings: on models with other parameters (embeddings, LayerNorm) the
    bench attributes through those layers' parameters, as kronfluence does."""
    from datatrace.methods import METHODS

    cls = _method_class(method)
    return cls is not None and cls.layer_params_only(METHODS[method][1])


@dataclass(frozen=True)
class MethodJob:
    """Everything one method's run needs; it travels pickled to the worker process.

    Attributes:
        setting: the setting (its fields; data is rebuilt in the worker).
        method: method id (DESIGN.md §8).
        grid: settings to try; the best validation LDS wins.
        model_state: weights of the trained model (seed 0).
        trajectory: its checkpoints (TracIn reads them).
        subsets: ``(m, n_train)`` bool LDS subsets.
        val_targets: ``(m, n_val)`` ground-truth targets of the validation queries.
        mislabel_labels: noisy training labels of the mislabel variant, or None (no task).
        mislabel_setting: the mislabel variant's setting (clean data; labels re-applied).
        mislabel_state: weights of the model trained on the noisy labels.
        mislabel_trajectory: its checkpoints.
        batch_size: batch size of the attributor.
        members: ``members=`` of the attributor (an ensemble; see
            :mod:`datatrace.bench.ensembles`), or None for the plain method on the model.
        recipe: the replay recipe of the trained model (methods that replay the run).
        mislabel_recipe: the replay recipe of the mislabel variant's model.
    """

    setting: Setting
    method: str
    grid: Sequence[Mapping[str, Any]]
    model_state: Mapping[str, torch.Tensor]
    trajectory: Sequence[Checkpoint]
    subsets: torch.Tensor
    val_targets: torch.Tensor
    mislabel_labels: torch.Tensor | None = None
    mislabel_setting: Setting | None = None
    mislabel_state: Mapping[str, torch.Tensor] | None = None
    mislabel_trajectory: Sequence[Checkpoint] = ()
    batch_size: int = 256
    members: Sequence[Member] | None = None
    recipe: TrainingRecipe | None = None
    mislabel_recipe: TrainingRecipe | None = None


@dataclass
class MethodResult:
    """What one method's run produced (``values`` None when every grid point failed).

    Attributes:
        method: method id.
        values: ``(n_val + n_test, n_train)`` scores of the chosen grid point.
        chosen: the chosen grid point.
        val_lds: its validation LDS.
        grid: every grid point with its validation LDS or error.
        fit_s: seconds of ``fit`` (chosen point).
        attribute_s: seconds of ``attribute`` (chosen point).
        bytes_stored: bytes of fitted state kept for ``attribute`` (chosen point).
        peak_rss: peak resident bytes above the process's size before the grid search, or
            None when not run in its own process.
        peak_rss_total: the process's absolute peak resident bytes, or None.
        self_scores: ``(n_train,)`` self-influence on the flipped-label model, or None.
        mislabel_error: why self-influence failed, if it did.
    """

    method: str
    values: torch.Tensor | None = None
    chosen: dict[str, Any] = field(default_factory=dict)
    val_lds: float = float("nan")
    grid: list[dict[str, Any]] = field(default_factory=list)
    fit_s: float = float("nan")
    attribute_s: float = float("nan")
    bytes_stored: int = 0
    peak_rss: int | None = None
    peak_rss_total: int | None = None
    self_scores: torch.Tensor | None = None
    mislabel_error: str | None = None


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def fitted_bytes(attributor: Any) -> int:
    """Bytes of the train features and fitted tensors an attributor keeps (not the model)."""
    seen: set[int] = set()
    total = 0
    for ctx in getattr(attributor, "_contexts", []):
        total += _tensor_bytes(ctx.features, seen) + _tensor_bytes(ctx.method_state, seen)
    store = getattr(attributor, "store", None)
    if store is not None:
        total += int(store.nbytes())
    return total


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # pragma: no cover - not Linux
        return 0


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _model(setting: Setting, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = setting.build_model(0)
    model.load_state_dict(dict(state))
    return model.eval()


def _attributor(
    setting: Setting,
    model: Any,
    trajectory: Sequence[Checkpoint],
    job: MethodJob,
    opts: Any,
    recipe: TrainingRecipe | None = None,
) -> Any:
    from datatrace.methods import make_attributor

    checkpoints = list(trajectory) if reads_trajectory(job.method) else None
    options: dict[str, Any] = {"checkpoints": checkpoints}
    if layer_params_only(job.method):  # as kronfluence: the Linear/Conv2d layers' parameters
        options["module_types"] = (torch.nn.Linear, torch.nn.Conv2d)
    task = setting.make_task(model, **options)
    extra: dict[str, Any] = {"recipe": recipe} if replays_training(job.method) else {}
    # the benchmark draws its own bar over the methods; a method's bars only on request
    settings = {"progress": False, **extra, **dict(opts)}
    return make_attributor(
        job.method, task, members=job.members, batch_size=job.batch_size, **settings
    )


def run_method(job: MethodJob, measure_memory: bool = False) -> MethodResult:
    """Run ``job`` in this process (see the module docstring for what is measured)."""
    from datatrace.metrics import lds

    setting = job.setting
    model = _model(setting, job.model_state)
    train, queries = setting.data.train, setting.data.queries("all")
    n_val = setting.n_val
    result = MethodResult(job.method)
    rss_before = _rss_now()
    best_lds = -float("inf")
    for candidate in job.grid:
        try:
            attributor = _attributor(setting, model, job.trajectory, job, candidate, job.recipe)
            t0 = time.perf_counter()
            attributor.fit(train)
            t1 = time.perf_counter()
            values = attributor.attribute(queries).values.detach()
            t2 = time.perf_counter()
        except Exception as exc:  # a failing method (even a bug) must not lose the others
            message = (
                str(exc) if isinstance(exc, DatatraceError) else f"{type(exc).__name__}: {exc}"
            )
            result.grid.append({"setting": dict(candidate), "error": message})
            continue
        v = lds(values[:n_val], job.subsets, job.val_targets).mean
        result.grid.append({"setting": dict(candidate), "val_lds": v})
        if result.values is None or v > best_lds:
            best_lds = v
            result.values, result.chosen, result.val_lds = values, dict(candidate), v
            result.fit_s, result.attribute_s = t1 - t0, t2 - t1
            result.bytes_stored = fitted_bytes(attributor)
        del attributor
    if measure_memory:
        total = _peak_rss()
        result.peak_rss_total, result.peak_rss = total, max(0, total - rss_before)
    if result.values is not None and job.mislabel_labels is not None:
        from datatrace.bench.mislabel import with_train_labels

        assert job.mislabel_setting is not None and job.mislabel_state is not None
        variant = with_train_labels(job.mislabel_setting, job.mislabel_labels)
        flipped_model = _model(variant, job.mislabel_state)
        try:
            attributor = _attributor(
                variant,
                flipped_model,
                job.mislabel_trajectory,
                job,
                result.chosen,
                job.mislabel_recipe,
            )
            result.self_scores = attributor.fit(variant.data.train).self_attribute().detach()
        except Exception as exc:  # reported in the table, like a failed grid point
            result.mislabel_error = (
                str(exc) if isinstance(exc, DatatraceError) else f"{type(exc).__name__}: {exc}"
            )
    return result


def run_method_isolated(job: MethodJob, threads: int | None = None) -> MethodResult:
    """Run ``job`` in a fresh spawned process and measure its peak memory there.

    Args:
        job: the run.
        threads: torch threads of the process (default: this process's count).
    """
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_in_worker, job, threads or torch.get_num_threads()).result()


def _run_in_worker(job: MethodJob, threads: int) -> MethodResult:
    # One thread by default (BenchConfig.threads): see datatrace.bench.benchmark.
    torch.set_num_threads(threads)
    return run_method(job, measure_memory=True)
