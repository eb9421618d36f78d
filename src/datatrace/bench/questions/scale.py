"""Scale on one machine, and the store's own cost (the ``scale``, ``store-fit`` and
``store-write`` questions).

``scale`` featurizes a synthetic job (:mod:`~datatrace.bench.questions.jobs`) through a store
(shards of about ``datatrace.store.SHARD_BYTES``), each config in its own process (peak memory
is per process, DESIGN.md §9): ``fit``, then the streaming top-10 of 100 queries
(``attributor.topk``, never holding ``n_query x n_train``) and, on the ``mlp1m`` job, the full
``attribute`` of the same queries. Reported: fit seconds and train examples/s, top-k seconds
and scores/s (``n_query x n_train / topk s``), attribute seconds, bytes stored and the
process's peak resident memory (``ru_maxrss``: torch and the data included). One run per
config (a fit of many batches is its own warm-up). Jobs:

- ``mlp1m``: 50,000 examples, MLP 512-1024-512-10 (1,055,242 parameters), TRAK; goal: peak
  under 4 GiB. Dense projections cost ``2 x n_params x proj_dim`` flops per example and
  their 8.6 GB matrix cannot be cached, so ``trak-rademacher`` runs on ``dense_n`` examples.
- ``million``: 1,000,000 examples, MLP 32-64-10 (2,762 parameters); goal: under 8 GiB.
- ``gpt2``: 100,000 sequences through :func:`~datatrace.bench.questions.jobs.tiny_gpt2`,
  ``Task(loss="lm", target="log_prob", module_types="layers")``; goal: under 8 GiB.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from datatrace.bench.digits import mlp
from datatrace.bench.questions.harness import QuestionConfig, peak_rss_mib, run_isolated, timed
from datatrace.bench.questions.jobs import (
    pydoc_sequences,
    teacher_data,
    tiny_gpt2,
    trained_mlp,
)
from datatrace.errors import ConfigError

__all__ = ["ScaleConfig", "StoreFitConfig", "StoreWriteConfig", "scale", "store_fit", "store_write"]

N_QUERY, TOPK = 100, 10


@dataclass(frozen=True)
class _Job:
    build: Callable[[], torch.nn.Module]  # the architecture, to load a prepared state into
    model: Callable[[int], torch.nn.Module]  # n_train -> the model (trained, or random GPT-2)
    train: Callable[[int], Any]
    queries: Callable[[int], Any]  # n_train -> queries
    n_train: int
    goal_gib: int
    configs: dict[str, tuple[str, dict[str, Any]]]  # config -> (method id, settings)
    dense: tuple[str, ...] = ()  # configs that run on dense_n examples
    attribute: bool = False
    task: tuple[tuple[str, Any], ...] = ()


def _trak(projector: str, proj_dim: int, batch_size: int, damped: bool = True) -> tuple[str, Any]:
    # relative damping 1e-3 where the kernel is singular: factored features of a 10-way output
    # layer have rank <= 9 x k_in, and a dense run on fewer examples than proj_dim rank <= n
    settings = {"projector": projector, "proj_dim": proj_dim}
    settings |= {"relative_damping": 1e-3} if damped else {}
    return "trak", settings | {"batch_size": batch_size}


def _random_gpt2(_: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_gpt2()


JOBS = {
    "mlp1m": _Job(
        lambda: mlp(512, (1024, 512), 10),
        lambda n: trained_mlp(512, (1024, 512), n, batch_size=256),
        lambda n: teacher_data(n, 512, seed=1),
        lambda n: teacher_data(N_QUERY, 512, seed=2),
        50_000,
        4,
        {
            "trak-factored": _trak("factored", 1024, 1024),
            "trak-sjlt": _trak("sjlt", 4096, 1024, damped=False),
            "trak-rademacher": _trak("rademacher", 2048, 512),
        },
        dense=("trak-rademacher",),
        attribute=True,
    ),
    "million": _Job(
        lambda: mlp(32, (64,), 10),
        lambda n: trained_mlp(32, (64,), n, batch_size=1024),
        lambda n: teacher_data(n, 32, seed=1),
        lambda n: teacher_data(N_QUERY, 32, seed=2),
        1_000_000,
        8,
        {
            "grad-dot": ("grad-dot", {"batch_size": 8192}),
            "trak-factored": _trak("factored", 256, 8192),
            "if-ekfac": (
                "if-ekfac",
                {"damping": "heuristic", "fisher": "empirical", "batch_size": 8192},
            ),
        },
    ),
    "gpt2": _Job(
        tiny_gpt2,
        _random_gpt2,
        lambda n: pydoc_sequences(n, 0),
        lambda n: pydoc_sequences(N_QUERY, n),
        100_000,
        8,
        {"trak-factored": _trak("factored", 256, 512), "logra": ("logra", {"batch_size": 512})},
        task=(("loss", "lm"), ("target", "log_prob"), ("module_types", "layers")),
    ),
}


def _task(job: _Job, method: str, model: torch.nn.Module) -> Any:
    from datatrace import Task

    options = dict(job.task) or {"target": "margin" if method == "trak" else "loss"}
    return Task(model, **options)


@dataclass(frozen=True)
class ScaleConfig(QuestionConfig):
    """Fit, streaming top-k and peak memory of a large synthetic job through the store.

    Attributes:
        job: ``mlp1m``, ``million`` or ``gpt2``.
        configs: the job's configs to run, comma-separated (default: all of the job's).
        n_train: training examples (default: the job's, 50,000, 1,000,000 or 100,000).
        dense_n: examples of the ``mlp1m`` job's dense-projection config.
        device: the attributors' device (``cuda``: also the peak GPU memory, in the JSON).
    """

    job: Literal["mlp1m", "million", "gpt2"] = "mlp1m"
    configs: tuple[str, ...] = ()
    n_train: int | None = None
    dense_n: int = 1024
    device: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.configs) - set(JOBS[self.job].configs))
        if unknown:
            raise ConfigError(
                f"unknown config(s) {unknown} of job {self.job!r}; its configs are "
                f"{list(JOBS[self.job].configs)}."
            )


def _featurize(
    spec: ScaleConfig, name: str, n: int, state: dict[str, torch.Tensor], store: Path, threads: int
) -> dict[str, Any]:
    """One config in its own process: fit through the store, top-k (and attribute)."""
    from datatrace import make_attributor

    torch.set_num_threads(threads)
    job = JOBS[spec.job]
    method, settings = job.configs[name]
    model = job.build()
    model.load_state_dict(state)
    model.eval()
    task = _task(job, method, model)
    train, queries = job.train(n), job.queries(n)
    rss_data = peak_rss_mib()
    attributor = make_attributor(method, task, store=store, device=spec.device, **settings)
    t_fit, _ = timed(attributor.fit, train)
    rss_fit = peak_rss_mib()
    t_topk, top = timed(attributor.topk, queries, TOPK)
    assert tuple(top.proponent_ids.shape) == (N_QUERY, TOPK)
    row: dict[str, Any] = {"job": spec.job, "config": name, "method": method}
    if job.attribute:
        t_attr, scores = timed(attributor.attribute, queries)
        assert tuple(scores.values.shape) == (N_QUERY, n)
        row["attribute_s"] = t_attr
    if spec.device.startswith("cuda"):  # the peak RSS below is the host's
        row |= {"device": spec.device, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
    assert attributor.store is not None
    row |= {"settings": settings, "n_train": n, "n_params": task.num_tracked, "fit_s": t_fit}
    row |= {"train_per_s": n / t_fit, "topk_s": t_topk, "scores_per_s": N_QUERY * n / t_topk}
    row |= {"store_bytes": attributor.store.nbytes(), "peak_rss_mib_after_data": rss_data}
    row |= {"peak_rss_mib_after_fit": rss_fit, "peak_rss_mib": peak_rss_mib()}
    return row | {"threads": torch.get_num_threads(), "torch": torch.__version__}


def scale(config: ScaleConfig) -> list[dict[str, Any]]:
    """Run ``scale`` (module docstring); prints one table row per config, returns the rows."""
    job = JOBS[config.job]
    n = config.n_train or job.n_train
    configs = config.configs or tuple(job.configs)
    t_prep, model = timed(job.model, n)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"job {config.job}: {n:,} training examples, {n_params:,} parameters; model "
        f"prepared in {t_prep:.1f} s"
    )
    print(
        f"| config | method | settings | n_train | fit s | train ex/s | top-10 s | attribute s | "
        f"scores/s | stored MiB | peak RSS MiB | < {job.goal_gib} GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="datatrace-scale-") as tmp:
        for name in configs:
            n_run = config.dense_n if name in job.dense else n
            store = Path(tmp) / f"store-{name}"
            threads = torch.get_num_threads()
            r = run_isolated(_featurize, config, name, n_run, state, store, threads)
            rows.append({"config": name, **r})
            if "error" in r:
                print(f"| {name} | failed: {r['error']} |", flush=True)
                continue
            kw = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            attr = f"{r['attribute_s']:.2f}" if "attribute_s" in r else "—"
            goal = "yes" if r["peak_rss_mib"] < job.goal_gib * 1024 else "no"
            print(
                f"| {name} | {r['method']} | {kw} | {r['n_train']:,} | {r['fit_s']:.1f} | "
                f"{r['train_per_s']:,.0f} | {r['topk_s']:.2f} | {attr} | {r['scores_per_s']:.3g} | "
                f"{r['store_bytes'] / 2**20:,.0f} | {r['peak_rss_mib']:,.0f} | {goal} |",
                flush=True,
            )
    return rows


@dataclass(frozen=True)
class StoreFitConfig(QuestionConfig):
    """``fit`` with ``store=`` vs in memory, back to back in one process (issue 21).

    The ``million`` job of ``scale`` at ``n_train`` examples, one of its configs (default
    TRAK, factored 16x16 per layer) at ``batch_size``, once in memory and once writing its
    features through a fresh store, alternating which goes first. Reported: seconds per
    variant, shard files and bytes stored, and the best of each with their ratio (goal: the
    store at most 1.3x in memory).

    Attributes:
        n_train: training examples.
        config: a config of the ``million`` job.
        batch_size: the attributor's batch size.
        repeats: pairs of runs (the order alternates).
    """

    n_train: int = 200_000
    config: Literal["grad-dot", "trak-factored", "if-ekfac"] = "trak-factored"
    batch_size: int = 64
    repeats: int = 1


def store_fit(config: StoreFitConfig) -> dict[str, Any]:
    """Run ``store-fit``; prints each run and the best of each variant."""
    from datatrace import make_attributor

    job = JOBS["million"]
    model, train = job.model(config.n_train), job.train(config.n_train)
    method, settings = job.configs[config.config]
    task = _task(job, method, model)
    settings = {**settings, "batch_size": config.batch_size}
    print(
        f"{config.config}, {config.n_train:,} examples, batch {config.batch_size}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    times: dict[str, list[float]] = {"memory": [], "store": []}
    with tempfile.TemporaryDirectory(prefix="datatrace-store-fit-") as tmp:
        for r in range(config.repeats):
            for variant in ["memory", "store"][:: 1 if r % 2 == 0 else -1]:
                store = Path(tmp) / f"store-{r}" if variant == "store" else None
                attr = make_attributor(method, task, store=store, **settings)
                times[variant].append(timed(attr.fit, train)[0])
                extra = ""
                if store is not None:
                    shards = list(store.glob("shard-*.npy"))
                    size = sum(f.stat().st_size for f in shards)
                    extra = f"  {len(shards)} shard files, {size / 2**20:,.0f} MiB"
                print(f"  {variant:6s} fit {times[variant][-1]:7.2f} s{extra}", flush=True)
                del attr
    mem, st = min(times["memory"]), min(times["store"])
    print(
        f"best: memory {mem:.2f} s, store {st:.2f} s, ratio {st / mem:.2f}x "
        f"(load {os.getloadavg()[0]:.1f})"
    )
    return {"config": config.config, "n_train": config.n_train, "seconds": times}


@dataclass(frozen=True)
class StoreWriteConfig(QuestionConfig):
    """Write many small shards to a store: the cost per shard must not grow with the count.

    Prints the total and last-quarter seconds at each quarter, then the time to reopen the
    store (which folds the journal into the manifest).

    Attributes:
        shards: shards written.
        rows: rows per shard.
        dim: float32 columns per shard.
    """

    shards: int = 800
    rows: int = 64
    dim: int = 256


def store_write(config: StoreWriteConfig) -> dict[str, Any]:
    """Run ``store-write``."""
    from datatrace.store import Store

    quarters = []
    with tempfile.TemporaryDirectory() as d:
        store = Store(d, config={"bench": 1}, fingerprints={"m": "x"})
        x = torch.randn(config.rows, config.dim)
        start = last = time.perf_counter()
        for i in range(config.shards):
            store.write_shard("train-m0", i, x, f"fp{i}")
            if (i + 1) % max(1, config.shards // 4) == 0:
                now = time.perf_counter()
                quarters.append(now - last)
                print(
                    f"{i + 1:6d} shards  total {now - start:6.2f} s  "
                    f"last quarter {now - last:5.2f} s"
                )
                last = now
        reopen, _ = timed(Store, d, config={"bench": 1}, fingerprints={"m": "x"})
    print(f"reopen (folds the journal into the manifest): {reopen:.3f} s")
    return {"quarters_s": quarters, "total_s": last - start, "reopen_s": reopen}
