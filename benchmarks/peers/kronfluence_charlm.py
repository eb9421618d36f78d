"""datatrace's EK-FAC influence next to kronfluence's on the ``pydoc-charlm`` transformer.

    .venv/bin/python benchmarks/peers/kronfluence_charlm.py --json out/kronfluence_charlm.json

The registered setting's data, its seed-0 model (``common.seed0_model``) and its cached LDS
ground truth (``--m`` x ``--seeds``; ``--allow-retraining`` retrains it, 12+ minutes).
kronfluence 1.0.1 runs in its own venv (``/tmp/peer-kronfluence``) through
``peer_runner.py``, which rebuilds the model without datatrace. Both sides track the same
layers (pydoc-charlm: the 13 ``nn.Linear``; ``--setting pydoc-gpt2``: the 8 block
projections, kronfluence on ``Conv1D`` converted to ``nn.Linear``) with EK-FAC on the true
Fisher, one sampled label per predicted token (ours ``fisher="true", fisher_samples=1``).
Damping: kronfluence at its default 1e-8 and its heuristic (``None``); ours chosen on the
validation queries from ``--damping-grid`` (DESIGN.md §9) for every ``--curvature-examples``
value (counts, fractions or ``all``), plus a row with the README defaults. Reported on the
test queries: LDS [95% CI] of both, the paired interval of ours - kronfluence, Spearman, and
fit + attribute seconds (medians of ``--repeats`` warm runs after ``--warmup``) at every
``--threads`` count, ours then kronfluence back to back, with the passes over the training
set (``1 + 2 f`` for a curvature fraction ``f``). Details: docs/peers.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers.common import (
    cached_ground_truth,
    compare,
    kronfluence_ekfac,
    seed0_model,
    setup_peer,
)
from benchmarks.peers.runner import timed
from datatrace import make_attributor
from datatrace.bench.cache import GroundTruthSpec
from datatrace.bench.groundtruth import noise_ceiling
from datatrace.bench.runner import fitted_bytes
from datatrace.bench.settings import Setting, get_setting
from datatrace.errors import NumericalError
from datatrace.metrics import lds

README_DEFAULTS = "readme-defaults"  # our row with make_attributor("if-ekfac", task)
KRONFLUENCE_DAMPING = 1e-8  # kronfluence 1.0.1 ScoreArguments.damping_factor default


def parse_damping(text: str) -> float | str:
    return text if text == "heuristic" else float(text)


def parse_curvature_examples(text: str) -> int | float | None:
    """``all`` (or ``none``): every example; ``0.1``: a fraction; ``400``: a count."""
    if text.lower() in ("all", "none"):
        return None
    return float(text) if any(c in text for c in ".eE") else int(text)


def data_passes(curvature_examples: int | float | None, n_train: int) -> float:
    """Passes over the training set of one fit + attribute: covariance and eigenvalue passes
    over the curvature subset, one scoring (or featurizing) pass over every example."""
    if curvature_examples is None:
        return 3.0
    m = curvature_examples
    if isinstance(m, float):
        m = max(1, round(m * n_train))
    return 1 + 2 * min(m, n_train) / n_train


def model_side(setting: Setting, model: nn.Module) -> dict[str, Any]:
    """What differs between the settings: the model the runner rebuilds, our ``module_types``
    and the parameters both sides track (kronfluence: every tracked module's)."""
    if setting.name == "pydoc-gpt2":
        cfg: Any = model.config
        keys: tuple[str, ...] = (
            "vocab_size",
            "n_positions",
            "n_embd",
            "n_layer",
            "n_head",
            "bos_token_id",
        )
        keys += ("eos_token_id", "resid_pdrop", "embd_pdrop", "attn_pdrop")
        kinds: tuple[str, ...] = ("Conv1D",)  # the block projections; not the tied LM head
        side: dict[str, Any] = {"model": "gpt2", "arch": {k: getattr(cfg, k) for k in keys}}
        side.update(module_types="layers", layers=f"{4 * cfg.n_layer} Conv1D")
    else:
        kinds = ("Linear",)
        keys = ("chunk_len", "d_model", "n_heads", "n_layers")
        arch = {k.replace("chunk_len", "max_len"): getattr(setting, k) for k in keys}
        vocab = len(setting.vocab)  # type: ignore[attr-defined]
        side = {"model": "charlm", "arch": {"vocab_size": vocab, **arch}}
        side.update(module_types=(nn.Linear,), layers="13 Linear")
    side["expected"] = {
        f"{name}.{p}"
        for name, mod in model.named_modules()
        if type(mod).__name__ in kinds
        for p, _ in mod.named_parameters()
    }
    return side


def fit_ours(task: Any, train: Any, damping: float | str, args: Any, ce: int | float | None) -> Any:
    """Our EK-FAC influence matched to kronfluence's defaults (true Fisher, one label), fit."""
    options = {"fisher": "true", "fisher_samples": 1, "batch_size": args.batch_size, "seed": 0}
    options.update(curvature_examples=ce, train_features=args.train_features)
    return make_attributor("if-ekfac", task, damping=damping, **options).fit(train)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--setting", default="pydoc-charlm", choices=["pydoc-charlm", "pydoc-gpt2"])
    add("--threads", default="1,2", help="comma-separated torch thread counts")
    add("--repeats", type=int, default=3, help="timed runs (median)")
    add("--warmup", type=int, default=1, help="untimed runs before them")
    add("--batch-size", type=int, default=64, help="chunks per batch (both)")
    add("--damping-grid", default="1e-8,1e-4,1e-3,1e-2,1e-1,heuristic",
        help="our dampings tried on the validation queries (numbers or 'heuristic')")  # fmt: skip
    add("--dtype", default="float32", choices=["float32", "float64"], help="our model's dtype "
        "(float64 admits dampings below float32 resolution); kronfluence runs float32")  # fmt: skip
    add("--curvature-examples", default="all", help="comma-separated curvature_examples of "
        "ours: counts (400), fractions (0.1) or 'all'; each gets its own damping choice, LDS "
        "rows and timed runs")  # fmt: skip
    add("--train-features", default="auto", choices=["auto", "factored", "recompute"],
        help="ours: keep the training factors or recompute them when scoring")  # fmt: skip
    add("--m", type=int, default=20, help="LDS subsets of the cached ground truth")
    add("--seeds", type=int, default=2, help="retrainings per subset")
    add("--allow-retraining", action="store_true")
    add("--venv-root", type=Path, default=Path(tempfile.gettempdir()))
    add("--peer-timeout", type=float, default=3600.0, help="seconds per runner")
    add("--json", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    grid = [parse_damping(t) for t in args.damping_grid.split(",") if t]
    # "all" -> None; keys are the values as written (table and JSON)
    subsets = {t: parse_curvature_examples(t) for t in args.curvature_examples.split(",") if t}

    load_before = os.getloadavg()
    py = setup_peer("kronfluence", args.venv_root)
    torch.set_num_threads(thread_counts[0])
    setting = get_setting(args.setting)
    gt = cached_ground_truth(
        setting, GroundTruthSpec(m=args.m, seeds=args.seeds), args.allow_retraining
    )
    n_val = setting.n_val
    model = seed0_model(setting)
    side = model_side(setting, model)
    # nn.Module.to works in place: kronfluence gets the untouched float32 weights
    ours_model = copy.deepcopy(model).to(torch.float64) if args.dtype == "float64" else model
    train, q_test = setting.data.train, setting.data.test_queries
    task = setting.make_task(ours_model, module_types=side["module_types"])
    if set(task.tracked_params()) != side["expected"]:  # kronfluence tracks exactly these
        raise RuntimeError(
            f"tracked {sorted(task.tracked_params())}, expected {sorted(side['expected'])}"
        )
    n_params = sum(p.numel() for p in task.tracked_params().values())
    test_targets = gt.targets[:, n_val:]
    g = torch.Generator().manual_seed(0)
    random_lds = lds(
        torch.randn(setting.n_test, setting.n_train, generator=g, dtype=torch.float64),
        gt.subsets,
        test_targets,
    )

    def val_lds(values: torch.Tensor) -> float:
        return lds(values[:n_val], gt.subsets, gt.targets[:, :n_val]).mean

    # ---- our damping, chosen on the validation queries (test scores kept for the table),
    # for every curvature subset
    scored: dict[str, dict[str, float | str]] = {}
    test_scores: dict[tuple[str, str], torch.Tensor] = {}
    chosen: dict[str, str] = {}
    shown: dict[str, list[str]] = {}
    for key, ce in subsets.items():
        scored[key] = {}
        for damping in grid:
            try:
                attr = fit_ours(task, train, damping, args, ce)
            except NumericalError as exc:  # e.g. 1e-8 is below float32 resolution: refused
                scored[key][str(damping)] = f"refused: {exc}"
                print(f"[datatrace] curvature {key}, damping {damping}: {exc}", flush=True)
                continue
            values = attr.attribute(setting.data.queries("all")).values
            scored[key][str(damping)], test_scores[key, str(damping)] = (
                val_lds(values),
                values[n_val:],
            )
            print(
                f"[datatrace] curvature {key}, damping {damping}: validation LDS "
                f"{scored[key][str(damping)]:.3f}",
                flush=True,
            )
        fitted = [d for (k, d) in test_scores if k == key]
        chosen[key] = max(fitted, key=lambda d: float(scored[key][d]))
        # our rows of the LDS table: the heuristic (kronfluence's other damping) and the chosen
        shown[key] = [d for d in dict.fromkeys(["heuristic", chosen[key]]) if d in fitted]
    # the README defaults (empirical Fisher, heuristic damping), and the bytes EK-FAC keeps
    attr = make_attributor("if-ekfac", task, batch_size=args.batch_size).fit(train)
    bytes_stored = fitted_bytes(attr)
    values = attr.attribute(setting.data.queries("all")).values
    readme_val = val_lds(values)
    test_scores[README_DEFAULTS, "heuristic"] = values[n_val:]
    shown[README_DEFAULTS] = ["heuristic"]
    print(f"[datatrace] README defaults: validation LDS {readme_val:.3f}", flush=True)

    # ---- timed runs, ours then kronfluence, at every thread count
    ours: dict[int, dict[str, dict[str, Any]]] = {}
    peer: dict[int, dict[str, Any]] = {}
    loads: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="datatrace-kfx-charlm-") as tmp:
        inputs = Path(tmp) / "inputs.pt"
        with torch.no_grad():
            query_log_prob = setting.measure(model, q_test).detach()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        data = {"model": side["model"], "arch": side["arch"], "members": [state]}
        data.update(train_ids=train["input_ids"], query_ids=q_test["input_ids"])
        torch.save({**data, "query_check": query_log_prob, "check_atol": 1e-3}, inputs)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            loads[threads] = list(os.getloadavg())
            # the cost does not depend on the damping: the chosen one is timed
            ours[threads] = {}
            for key, ce in subsets.items():
                t0 = time.perf_counter()
                damping = parse_damping(chosen[key])
                ours[threads][key] = timed(
                    lambda: fit_ours(task, train, damping, args, ce),  # noqa: B023
                    lambda attr: attr.attribute(q_test).values,
                    args.repeats,
                    args.warmup,
                )
                print(
                    f"[datatrace] {threads} thread(s), curvature {key}, damping {chosen[key]}: "
                    f"{time.perf_counter() - t0:.1f}s",
                    flush=True,
                )
            spec = {"threads": threads, "batch_size": args.batch_size, "repeats": args.repeats}
            spec.update(warmup=args.warmup, dampings=[KRONFLUENCE_DAMPING, None])
            out = kronfluence_ekfac(py, inputs, spec, args.peer_timeout, f"{threads} thread(s)")
            (run,) = out["results"]["if-ekfac"]
            out["rows"] = {repr(KRONFLUENCE_DAMPING): run, **run["more"]}
            peer[threads] = out

    first = thread_counts[0]
    # what the timed configuration keeps after fit (curvature, and factors unless recomputed)
    timed_bytes = {
        key: fitted_bytes(fit_ours(task, train, parse_damping(chosen[key]), args, ce))
        for key, ce in subsets.items()
    }
    rows = []
    for threads, out in peer.items():
        for kron_damping, kron in out["rows"].items():
            for key in shown:
                for damping in shown[key]:
                    row = {
                        "kronfluence_threads": threads,
                        "kronfluence_damping": kron_damping,
                        "ours_curvature_examples": key,
                        "ours_damping": damping,
                    }
                    row.update(
                        compare(test_scores[key, damping], kron["scores"], gt.subsets, test_targets)
                    )
                    rows.append(row)
    times = [
        {
            "threads": threads,
            "load_avg_at_start": loads[threads],
            "ours": {key: {chosen[key]: _seconds(ours[threads][key])} for key in subsets},
            "kronfluence": {k: _seconds(r) for k, r in peer[threads]["rows"].items()},
        }
        for threads in thread_counts
    ]
    result = {
        "setting": setting.to_json(),
        "recipe_hash": setting.recipe_hash(),
        "lds_protocol": {"m": args.m, "seeds": args.seeds, "alpha": 0.5},
        "n_tracked_params": n_params,
        "tracked_layers": side["layers"],
        "ours_bytes_stored": bytes_stored,
        "ours_readme_defaults_val_lds": readme_val,
        "kronfluence": {
            "version": peer[first]["version"],
            "torch": peer[first]["torch"],
            "model_gap_nats": peer[first]["model_gap"],
        },
        "batch_size": args.batch_size,
        "ours_dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "noise_ceiling": noise_ceiling(gt.per_seed[:, :, n_val:]).mean,
        "random_lds": random_lds.mean,
        "ours_val_lds": scored,
        "ours_chosen_damping": chosen,
        "ours_train_features": args.train_features,
        "ours_timed_bytes": timed_bytes,
        "ours_data_passes": {
            **{k: data_passes(ce, setting.n_train) for k, ce in subsets.items()},
            README_DEFAULTS: data_passes(None, setting.n_train),
        },
        "comparisons": rows,
        "times": times,
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
    }
    print_tables(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


def _seconds(run: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in run.items() if k.endswith("_s")}


def print_tables(r: dict[str, Any]) -> None:
    """The two markdown tables of docs/peers.md (LDS and agreement; times)."""
    print(
        f"\n{r['setting']['name']}: {r['setting']['n_train']} train chunks, "
        f"{r['setting']['n_test']} test "
        f"queries, LDS over {r['lds_protocol']['m']} subsets x {r['lds_protocol']['seeds']} "
        f"seeds; noise ceiling {r['noise_ceiling']:.3f}, random scores {r['random_lds']:+.3f}; "
        f"{r['n_tracked_params']} parameters in {r['tracked_layers']} layers; ours in "
        f"{r['ours_dtype']}, fitted EK-FAC state {r['ours_bytes_stored']} bytes; "
        f"damping on validation queries: {r['ours_val_lds']} -> {r['ours_chosen_damping']}\n"
    )
    print(
        "| kronfluence run (threads) | damping kronfluence | ours: curvature examples (data "
        "passes) | damping ours | LDS kronfluence [95% CI] | LDS ours [95% CI] | ours - "
        "kronfluence, 95% CI | Spearman (per query / flat) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    passes = r["ours_data_passes"]
    for c in r["comparisons"]:
        lo, hi = c["lds_diff_ci"]
        key = c["ours_curvature_examples"]
        print(
            f"| {c['kronfluence_threads']} | {c['kronfluence_damping']} | {key} "
            f"({passes[key]:.2f}) | {c['ours_damping']} | "
            f"{c['lds_peer']:.3f} [{c['lds_peer_ci'][0]:.3f}, {c['lds_peer_ci'][1]:.3f}] | "
            f"{c['lds_ours']:.3f} [{c['lds_ours_ci'][0]:.3f}, {c['lds_ours_ci'][1]:.3f}] | "
            f"[{lo:+.3f}, {hi:+.3f}] {c['verdict']} | {c['spearman_per_query']:.3f} / "
            f"{c['spearman_flat']:.3f} |"
        )
    print(
        "\n| threads | load avg (1/5/15 min) | ours: curvature examples (data passes), damping: "
        "fit + attribute = total s | kronfluence (damping 1e-08, 3 data passes): fit + "
        "attribute = total s | ours / kronfluence |"
    )
    print("|---|---|---|---|---|")
    for t in r["times"]:
        kron = t["kronfluence"][repr(KRONFLUENCE_DAMPING)]
        for key, by_damping in t["ours"].items():
            for damping, o in by_damping.items():
                print(
                    f"| {t['threads']} | "
                    f"{' / '.join(f'{x:.2f}' for x in t['load_avg_at_start'])} | {key} "
                    f"({passes[key]:.2f}), {damping}: {o['fit_s']:.1f} + {o['attribute_s']:.1f} "
                    f"= {o['total_s']:.1f} | {kron['fit_s']:.1f} + {kron['attribute_s']:.1f} = "
                    f"{kron['total_s']:.1f} | {o['total_s'] / kron['total_s']:.2f} |"
                )


if __name__ == "__main__":
    main()
