"""datatrace's EK-FAC influence (the README's call) next to kronfluence's on the digits settings.

    .venv/bin/python benchmarks/peers/kronfluence_digits.py --threads 1 --json out/kronfluence_digits.json

For every ``--settings`` entry (registered digits-family settings; default ``digits-mlp``,
``digits-cnn``, ``digits-mlp-short``, ``digits-mlp-twostage``) the bench's own pieces: the
seed-0 model ``setting.train_trajectory(seed=0)`` (state cached in ``benchmarks.peers.digits.CACHE``),
its test queries, its target (the margin; ``setting.make_task``) and its cached LDS ground
truth (``--m`` subsets x ``--gt-seeds`` retrainings; the script exits when it is not cached
unless ``--allow-retraining``). On the test queries it scores

- ours, true Fisher: ``make_attributor("if-ekfac", setting.make_task(model),
  damping="heuristic", fisher="true")`` -- kronfluence's estimator (one label per example,
  sampled from label seed ``seed``; the library default until the defaults became the
  benchmark's choice, ``fisher="empirical"``); label seeds ``--label-seeds``;
- ours, exact: the same with ``fisher="exact"`` (closed-form expectation over the classes;
  deterministic);
- kronfluence 1.0.1, EK-FAC with its defaults (``FactorArguments(strategy="ekfac")``: true
  Fisher, one ``torch.multinomial`` label per example, unseeded) and ``damping_factor=None``
  (its 0.1 x mean-eigenvalue heuristic per module, the rule of ours' ``"heuristic"``),
  measurement ``-margin`` (positive score = training on the example raises the query's margin,
  ours' sign), ``--kfx-runs`` independent fits.

Both track the same parameters: every weight and bias of the model's ``nn.Linear`` and
``nn.Conv2d`` layers (kronfluence's default; the script checks that ``make_task`` tracks
exactly these). kronfluence runs in its own virtualenv (``/tmp/peer-kronfluence``, created by
``peers.setup_peer`` when missing) through ``benchmarks/peers/kronfluence_digits_runner.py``, which
rebuilds the ``nn.Sequential`` model from a layer description without datatrace and refuses
to score unless its query logits equal ours (atol 1e-5).

Reported per setting: LDS [95% bootstrap CI] of every run, the mean over label seeds / runs,
the paired-bootstrap 95% interval (DESIGN.md §9) of ours (seed 0) - kronfluence (run 1), of
the per-query LDS averaged over the seeds minus that averaged over kronfluence's runs, and
of the same difference with the label draws resampled too (:func:`draws_bootstrap`: a single
draw's LDS is random on both sides, which resampling queries alone does not see), each
with the verdict (``better``: lower end > 0; ``not worse``: upper end >= 0), the noise
ceiling and the random-score baseline of the bench. Times (one fit + attribute each, no
warm-up) are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers.kronfluence_charlm import cached_ground_truth, run_kronfluence, trained_model
from benchmarks.peers.peers import compare, setup_peer
from datatrace import Task, make_attributor
from datatrace.bench.cache import GroundTruthSpec
from datatrace.bench.groundtruth import SubsetGroundTruth, noise_ceiling
from datatrace.bench.settings import Setting, get_setting
from datatrace.metrics import LDSResult, lds, paired_bootstrap

RUNNER = Path(__file__).resolve().parent / "kronfluence_digits_runner.py"
DEFAULT_SETTINGS = "digits-mlp,digits-cnn,digits-mlp-short,digits-mlp-twostage"


def describe_layer(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of one child of an ``nn.Sequential``, for the runner."""
    if isinstance(module, nn.Linear):
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise ValueError(f"{module} has groups/dilation/padding_mode the runner lacks")
        return {
            "type": "Conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding),  # type: ignore[arg-type]
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Dropout):
        return {"type": "Dropout", "p": module.p}
    if isinstance(module, nn.MaxPool2d):
        return {"type": "MaxPool2d", "kernel_size": module.kernel_size, "stride": module.stride}
    if type(module) in (nn.ReLU, nn.Flatten):
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            raise ValueError(f"{module}: the runner builds nn.Flatten() only")
        return {"type": type(module).__name__}
    raise ValueError(f"the runner cannot rebuild {type(module).__name__}; add it to both files")


def describe(model: nn.Module) -> list[dict[str, Any]]:
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the runner rebuilds nn.Sequential models; got {type(model).__name__}")
    return [describe_layer(m) for m in model]


def layer_params(model: nn.Module) -> set[str]:
    """Names of the Linear/Conv2d weights and biases: what kronfluence tracks by default."""
    return {
        f"{name}.{p}"
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
        for p, _ in mod.named_parameters()
    }


def timed_scores(make: Any, train: Any, queries: Any) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    values = make().fit(train).attribute(queries).values.detach()
    return values, time.perf_counter() - t0


@dataclass
class Bench:
    """The bench's pieces of one setting: seed-0 model, task, data and test ground truth."""

    setting: Setting
    model: nn.Module
    task: Task
    gt: SubsetGroundTruth
    targets: torch.Tensor  # (m, n_test) subset targets of the test queries
    ceiling: float
    random: float

    def lds(self, scores: torch.Tensor) -> LDSResult:
        return lds(scores, self.gt.subsets, self.targets)


def bench_pieces(name: str, args: argparse.Namespace) -> Bench:
    """Model, task and cached test ground truth of setting ``name`` as the bench has them."""
    setting: Setting = get_setting(name)
    spec = GroundTruthSpec(m=args.m, seeds=args.gt_seeds)
    gt = cached_ground_truth(setting, spec, args.allow_retraining)
    n_val = setting.n_val
    targets = gt.targets[:, n_val:]
    # the bench's random baseline (datatrace.bench.benchmark): the same generator and draw
    g = torch.Generator().manual_seed(0)
    random_lds = lds(
        torch.randn(gt.targets.shape[1], setting.n_train, generator=g)[n_val:],
        gt.subsets,
        targets,
    )
    model = trained_model(setting, tag=setting.name)
    task = setting.make_task(model)
    if set(task.tracked_params()) != layer_params(model):
        raise RuntimeError(
            f"{name}: make_task tracks {sorted(task.tracked_params())}, kronfluence the "
            f"Linear/Conv2d parameters {sorted(layer_params(model))}"
        )
    ceiling = noise_ceiling(gt.per_seed[:, :, n_val:]).mean
    return Bench(setting, model, task, gt, targets, ceiling, random_lds.mean)


def kronfluence_runs(
    py: Path, bench: Bench, args: argparse.Namespace, factors: bool = False
) -> dict[str, Any]:
    """``args.kfx_runs`` kronfluence EK-FAC fits + scores of the test queries (the runner)."""
    model, (x_train, y_train) = bench.model, bench.setting.data.train
    x_query, y_query = bench.setting.data.test_queries
    with tempfile.TemporaryDirectory(prefix="datatrace-kfx-digits-") as tmp:
        inputs = Path(tmp) / "inputs.pt"
        with torch.no_grad():
            logits = model(x_query).detach().clone()
        torch.save(
            {
                "layers": describe(model),
                "dtype": str(bench.setting.torch_dtype).removeprefix("torch."),
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "x_train": x_train,
                "y_train": y_train,
                "x_query": x_query,
                "y_query": y_query,
                "query_logits": logits,
            },
            inputs,
        )
        runner_spec = {
            "threads": args.threads,
            "batch_size": args.batch_size,
            "runs": args.kfx_runs,
            "damping": None,
            "strategy": "ekfac",
            "factors": factors,
        }
        t0 = time.perf_counter()
        kron = run_kronfluence(
            py, inputs, Path(tmp) / "kronfluence.pt", runner_spec, args.peer_timeout, RUNNER
        )
        print(f"[kronfluence] {bench.setting.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return kron


def run_setting(name: str, args: argparse.Namespace, py: Path) -> dict[str, Any]:
    bench = bench_pieces(name, args)
    setting, task, gt, targets = bench.setting, bench.task, bench.gt, bench.targets
    train, queries = setting.data.train, setting.data.test_queries

    ours: dict[str, dict[str, Any]] = {}
    for seed in args.label_seeds:
        extra = {} if seed == 0 else {"seed": seed}
        values, secs = timed_scores(
            lambda extra=extra: make_attributor(
                "if-ekfac", task, damping="heuristic", fisher="true", **extra
            ),
            train,
            queries,
        )
        ours[f"readme-seed{seed}"] = {"scores": values, "total_s": secs}
        print(f"[datatrace] {name} README seed {seed}: {secs:.1f}s", flush=True)
    values, secs = timed_scores(
        lambda: make_attributor("if-ekfac", task, damping="heuristic", fisher="exact"),
        train,
        queries,
    )
    ours["exact"] = {"scores": values, "total_s": secs}
    print(f"[datatrace] {name} fisher exact: {secs:.1f}s", flush=True)
    # the library's defaults today: make_attributor("if-ekfac", task) (empirical Fisher,
    # heuristic damping; deterministic)
    values, secs = timed_scores(lambda: make_attributor("if-ekfac", task), train, queries)
    ours["defaults"] = {"scores": values, "total_s": secs}
    print(f"[datatrace] {name} defaults: {secs:.1f}s", flush=True)
    kron = kronfluence_runs(py, bench, args)

    ours_lds = {k: bench.lds(v["scores"]) for k, v in ours.items()}
    kron_lds = [bench.lds(r["scores"]) for r in kron["runs"]]
    readme = [ours_lds[f"readme-seed{s}"] for s in args.label_seeds]

    def mean_per_query(results: list[LDSResult]) -> torch.Tensor:
        return torch.stack([r.per_query for r in results]).mean(0)

    def verdict(low: float, high: float) -> str:
        return "better" if low > 0 else ("not worse" if high >= 0 else "worse")

    first = kron["runs"][0]["scores"]
    seed0 = ours[f"readme-seed{args.label_seeds[0]}"]["scores"]
    lo, hi = paired_bootstrap(mean_per_query(readme), mean_per_query(kron_lds))
    d_lo, d_hi = draws_bootstrap(readme, kron_lds)
    c_lo, c_hi = paired_bootstrap(ours_lds["defaults"].per_query, mean_per_query(kron_lds))
    return {
        "setting": setting.to_json(),
        "recipe_hash": setting.recipe_hash(),
        "noise_ceiling": bench.ceiling,
        "random_lds": bench.random,
        "n_train": setting.n_train,
        "n_test": setting.n_test,
        "kronfluence": {k: kron[k] for k in ("version", "torch", "logit_gap")},
        "lds": {
            **{k: _lds_json(r) for k, r in ours_lds.items()},
            **{f"kronfluence-run{i + 1}": _lds_json(r) for i, r in enumerate(kron_lds)},
        },
        "readme_mean": sum(r.mean for r in readme) / len(readme),
        "kronfluence_mean": sum(r.mean for r in kron_lds) / len(kron_lds),
        "readme_seed0_vs_run1": compare(seed0, first, gt.subsets, targets),
        "exact_vs_run1": compare(ours["exact"]["scores"], first, gt.subsets, targets),
        "defaults_vs_run1": compare(ours["defaults"]["scores"], first, gt.subsets, targets),
        "defaults_vs_mean": {"lds_diff_ci": [c_lo, c_hi], "verdict": verdict(c_lo, c_hi)},
        "readme_mean_vs_mean": {"lds_diff_ci": [lo, hi], "verdict": verdict(lo, hi)},
        "readme_mean_vs_mean_draws": {
            "lds_diff_ci": [d_lo, d_hi],
            "verdict": verdict(d_lo, d_hi),
        },
        "seconds": {
            **{k: v["total_s"] for k, v in ours.items()},
            **{f"kronfluence-run{i + 1}": r["total_s"] for i, r in enumerate(kron["runs"])},
        },
    }


def draws_bootstrap(
    ours: list[LDSResult], peer: list[LDSResult], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of mean(ours) - mean(peer) resampling label draws and queries.

    Both sides sample labels, so a single draw's LDS is itself random: each replicate draws,
    with replacement, as many of our runs and of the peer's runs as there are and a set of
    queries (the same for both: paired), and takes the difference of the mean per-query LDS.
    """
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


def _lds_json(r: LDSResult) -> dict[str, Any]:
    return {"mean": r.mean, "ci": list(r.bootstrap_ci())}


def _fmt(entry: dict[str, Any]) -> str:
    lo, hi = entry["ci"]
    return f"{entry['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def print_table(results: list[dict[str, Any]], label_seeds: list[int], runs: int) -> None:
    """The markdown table of docs/benchmarks.md (one row per setting)."""
    print(
        "\n| setting | noise ceiling / random | ours README, seed 0 [95% CI] | ours README, "
        "other seeds; mean | ours fisher exact [95% CI] | kronfluence run 1 [95% CI] | "
        "kronfluence other runs; mean | ours seed 0 − kronfluence run 1, 95% CI | ours mean − "
        "kronfluence mean, 95% CI (queries) | the same, queries and draws resampled | ours "
        "exact − kronfluence run 1, 95% CI |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def cmp(c: dict[str, Any]) -> str:
        lo, hi = c["lds_diff_ci"]
        return f"[{lo:+.3f}, {hi:+.3f}] {c['verdict']}"

    for r in results:
        seeds = [r["lds"][f"readme-seed{s}"]["mean"] for s in label_seeds]
        kron = [r["lds"][f"kronfluence-run{i + 1}"]["mean"] for i in range(runs)]

        print(
            f"| {r['setting']['name']} | {r['noise_ceiling']:.3f} / {r['random_lds']:+.3f} | "
            f"{_fmt(r['lds'][f'readme-seed{label_seeds[0]}'])} | "
            f"{', '.join(f'{x:.3f}' for x in seeds[1:])}; **{r['readme_mean']:.3f}** | "
            f"{_fmt(r['lds']['exact'])} | {_fmt(r['lds']['kronfluence-run1'])} | "
            f"{', '.join(f'{x:.3f}' for x in kron[1:])}; **{r['kronfluence_mean']:.3f}** | "
            f"{cmp(r['readme_seed0_vs_run1'])} | {cmp(r['readme_mean_vs_mean'])} | "
            f"{cmp(r['readme_mean_vs_mean_draws'])} | {cmp(r['exact_vs_run1'])} |"
        )
    print(
        "\n| setting | ours with the library defaults (empirical Fisher, heuristic) [95% CI] | "
        "kronfluence mean | ours - kronfluence run 1 | ours - kronfluence mean (queries) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']['name']} | {_fmt(r['lds']['defaults'])} | "
            f"{r['kronfluence_mean']:.3f} | {cmp(r['defaults_vs_run1'])} | "
            f"{cmp(r['defaults_vs_mean'])} |"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated setting names")
    ap.add_argument("--kfx-runs", type=int, default=3, help="independent kronfluence fits")
    ap.add_argument("--label-seeds", default="0,1,2", help="our label seeds (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both libraries)")
    ap.add_argument("--batch-size", type=int, default=64, help="kronfluence's batch size")
    ap.add_argument("--m", type=int, default=50, help="LDS subsets of the cached ground truth")
    ap.add_argument("--gt-seeds", type=int, default=2, help="retrainings per subset")
    ap.add_argument("--allow-retraining", action="store_true")
    ap.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds per runner")
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    args.label_seeds = [int(s) for s in args.label_seeds.split(",") if s]
    names = [s for s in args.settings.split(",") if s]

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    py = setup_peer("kronfluence", args.venv_root)
    results = [run_setting(name, args, py) for name in names]
    print_table(results, args.label_seeds, args.kfx_runs)
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()
    print(
        f"\nwall time {wall:.0f}s; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} cores; "
        f"{args.threads} thread(s)"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join(
                ["python", "benchmarks/peers/kronfluence_digits.py", *(argv or sys.argv[1:])]
            ),
            "results": results,
            "wall_s": wall,
            "load_avg_before": list(load_before),
            "load_avg_after": list(load_after),
            "threads": args.threads,
        }
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
