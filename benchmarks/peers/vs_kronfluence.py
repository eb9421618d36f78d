"""datatrace's EK-FAC influence next to kronfluence's on registered bench settings.

    python benchmarks/peers/vs_kronfluence.py --setting pydoc-gpt2 --json out/kfx_gpt2.json
    python benchmarks/peers/vs_kronfluence.py --setting digits-mlp,digits-cnn --json out/kfx.json

What each family of settings compares, and every published command: docs/peers.md, "EK-FAC
next to kronfluence". (Not ``kronfluence.py``: that would shadow the package in the runner.)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import common
from benchmarks.peers.common import compare, fmt_ci, fmt_diff, print_table
from benchmarks.peers.peer_runner import timed
from datatrace import make_attributor
from datatrace.bench.cache import GroundTruthSpec
from datatrace.bench.groundtruth import noise_ceiling
from datatrace.bench.runner import fitted_bytes
from datatrace.bench.settings import get_setting
from datatrace.errors import NumericalError
from datatrace.metrics import LDSResult, lds, paired_bootstrap

LMS = ("pydoc-charlm", "pydoc-gpt2")
README_DEFAULTS = "readme-defaults"  # our LM row with make_attributor(method, task)
KRONFLUENCE_DAMPING = 1e-8  # kronfluence 1.0.1 ScoreArguments.damping_factor default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--setting", "--settings", default="pydoc-charlm", help="pydoc-charlm, pydoc-gpt2 or "
        "comma-separated digits-family settings")  # fmt: skip
    add("--method", default="if-ekfac", choices=["if-ekfac", "if-kfac"], help="both sides")
    add("--threads", default=None, help="comma-separated torch thread counts (digits: one)")
    add("--batch-size", type=int, default=64, help="kronfluence's (and an LM's ours) batch size")
    add("--m", type=int, default=None, help="LDS subsets (ground truth; LM 20, digits 50)")
    add("--seeds", "--gt-seeds", type=int, default=2, help="retrainings per subset")
    add("--allow-retraining", action="store_true")
    add("--venv-root", type=Path, default=Path(tempfile.gettempdir()))
    add("--peer-timeout", type=float, default=3600.0, help="seconds per runner")
    add("--json", type=Path, default=None, help="write results as JSON here")
    add = ap.add_argument_group("language models").add_argument
    add("--repeats", type=int, default=3, help="timed runs (median)")
    add("--warmup", type=int, default=1, help="untimed runs before them")
    add("--damping-grid", default="1e-8,1e-4,1e-3,1e-2,1e-1,heuristic",
        help="our dampings tried on the validation queries (numbers or 'heuristic')")  # fmt: skip
    add("--dtype", default="float32", choices=["float32", "float64"], help="our model's dtype "
        "(float64 admits dampings below float32 resolution); kronfluence runs float32")  # fmt: skip
    add("--curvature-examples", default="all", help="comma-separated counts (400), fractions "
        "(0.1) or 'all', each optionally '/EIGEN' (eigenvalue_examples, EK-FAC); each gets its "
        "own damping choice, LDS rows and timed runs")  # fmt: skip
    add("--train-features", default="auto", choices=["auto", "factored", "recompute"],
        help="ours: keep the training factors or recompute them when scoring")  # fmt: skip
    add = ap.add_argument_group("digits settings").add_argument
    add("--kfx-runs", type=int, default=3, help="independent kronfluence fits")
    add("--label-seeds", default="0,1,2", help="our label seeds (comma-separated)")
    args = ap.parse_args(argv)
    args.settings = [s for s in args.setting.split(",") if s]
    args.lm = args.settings[0] in LMS
    if len(args.settings) > 1 and set(args.settings) & set(LMS):
        ap.error("--setting: one language model, or digits-family settings")
    args.threads = [int(t) for t in (args.threads or ("1,2" if args.lm else "1")).split(",") if t]
    args.m = args.m or (20 if args.lm else 50)
    args.label_seeds = [int(s) for s in args.label_seeds.split(",") if s]
    return args


def prepare(name: str, args: Any, kinds: tuple[str, ...], **task_options: Any) -> Any:
    """The setting, its cached ground truth and seed-0 model, and the task of ``make_task``,
    checked to track the parameters of exactly the modules kronfluence tracks (``kinds``)."""
    setting = get_setting(name)
    spec = GroundTruthSpec(m=args.m, seeds=args.seeds)
    gt = common.cached_ground_truth(setting, spec, args.allow_retraining)
    model = common.seed0_model(setting)
    # nn.Module.to works in place: kronfluence gets the untouched float32 weights
    ours = copy.deepcopy(model).to(torch.float64) if args.dtype == "float64" else model
    task = setting.make_task(ours, **task_options)
    expected = {f"{m}.{p}" for m, mod in model.named_modules() if type(mod).__name__ in kinds
                for p, _ in mod.named_parameters()}  # fmt: skip
    if set(task.tracked_params()) != expected:
        raise RuntimeError(f"tracked {sorted(task.tracked_params())}, kronfluence {sorted(expected)}")  # fmt: skip
    return setting, gt, model, task


def kronfluence(py: Path, inputs: dict[str, Any], spec: dict[str, Any], args: Any,
                label: str) -> dict[str, Any]:  # fmt: skip
    """kronfluence runs (``spec["runs"]``) of ``args.method`` on ``inputs``; raises on failure."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="datatrace-kfx-") as tmp:
        path = Path(tmp) / "inputs.pt"
        torch.save(inputs, path)
        out = common.run_peer("kronfluence", py, path, path.with_name("kronfluence.pt"),
                              {"methods": [args.method], **spec}, args.peer_timeout)  # fmt: skip
    problem = out.get("failed") or out.get("crashed") or out["errors"].get(args.method)
    if problem:
        raise RuntimeError(f"kronfluence runner failed: {problem}")
    print(f"[kronfluence] {label}: {time.perf_counter() - t0:.1f}s", flush=True)
    out["runs"] = out["results"][args.method]
    return out


def parse_damping(text: str) -> float | str:
    return text if text == "heuristic" else float(text)


Subsets = tuple[int | float | None, int | float | None]


def parse_curvature_examples(text: str) -> Subsets:
    """``(curvature_examples, eigenvalue_examples)`` of ``CURV[/EIGEN]``, each ``all`` (or
    ``none``): every example; ``0.1``: a fraction; ``400``: a count."""

    def one(t: str) -> int | float | None:
        if t.lower() in ("all", "none"):
            return None
        return float(t) if any(c in t for c in ".eE") else int(t)

    curv, _, eigen = text.partition("/")
    return one(curv), one(eigen) if eigen else None


def data_passes(subsets: Subsets, n_train: int) -> float:
    """Passes over the training set of one fit + attribute: a covariance pass over the
    curvature subset, an eigenvalue pass over its own (EK-FAC; the curvature subset unless
    set), one scoring (or featurizing) pass over every example."""

    def count(m: int | float | None) -> int:
        m = n_train if m is None else m
        return min(max(1, round(m * n_train)) if isinstance(m, float) else m, n_train)

    curv, eigen = subsets
    return 1 + (count(curv) + count(curv if eigen is None else eigen)) / n_train


def run_lm(args: Any, py: Path, load_before: tuple[float, ...]) -> dict[str, Any]:
    grid = [parse_damping(t) for t in args.damping_grid.split(",") if t]
    # "all" -> None; keys are the values as written (table and JSON)
    subsets = {t: parse_curvature_examples(t) for t in args.curvature_examples.split(",") if t}
    if args.settings[0] == "pydoc-gpt2":  # the block projections, not the tied LM head
        setting, gt, model, task = prepare("pydoc-gpt2", args, ("Conv1D",), module_types="layers")
        keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id",
                "eos_token_id", "resid_pdrop", "embd_pdrop", "attn_pdrop")  # fmt: skip
        arch = {k: getattr(model.config, k) for k in keys}
        inputs: dict[str, Any] = {"model": "gpt2", "arch": arch}
        layers = f"{4 * arch['n_layer']} Conv1D"
    else:
        linear = (torch.nn.Linear,)  # the 13 nn.Linear layers
        setting, gt, model, task = prepare("pydoc-charlm", args, ("Linear",), module_types=linear)
        arch = {"vocab_size": len(setting.vocab), "max_len": setting.chunk_len}
        arch |= {k: getattr(setting, k) for k in ("d_model", "n_heads", "n_layers")}
        # the runner builds the model from our classes' source (it cannot import datatrace)
        source = "".join(inspect.getsource(type(m)) for m in (model.blocks[0], model))
        inputs, layers = {"model": "charlm", "arch": arch, "source": source}, "13 Linear"
    n_val, n_train = setting.n_val, setting.n_train
    train, q_test = setting.data.train, setting.data.test_queries
    q_all = setting.data.queries("all")  # validation, then test
    test_targets = gt.targets[:, n_val:]
    g = torch.Generator().manual_seed(0)
    random_lds = lds(torch.randn(setting.n_test, n_train, generator=g, dtype=torch.float64),
                     gt.subsets, test_targets)  # fmt: skip

    def val_lds(values: torch.Tensor) -> float:
        return lds(values[:n_val], gt.subsets, gt.targets[:, :n_val]).mean

    def fit_ours(damping: float | str, ce: Subsets) -> Any:
        """Ours matched to kronfluence's defaults (true Fisher, one label), fit."""
        options = {"fisher": "true", "fisher_samples": 1, "batch_size": args.batch_size}
        options.update(seed=0, curvature_examples=ce[0], train_features=args.train_features)
        if ce[1] is not None:
            options["eigenvalue_examples"] = ce[1]
        return make_attributor(args.method, task, damping=damping, **options).fit(train)

    # ---- our damping, chosen on the validation queries for every curvature subset
    scored: dict[str, dict[str, float | str]] = {key: {} for key in subsets}
    test_scores: dict[tuple[str, str], torch.Tensor] = {}
    chosen: dict[str, str] = {}
    shown: dict[str, list[str]] = {}  # our rows of the LDS table
    for key, ce in subsets.items():
        for damping in grid:
            try:
                attr = fit_ours(damping, ce)
            except NumericalError as exc:  # e.g. 1e-8 is below float32 resolution: refused
                scored[key][str(damping)] = f"refused: {exc}"
                print(f"[datatrace] curvature {key}, damping {damping}: {exc}", flush=True)
                continue
            values = attr.attribute(q_all).values
            scored[key][str(damping)] = val_lds(values)
            test_scores[key, str(damping)] = values[n_val:]
            print(f"[datatrace] curvature {key}, damping {damping}: validation LDS "
                  f"{scored[key][str(damping)]:.3f}", flush=True)  # fmt: skip
        fitted = [d for (k, d) in test_scores if k == key]
        chosen[key] = max(fitted, key=lambda d: float(scored[key][d]))
        # the heuristic (kronfluence's other damping) and the chosen one
        shown[key] = [d for d in dict.fromkeys(["heuristic", chosen[key]]) if d in fitted]
    # the README defaults (empirical Fisher, heuristic damping), and the bytes EK-FAC keeps
    attr = make_attributor(args.method, task, batch_size=args.batch_size).fit(train)
    bytes_stored, values = fitted_bytes(attr), attr.attribute(q_all).values
    readme_val, test_scores[README_DEFAULTS, "heuristic"] = val_lds(values), values[n_val:]
    shown[README_DEFAULTS] = ["heuristic"]
    print(f"[datatrace] README defaults: validation LDS {readme_val:.3f}", flush=True)

    # ---- timed runs, ours then kronfluence, at every thread count
    ours: dict[int, dict[str, dict[str, Any]]] = {}
    peer: dict[int, dict[str, Any]] = {}
    loads: dict[int, list[float]] = {}
    with torch.no_grad():
        inputs["query_check"] = setting.measure(model, q_test).detach()
    inputs["members"] = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    inputs.update(train_ids=train["input_ids"], query_ids=q_test["input_ids"], check_atol=1e-3)
    for threads in args.threads:
        torch.set_num_threads(threads)
        loads[threads], ours[threads] = list(os.getloadavg()), {}
        for key, ce in subsets.items():  # the cost does not depend on the damping: the chosen
            t0, damping = time.perf_counter(), parse_damping(chosen[key])
            ours[threads][key] = timed(lambda: fit_ours(damping, ce),  # noqa: B023
                                       lambda attr: attr.attribute(q_test).values,
                                       args.repeats, args.warmup)  # fmt: skip
            print(f"[datatrace] {threads} thread(s), curvature {key}, damping {chosen[key]}: "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
        spec = {"threads": threads, "batch_size": args.batch_size, "repeats": args.repeats}
        spec.update(warmup=args.warmup, dampings=[KRONFLUENCE_DAMPING, None])
        out = kronfluence(py, inputs, spec, args, f"{threads} thread(s)")
        (run,) = out["runs"]
        out["rows"] = {repr(KRONFLUENCE_DAMPING): run, **run["more"]}
        peer[threads] = out

    rows = [{"kronfluence_threads": t, "kronfluence_damping": kron_damping,
             "ours_curvature_examples": key, "ours_damping": damping,
             **compare(test_scores[key, damping], kron["scores"], gt.subsets, test_targets)}
            for t, out in peer.items() for kron_damping, kron in out["rows"].items()
            for key in shown for damping in shown[key]]  # fmt: skip
    times = [{"threads": t, "load_avg_at_start": loads[t],
              "ours": {key: {chosen[key]: _seconds(ours[t][key])} for key in subsets},
              "kronfluence": {k: _seconds(r) for k, r in peer[t]["rows"].items()}}
             for t in args.threads]  # fmt: skip
    first = peer[args.threads[0]]
    passes = {
        k: data_passes(ce, n_train) for k, ce in {**subsets, README_DEFAULTS: (None, None)}.items()
    }
    return dict(
        setting=setting.to_json(), recipe_hash=setting.recipe_hash(),
        lds_protocol={"m": args.m, "seeds": args.seeds, "alpha": 0.5},
        n_tracked_params=sum(p.numel() for p in task.tracked_params().values()),
        tracked_layers=layers, ours_bytes_stored=bytes_stored,
        ours_readme_defaults_val_lds=readme_val,
        kronfluence={"version": first["version"], "torch": first["torch"],
                     "model_gap_nats": first["model_gap"]},
        batch_size=args.batch_size, ours_dtype=args.dtype, repeats=args.repeats,
        warmup=args.warmup, noise_ceiling=noise_ceiling(gt.per_seed[:, :, n_val:]).mean,
        random_lds=random_lds.mean, ours_val_lds=scored, ours_chosen_damping=chosen,
        ours_train_features=args.train_features,
        # what the timed configuration keeps after fit (curvature; factors unless recomputed)
        ours_timed_bytes={k: fitted_bytes(fit_ours(parse_damping(chosen[k]), ce))
                          for k, ce in subsets.items()},
        ours_data_passes=passes, comparisons=rows, times=times,
        load_avg_before=list(load_before), load_avg_after=list(os.getloadavg()),
    )  # fmt: skip


def _seconds(run: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in run.items() if k.endswith("_s")}


def print_lm(r: dict[str, Any]) -> None:
    """The two markdown tables of docs/peers.md (LDS and agreement; times)."""
    s, p, passes = r["setting"], r["lds_protocol"], r["ours_data_passes"]
    print(f"\n{s['name']}: {s['n_train']} train chunks, {s['n_test']} test queries, LDS over "
          f"{p['m']} subsets x {p['seeds']} seeds; noise ceiling {r['noise_ceiling']:.3f}, random "
          f"scores {r['random_lds']:+.3f}; {r['n_tracked_params']} parameters in "
          f"{r['tracked_layers']} layers; ours in {r['ours_dtype']}, fitted EK-FAC state "
          f"{r['ours_bytes_stored']} bytes; damping on validation queries: {r['ours_val_lds']} "
          f"-> {r['ours_chosen_damping']}\n")  # fmt: skip
    print_table(["kronfluence run (threads)", "damping kronfluence", "ours: curvature examples "
                 "(data passes)", "damping ours", "LDS kronfluence [95% CI]", "LDS ours [95% CI]",
                 "ours - kronfluence, 95% CI", "Spearman (per query / flat)"],
                [[str(c["kronfluence_threads"]), c["kronfluence_damping"],
                  f"{c['ours_curvature_examples']} ({passes[c['ours_curvature_examples']]:.2f})",
                  c["ours_damping"], fmt_ci(c["lds_peer"], c["lds_peer_ci"]),
                  fmt_ci(c["lds_ours"], c["lds_ours_ci"]), fmt_diff(c),
                  f"{c['spearman_per_query']:.3f} / {c['spearman_flat']:.3f}"]
                 for c in r["comparisons"]])  # fmt: skip
    print()
    rows = [[str(t["threads"]), " / ".join(f"{x:.2f}" for x in t["load_avg_at_start"]),
             f"{key} ({passes[key]:.2f}), {damping}: {o['fit_s']:.1f} + {o['attribute_s']:.1f} "
             f"= {o['total_s']:.1f}", f"{k['fit_s']:.1f} + {k['attribute_s']:.1f} = "
             f"{k['total_s']:.1f}", f"{o['total_s'] / k['total_s']:.2f}"]
            for t in r["times"] for k in [t["kronfluence"][repr(KRONFLUENCE_DAMPING)]]
            for key, by_damping in t["ours"].items() for damping, o in by_damping.items()]  # fmt: skip
    print_table(["threads", "load avg (1/5/15 min)", "ours: curvature examples (data passes), "
                 "damping: fit + attribute = total s", "kronfluence (damping 1e-08, 3 data "
                 "passes): fit + attribute = total s", "ours / kronfluence"], rows)  # fmt: skip


def run_digits(name: str, args: Any, py: Path) -> dict[str, Any]:
    setting, gt, model, task = prepare(name, args, ("Linear", "Conv2d"))
    n_val, (train, queries) = setting.n_val, (setting.data.train, setting.data.test_queries)
    targets = gt.targets[:, n_val:]
    # the bench's random baseline (datatrace.bench.benchmark): the same generator and draw
    g = torch.Generator().manual_seed(0)
    random_scores = torch.randn(gt.targets.shape[1], setting.n_train, generator=g)[n_val:]
    ours: dict[str, dict[str, Any]] = {}
    calls = {f"readme-seed{s}": {"damping": "heuristic", "fisher": "true", **({"seed": s} if s else {})}
             for s in args.label_seeds}  # fmt: skip
    # and the library's defaults: empirical Fisher, heuristic damping
    calls.update({"exact": {"damping": "heuristic", "fisher": "exact"}, "defaults": {}})
    for key, options in calls.items():
        t0 = time.perf_counter()
        attr = make_attributor(args.method, task, **options).fit(train)
        ours[key] = {"scores": attr.attribute(queries).values.detach()}
        ours[key]["total_s"] = time.perf_counter() - t0
        print(f"[datatrace] {name} {key}: {ours[key]['total_s']:.1f}s", flush=True)

    with torch.no_grad():
        logits = model(queries[0]).detach().clone()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inputs = dict(model="sequential", layers=common.describe(model), members=[state],
                  dtype=str(setting.torch_dtype).removeprefix("torch."), x_train=train[0],
                  y_train=train[1], x_query=queries[0], y_query=queries[1], query_check=logits,
                  check_atol=1e-5)  # fmt: skip
    spec = {"threads": args.threads[0], "batch_size": args.batch_size, "runs": args.kfx_runs}
    spec.update(repeats=1, warmup=0, dampings=[None])
    kron = kronfluence(py, inputs, spec, args, name)
    runs = kron["runs"]
    ours_lds = {k: lds(v["scores"], gt.subsets, targets) for k, v in ours.items()}
    kron_lds = [lds(r["scores"], gt.subsets, targets) for r in runs]
    readme = [ours_lds[f"readme-seed{s}"] for s in args.label_seeds]
    mean_kron = torch.stack([r.per_query for r in kron_lds]).mean(0)
    mean_readme = torch.stack([r.per_query for r in readme]).mean(0)

    def interval(lo: float, hi: float) -> dict[str, Any]:
        return {"lds_diff_ci": [lo, hi], "verdict": common.verdict(lo, hi)}

    def vs_run1(key: str) -> dict[str, Any]:
        return compare(ours[key]["scores"], runs[0]["scores"], gt.subsets, targets)

    kron_names = [f"kronfluence-run{i + 1}" for i in range(len(runs))]
    return dict(
        setting=setting.to_json(), recipe_hash=setting.recipe_hash(),
        noise_ceiling=noise_ceiling(gt.per_seed[:, :, n_val:]).mean,
        random_lds=lds(random_scores, gt.subsets, targets).mean, n_train=setting.n_train,
        n_test=setting.n_test, kronfluence={"version": kron["version"], "torch": kron["torch"],
                                            "logit_gap": kron["model_gap"]},
        lds={k: {"mean": r.mean, "ci": list(r.bootstrap_ci())}
             for k, r in [*ours_lds.items(), *zip(kron_names, kron_lds)]},
        readme_mean=sum(r.mean for r in readme) / len(readme),
        kronfluence_mean=sum(r.mean for r in kron_lds) / len(kron_lds),
        readme_seed0_vs_run1=vs_run1(f"readme-seed{args.label_seeds[0]}"),
        exact_vs_run1=vs_run1("exact"), defaults_vs_run1=vs_run1("defaults"),
        defaults_vs_mean=interval(*paired_bootstrap(ours_lds["defaults"].per_query, mean_kron)),
        readme_mean_vs_mean=interval(*paired_bootstrap(mean_readme, mean_kron)),
        readme_mean_vs_mean_draws=interval(*draws_bootstrap(readme, kron_lds)),
        seconds={**{k: v["total_s"] for k, v in ours.items()},
                 **{k: r["total_s"] for k, r in zip(kron_names, runs)}},
    )  # fmt: skip


def draws_bootstrap(ours: list[LDSResult], peer: list[LDSResult], n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """95% interval of mean(ours) - mean(peer) resampling label draws and queries: each
    replicate draws, with replacement, as many of our runs and of the peer's runs as there are
    and a set of queries (the same for both: paired), and takes the difference of the means."""
    a = torch.stack([r.per_query for r in ours])  # (draws, queries)
    b = torch.stack([r.per_query for r in peer])
    g = torch.Generator().manual_seed(seed)
    n_q = a.shape[1]
    diffs = torch.empty(n_boot, dtype=torch.float64)
    for i in range(n_boot):
        q = torch.randint(n_q, (n_q,), generator=g)
        ia = torch.randint(a.shape[0], (a.shape[0],), generator=g)
        ib = torch.randint(b.shape[0], (b.shape[0],), generator=g)
        diffs[i] = a[ia][:, q].nanmean() - b[ib][:, q].nanmean()
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


def print_digits(results: list[dict[str, Any]], label_seeds: list[int], runs: int) -> None:
    """The markdown tables of docs/peers.md (one row per setting)."""

    def others(means: list[float], mean: float) -> str:
        return f"{', '.join(f'{x:.3f}' for x in means[1:])}; **{mean:.3f}**"

    print()
    print_table(["setting", "noise ceiling / random", "ours README, seed 0 [95% CI]", "ours "
                 "README, other seeds; mean", "ours fisher exact [95% CI]", "kronfluence run 1 "
                 "[95% CI]", "kronfluence other runs; mean", "ours seed 0 − kronfluence run 1, "
                 "95% CI", "ours mean − kronfluence mean, 95% CI (queries)", "the same, queries "
                 "and draws resampled", "ours exact − kronfluence run 1, 95% CI"],
                [[r["setting"]["name"], f"{r['noise_ceiling']:.3f} / {r['random_lds']:+.3f}",
                  fmt_ci(**r["lds"][f"readme-seed{label_seeds[0]}"]),
                  others([r["lds"][f"readme-seed{s}"]["mean"] for s in label_seeds], r["readme_mean"]),
                  fmt_ci(**r["lds"]["exact"]), fmt_ci(**r["lds"]["kronfluence-run1"]),
                  others([r["lds"][f"kronfluence-run{i + 1}"]["mean"] for i in range(runs)],
                         r["kronfluence_mean"]),
                  fmt_diff(r["readme_seed0_vs_run1"]), fmt_diff(r["readme_mean_vs_mean"]),
                  fmt_diff(r["readme_mean_vs_mean_draws"]), fmt_diff(r["exact_vs_run1"])]
                 for r in results])  # fmt: skip
    print()
    print_table(["setting", "ours with the library defaults (empirical Fisher, heuristic) "
                 "[95% CI]", "kronfluence mean", "ours - kronfluence run 1", "ours - kronfluence "
                 "mean (queries)"],
                [[r["setting"]["name"], fmt_ci(**r["lds"]["defaults"]), f"{r['kronfluence_mean']:.3f}",
                  fmt_diff(r["defaults_vs_run1"]), fmt_diff(r["defaults_vs_mean"])]
                 for r in results])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, t_start = os.getloadavg(), time.perf_counter()
    py = common.setup_peer("kronfluence", args.venv_root)
    torch.set_num_threads(args.threads[0])
    if args.lm:
        result = run_lm(args, py, load_before)
        print_lm(result)
        common.write_json(args.json, result)
        return
    results = [run_digits(name, args, py) for name in args.settings]
    print_digits(results, args.label_seeds, args.kfx_runs)
    wall, load_after = time.perf_counter() - t_start, os.getloadavg()
    print(common.load_line(wall, load_before, load_after) + f"; {args.threads[0]} thread(s)")
    command = " ".join(["python", "benchmarks/peers/vs_kronfluence.py", *(argv or sys.argv[1:])])
    common.write_json(args.json, dict(command=command, results=results, wall_s=wall,
                                      load_avg_before=list(load_before),
                                      load_avg_after=list(load_after), threads=args.threads[0]))  # fmt: skip


if __name__ == "__main__":
    main()
