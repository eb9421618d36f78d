"""datatrace's EK-FAC influence (the README's call) next to kronfluence's on the digits settings.

    .venv/bin/python benchmarks/peers/kronfluence_digits.py --threads 1 --json out/kronfluence_digits.json

For every ``--settings`` entry (registered digits-family settings) the bench's own pieces:
the seed-0 model (``common.seed0_model``), its test queries, its target (the margin;
``setting.make_task``, which must track exactly the Linear/Conv2d weights and biases
kronfluence tracks) and its cached LDS ground truth (``--m`` x ``--gt-seeds``; the script
exits when it is not cached unless ``--allow-retraining``). On the test queries it scores
ours with the README's call and ``fisher="true"`` (kronfluence's estimator: one label per
example, label seeds ``--label-seeds``), with ``fisher="exact"`` and with the library
defaults (empirical Fisher), and ``--kfx-runs`` kronfluence EK-FAC fits with its defaults
(true Fisher, unseeded labels, ``damping_factor=None``: the rule of ours' ``"heuristic"``)
through ``peer_runner.py`` in kronfluence's venv. Reported per setting: LDS [95% CI] of
every run, paired intervals of ours - kronfluence on single draws, on the means over draws
(queries resampled) and with the draws resampled too (:func:`draws_bootstrap`), the noise
ceiling and random baseline of the bench. Times (one fit + attribute each) are indicative.
"""

from __future__ import annotations

import argparse
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
    describe,
    kronfluence_ekfac,
    load_line,
    seed0_model,
    setup_peer,
    verdict,
)
from datatrace import make_attributor
from datatrace.bench.cache import GroundTruthSpec
from datatrace.bench.groundtruth import noise_ceiling
from datatrace.bench.settings import get_setting
from datatrace.metrics import LDSResult, lds, paired_bootstrap

DEFAULT_SETTINGS = "digits-mlp,digits-cnn,digits-mlp-short,digits-mlp-twostage"


def run_setting(name: str, args: argparse.Namespace, py: Path) -> dict[str, Any]:
    setting = get_setting(name)
    gt = cached_ground_truth(
        setting, GroundTruthSpec(m=args.m, seeds=args.gt_seeds), args.allow_retraining
    )
    n_val = setting.n_val
    targets = gt.targets[:, n_val:]
    # the bench's random baseline (datatrace.bench.benchmark): the same generator and draw
    g = torch.Generator().manual_seed(0)
    random_lds = lds(
        torch.randn(gt.targets.shape[1], setting.n_train, generator=g)[n_val:], gt.subsets, targets
    )
    model = seed0_model(setting)
    task = setting.make_task(model)
    layers = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
        for p, _ in mod.named_parameters()
    }
    if set(task.tracked_params()) != layers:
        raise RuntimeError(
            f"{name}: make_task tracks {sorted(task.tracked_params())}, kronfluence {sorted(layers)}"
        )
    train, queries = setting.data.train, setting.data.test_queries

    ours: dict[str, dict[str, Any]] = {}
    calls = {
        f"readme-seed{s}": {"fisher": "true", **({"seed": s} if s else {})}
        for s in args.label_seeds
    }
    calls.update({"exact": {"fisher": "exact"}, "defaults": {}})
    for key, options in calls.items():
        if key != "defaults":  # the library's defaults: empirical Fisher, heuristic damping
            options = {"damping": "heuristic", **options}
        t0 = time.perf_counter()
        values = make_attributor("if-ekfac", task, **options).fit(train).attribute(queries).values
        ours[key] = {"scores": values.detach(), "total_s": time.perf_counter() - t0}
        print(f"[datatrace] {name} {key}: {ours[key]['total_s']:.1f}s", flush=True)

    with tempfile.TemporaryDirectory(prefix="datatrace-kfx-digits-") as tmp:
        with torch.no_grad():
            logits = model(queries[0]).detach().clone()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        data: dict[str, Any] = {"model": "sequential", "layers": describe(model)}
        data["members"] = [state]
        data.update(
            dtype=str(setting.torch_dtype).removeprefix("torch."),
            x_train=train[0],
            y_train=train[1],
        )
        data.update(x_query=queries[0], y_query=queries[1], query_check=logits, check_atol=1e-5)
        torch.save(data, Path(tmp) / "inputs.pt")
        spec = {"threads": args.threads, "batch_size": args.batch_size, "runs": args.kfx_runs}
        spec.update(repeats=1, warmup=0, dampings=[None])
        kron = kronfluence_ekfac(py, Path(tmp) / "inputs.pt", spec, args.peer_timeout, name)
    runs = kron["results"]["if-ekfac"]

    ours_lds = {k: lds(v["scores"], gt.subsets, targets) for k, v in ours.items()}
    kron_lds = [lds(r["scores"], gt.subsets, targets) for r in runs]
    readme = [ours_lds[f"readme-seed{s}"] for s in args.label_seeds]

    def mean_per_query(results: list[LDSResult]) -> torch.Tensor:
        return torch.stack([r.per_query for r in results]).mean(0)

    def interval(lo: float, hi: float) -> dict[str, Any]:
        return {"lds_diff_ci": [lo, hi], "verdict": verdict(lo, hi)}

    first = runs[0]["scores"]
    seed0 = ours[f"readme-seed{args.label_seeds[0]}"]["scores"]
    return {
        "setting": setting.to_json(),
        "recipe_hash": setting.recipe_hash(),
        "noise_ceiling": noise_ceiling(gt.per_seed[:, :, n_val:]).mean,
        "random_lds": random_lds.mean,
        "n_train": setting.n_train,
        "n_test": setting.n_test,
        "kronfluence": {
            "version": kron["version"],
            "torch": kron["torch"],
            "logit_gap": kron["model_gap"],
        },
        "lds": {
            **{k: _lds_json(r) for k, r in ours_lds.items()},
            **{f"kronfluence-run{i + 1}": _lds_json(r) for i, r in enumerate(kron_lds)},
        },
        "readme_mean": sum(r.mean for r in readme) / len(readme),
        "kronfluence_mean": sum(r.mean for r in kron_lds) / len(kron_lds),
        "readme_seed0_vs_run1": compare(seed0, first, gt.subsets, targets),
        "exact_vs_run1": compare(ours["exact"]["scores"], first, gt.subsets, targets),
        "defaults_vs_run1": compare(ours["defaults"]["scores"], first, gt.subsets, targets),
        "defaults_vs_mean": interval(
            *paired_bootstrap(ours_lds["defaults"].per_query, mean_per_query(kron_lds))
        ),
        "readme_mean_vs_mean": interval(
            *paired_bootstrap(mean_per_query(readme), mean_per_query(kron_lds))
        ),
        "readme_mean_vs_mean_draws": interval(*draws_bootstrap(readme, kron_lds)),
        "seconds": {
            **{k: v["total_s"] for k, v in ours.items()},
            **{f"kronfluence-run{i + 1}": r["total_s"] for i, r in enumerate(runs)},
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


def _cmp(c: dict[str, Any]) -> str:
    lo, hi = c["lds_diff_ci"]
    return f"[{lo:+.3f}, {hi:+.3f}] {c['verdict']}"


def print_table(results: list[dict[str, Any]], label_seeds: list[int], runs: int) -> None:
    """The markdown tables of docs/peers.md (one row per setting)."""
    print(
        "\n| setting | noise ceiling / random | ours README, seed 0 [95% CI] | ours README, "
        "other seeds; mean | ours fisher exact [95% CI] | kronfluence run 1 [95% CI] | "
        "kronfluence other runs; mean | ours seed 0 − kronfluence run 1, 95% CI | ours mean − "
        "kronfluence mean, 95% CI (queries) | the same, queries and draws resampled | ours "
        "exact − kronfluence run 1, 95% CI |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        seeds = [r["lds"][f"readme-seed{s}"]["mean"] for s in label_seeds]
        kron = [r["lds"][f"kronfluence-run{i + 1}"]["mean"] for i in range(runs)]
        print(
            f"| {r['setting']['name']} | {r['noise_ceiling']:.3f} / {r['random_lds']:+.3f} | "
            f"{_fmt(r['lds'][f'readme-seed{label_seeds[0]}'])} | "
            f"{', '.join(f'{x:.3f}' for x in seeds[1:])}; **{r['readme_mean']:.3f}** | "
            f"{_fmt(r['lds']['exact'])} | {_fmt(r['lds']['kronfluence-run1'])} | "
            f"{', '.join(f'{x:.3f}' for x in kron[1:])}; **{r['kronfluence_mean']:.3f}** | "
            f"{_cmp(r['readme_seed0_vs_run1'])} | {_cmp(r['readme_mean_vs_mean'])} | "
            f"{_cmp(r['readme_mean_vs_mean_draws'])} | {_cmp(r['exact_vs_run1'])} |"
        )
    print(
        "\n| setting | ours with the library defaults (empirical Fisher, heuristic) [95% CI] | "
        "kronfluence mean | ours - kronfluence run 1 | ours - kronfluence mean (queries) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']['name']} | {_fmt(r['lds']['defaults'])} | "
            f"{r['kronfluence_mean']:.3f} | {_cmp(r['defaults_vs_run1'])} | "
            f"{_cmp(r['defaults_vs_mean'])} |"
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

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    py = setup_peer("kronfluence", args.venv_root)
    results = [run_setting(name, args, py) for name in args.settings.split(",") if name]
    print_table(results, args.label_seeds, args.kfx_runs)
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()
    print(load_line(wall, load_before, load_after) + f"; {args.threads} thread(s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = ["python", "benchmarks/peers/kronfluence_digits.py", *(argv or sys.argv[1:])]
        payload = {"command": " ".join(command), "results": results, "wall_s": wall}
        payload.update(load_avg_before=list(load_before), load_avg_after=list(load_after))
        args.json.write_text(json.dumps({**payload, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
