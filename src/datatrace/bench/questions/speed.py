"""Speed on the legacy digits MLPs (the ``speed-grads`` and ``speed-methods`` questions).

``speed-grads`` (goal: at most 3x): for ``n`` digits inputs and an untrained MLP (``small``
64-128-64-10, ``wide`` 64-512-512-10) it times, per batch size, one plain
``cross_entropy(model(x), y).backward()`` per batch (the baseline) and the hook engine's
per-sample gradients (``compute_per_sample_grads``) followed by each projector's
``project(psg)``. The projection matrices are built in the warm-up run (cached up to the
projector's ``cache_bytes``, as in ``fit``). Cost model: a plain step costs about
``6 n_params`` flops per example, a dense projection ``2 n_params k`` more (a ratio of at least
``k / 3``); SJLT touches every gradient coordinate (memory-bound); the factored (LoGra)
projector never forms the gradient.

``speed-methods`` (goal: well under one second): fit + attribute of Grad-Cos and TRAK with
``n_train`` training and ``n_query`` query digits, the MLP trained by ``train_digits_mlp``
(17,226 parameters), one member, in-memory features. Each row times a fresh attributor's
``fit(train)`` and then ``attribute(queries)`` (the projector is built in ``fit``, as a user
would run it). Dense projections cost ``2 x 1,200 x 17,226 x proj_dim`` flops, 85 GFLOP at
proj_dim 2048, plus generating the matrix once per fit.

Times are medians of warm repeated runs (DESIGN.md §9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from datatrace.bench.digits import digits_mlp, load_digits_split, train_digits_mlp
from datatrace.bench.questions.harness import QuestionConfig, median_time, timed, warm_medians

__all__ = ["SpeedGradsConfig", "SpeedMethodsConfig", "speed_grads", "speed_methods"]

GOAL = 3.0
HIDDEN = {"small": (128, 64), "wide": (512, 512)}


@dataclass(frozen=True)
class SpeedGradsConfig(QuestionConfig):
    """Per-sample gradients + projection vs one plain forward/backward (goal: at most 3x).

    Attributes:
        repeats: timed runs per row (after one warm-up).
        quick: one repeat and the largest of ``proj_dims`` only.
        models: ``small`` and/or ``wide``.
        n: digits inputs.
        batch_sizes: batch sizes.
        proj_dims: k of SJLT and, on models under 100,000 parameters, of the dense projections
            (the wide MLP's dense rows use k=128 only: at k=1024 its 1.2 GB matrix exceeds the
            256 MiB chunk cache and is regenerated every batch).
    """

    repeats: int = 3
    quick: bool = False
    models: tuple[Literal["small", "wide"], ...] = ("small", "wide")
    n: int = 1000
    batch_sizes: tuple[int, ...] = (100, 1000)
    proj_dims: tuple[int, ...] = (128, 1024)


def _projectors(config: SpeedGradsConfig, n_params: int) -> list[tuple[str, Any, int]]:
    """(label, kind, proj_dim) of the projectors compared."""
    dims = config.proj_dims[-1:] if config.quick else config.proj_dims
    out = [(f"sjlt k={k}", "sjlt", k) for k in dims]
    for k in dims if n_params < 100_000 else [128]:
        out += [(f"gaussian k={k}", "gaussian", k), (f"rademacher k={k}", "rademacher", k)]
    return [
        *out,
        ("factored 16x16/layer", "factored", 256),
        ("factored 32x32/layer", "factored", 1024),
    ]


def speed_grads(config: SpeedGradsConfig) -> list[dict[str, Any]]:
    """Run ``speed-grads``; prints one table row per measurement, returns the rows."""
    from datatrace import Task
    from datatrace.gradients import compute_per_sample_grads
    from datatrace.projection import make_projector

    repeats = 1 if config.quick else config.repeats
    (x, y), _ = load_digits_split()
    x, y = x[: config.n], y[: config.n]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {config.n} examples")
    print("| model | batch | per-sample path | plain fwd+bwd ms | ms | ratio | <= 3x |")
    print("|---|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    for name in config.models:
        model = digits_mlp(HIDDEN[name], seed=0).eval()
        task = Task(model)
        n_params = sum(p.numel() for p in model.parameters())
        arch = "-".join(str(w) for w in (64, *HIDDEN[name], 10))
        for bs in config.batch_sizes:
            batches = list(zip(x.split(bs), y.split(bs), strict=True))

            def plain(batches: list = batches, model: Any = model) -> None:
                for xb, yb in batches:
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xb), yb).backward()

            base = median_time(plain, repeats=repeats)
            for label, kind, k in [
                ("per-sample factors only", "", 0),
                *_projectors(config, n_params),
            ]:
                project = make_projector(kind, k, seed=0).project if kind else lambda p: p

                def run(batches: list = batches, project: Any = project, task: Any = task) -> None:
                    for b in batches:
                        project(compute_per_sample_grads(task, b))

                t = median_time(run, repeats=repeats)
                row = {"model": arch, "n_params": n_params, "batch_size": bs, "what": label}
                row |= {"seconds": t, "plain_seconds": base, "ratio": t / base}
                rows.append(row | {"goal_holds": t / base <= GOAL})
                print(
                    f"| {arch} | {bs} | {label} | {base * 1e3:.1f} | {t * 1e3:.1f} | "
                    f"{t / base:.1f}x | {'yes' if t / base <= GOAL else 'no'} |",
                    flush=True,
                )
    return rows


# (label, method id, settings); TRAK's defaults are projector="rademacher", proj_dim=2048.
# With proj_dim near or above n_train (or the factored projector, whose output-layer block
# has rank <= 10 x k_in) the kernel is singular and the default relative_damping=1e-6 can fail
# in float32: those rows are also run with relative_damping=1e-3 (same cost).
R3 = {"relative_damping": 1e-3}
FACTORED = {"projector": "factored"}
METHOD_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("grad-cos (default: no projection)", "grad-cos", {}),
    ("grad-cos, sjlt 1024", "grad-cos", {"projector": "sjlt", "proj_dim": 1024}),
    ("trak (default: rademacher 2048)", "trak", {}),
    ("trak, rademacher 2048, rel. damping 1e-3", "trak", R3),
    ("trak, rademacher 1024, rel. damping 1e-3", "trak", {"proj_dim": 1024, **R3}),
    ("trak, rademacher 512", "trak", {"proj_dim": 512}),
    ("trak, rademacher 256", "trak", {"proj_dim": 256}),
    ("trak, gaussian 512", "trak", {"projector": "gaussian", "proj_dim": 512}),
    ("trak, sjlt 2048, rel. damping 1e-3", "trak", {"projector": "sjlt", **R3}),
    ("trak, sjlt 512", "trak", {"projector": "sjlt", "proj_dim": 512}),
    ("trak, factored 16x16/layer (768), rel. 1e-3", "trak", {**FACTORED, "proj_dim": 256, **R3}),
    ("trak, factored 32x32/layer (3072), rel. 1e-3", "trak", {**FACTORED, "proj_dim": 1024, **R3}),
]


@dataclass(frozen=True)
class SpeedMethodsConfig(QuestionConfig):
    """Fit + attribute seconds of Grad-Cos and TRAK on the digits MLP (goal: well under 1 s).

    Attributes:
        repeats: timed runs per row (after one warm-up).
        n_train: the first training digits (the MLP is trained on them).
        n_query: the first test digits.
        methods: rows of these method ids only.
    """

    repeats: int = 3
    n_train: int = 1000
    n_query: int = 200
    methods: tuple[Literal["grad-cos", "trak"], ...] = ("grad-cos", "trak")


def speed_methods(config: SpeedMethodsConfig) -> list[dict[str, Any]]:
    """Run ``speed-methods``; prints one table row per setting, returns the rows."""
    from datatrace import Task, make_attributor

    (x, y), (xq, yq) = load_digits_split()
    train = (x[: config.n_train], y[: config.n_train])
    queries = (xq[: config.n_query], yq[: config.n_query])
    model = train_digits_mlp(train, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {config.n_train} train "
        f"x {config.n_query} queries, MLP 64-128-64-10 ({n_params} params)"
    )
    print("| method (settings) | fit s | attribute s | total s | < 1 s |")
    print("|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    for label, method, kw in METHOD_ROWS:
        if method not in config.methods:
            continue

        def run(method: str = method, kw: dict[str, Any] = kw) -> dict[str, float]:
            attributor = make_attributor(method, Task(model, target="margin"), **kw)
            t_fit, _ = timed(attributor.fit, train)
            t_attr, _ = timed(attributor.attribute, queries)
            return {"fit": t_fit, "attribute": t_attr, "total": t_fit + t_attr}

        try:
            t = warm_medians(run, config.repeats)
        except Exception as exc:  # report, e.g. a kernel that is not positive definite
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            print(f"| {label} | fails | | | {msg} |", flush=True)
            rows.append({"setting": label, "method": method, "kw": kw, "error": msg})
            continue
        print(
            f"| {label} | {t['fit']:.3f} | {t['attribute']:.3f} | {t['total']:.3f} | "
            f"{'yes' if t['total'] < 1.0 else 'no'} |",
            flush=True,
        )
        rows.append({"setting": label, "method": method, "kw": kw, **t})
    return rows
