"""The ``datatrace`` command: ``settings``, ``groundtruth`` and ``bench``.

    datatrace settings
    datatrace groundtruth --setting digits-mlp --m 50 --seeds 2 --workers 2
    datatrace bench --setting digits-mlp --methods grad-cos,trak:proj_dim=1024 --json out/bench.json

``bench`` reports, for every method, LDS on the test queries with a 95% bootstrap interval
next to its cost (fit and attribute seconds), beside a random-score baseline and the noise
ceiling (DESIGN.md §9). Hyperparameters come from a small documented grid and are chosen on
the validation queries, unless options are given (``method:key=value:key=value``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from datatrace.errors import ConfigError, DatatraceError

__all__ = ["DEFAULT_GRIDS", "DEFAULT_METHODS", "main", "parse_methods"]

DEFAULT_METHODS = "grad-dot,grad-cos,tracin,trak,if-explicit,if-datainf,rps"

# The documented default grids (chosen on validation queries; DESIGN.md §9).
DEFAULT_GRIDS: dict[str, list[dict[str, Any]]] = {
    "trak": [{"proj_dim": k, "relative_damping": r} for k in (512, 1024) for r in (0.1, 1.0)],
    "if-explicit": [
        {"curvature": "fisher", "projector": "rademacher", "proj_dim": 1024, "damping": d}
        for d in (1e-3, 1e-2)
    ],
    "if-datainf": [{"damping": 1e-2}],
    "if-cg": [{"damping": d, "solver_options": {"max_iter": 50}} for d in (1e-3, 1e-2)],
    "if-arnoldi": [{"damping": d, "solver_options": {"rank": 100}} for d in (1e-2, 1e-1)],
    "if-lissa": [{"damping": 0.1, "solver_options": {"depth": 100}}],
    "rps": [{"damping": d} for d in (1e-2, 1e-1)],
}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_methods(spec: str) -> list[tuple[str, dict[str, Any] | None]]:
    """``"trak:proj_dim=2048,grad-cos"`` -> ``[("trak", {"proj_dim": 2048}), ("grad-cos", None)]``.

    None means "use the default grid"; unknown ids raise ``ConfigError``.
    """
    from datatrace.methods import METHODS

    out: list[tuple[str, dict[str, Any] | None]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *pairs = item.split(":")
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}.")
        opts: dict[str, Any] = {}
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"method option {pair!r} of {name!r} must look like key=value.")
            key, text = pair.split("=", 1)
            opts[key] = _value(text)
        out.append((name, opts if pairs else None))
    if not out:
        raise ConfigError(
            f"--methods is empty; give comma-separated ids such as {DEFAULT_METHODS!r}."
        )
    return out


def _cmd_settings(_: argparse.Namespace) -> int:
    from datatrace.bench.settings import get_setting, list_settings

    for name in list_settings():
        setting = get_setting(name)
        doc = (type(setting).__doc__ or "").strip().splitlines()[0]
        print(f"{name:20s} {setting.n_train:6d} train  {doc}")
    return 0


def _setting(args: argparse.Namespace) -> Any:
    from datatrace.bench.settings import get_setting

    return get_setting(args.setting, **({"size": args.size} if args.size else {}))


def _ground_truth(args: argparse.Namespace, setting: Any) -> Any:
    from datatrace.bench.cache import GroundTruthSpec, lds_ground_truth

    spec = GroundTruthSpec(m=args.m, alpha=args.alpha, seeds=args.seeds)
    return lds_ground_truth(
        setting, spec, cache_dir=args.cache, workers=args.workers, progress=not args.quiet
    )


def _cmd_groundtruth(args: argparse.Namespace) -> int:
    setting = _setting(args)
    gt = _ground_truth(args, setting)
    print(
        f"{setting.name}: {gt.subsets.shape[0]} subsets x {gt.per_seed.shape[1]} seeds, "
        f"{gt.targets.shape[1]} queries; noise ceiling {gt.noise_ceiling().mean:.3f}"
    )
    return 0


def _run(
    setting: Any, model: Any, trajectory: list[Any], method: str, opts: dict[str, Any]
) -> tuple[torch.Tensor, float, float]:
    from datatrace.methods import make_attributor

    task = setting.make_task(model, checkpoints=trajectory if method == "tracin" else None)
    attributor = make_attributor(method, task, batch_size=256, **opts)
    t0 = time.perf_counter()
    attributor.fit(setting.data.train)
    t1 = time.perf_counter()
    values = attributor.attribute(setting.data.queries("all")).values
    return values, t1 - t0, time.perf_counter() - t1


def _cmd_bench(args: argparse.Namespace) -> int:
    from datatrace.metrics import lds

    methods = parse_methods(args.methods)
    if args.json is not None:
        _check_writable(args.json.parent)
    if args.out is not None:
        _check_writable(args.out)
    setting = _setting(args)
    gt = _ground_truth(args, setting)
    n_val = setting.n_val
    val, test = slice(0, n_val), slice(n_val, None)
    model, trajectory = setting.train_trajectory(seed=0)
    rows: list[dict[str, Any]] = []
    per_query: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    random_lds = lds(
        torch.randn(gt.targets.shape[1], setting.n_train, generator=g)[test],
        gt.subsets,
        gt.targets[:, test],
    )
    ceiling = gt.noise_ceiling() if gt.per_seed.shape[1] >= 2 else None
    for method, opts in methods:
        grid = [opts] if opts is not None else DEFAULT_GRIDS.get(method, [{}])
        best: tuple[float, dict[str, Any], torch.Tensor, float, float] | None = None
        tried: list[dict[str, Any]] = []
        for candidate in grid:
            try:
                values, fit_s, attr_s = _run(setting, model, trajectory, method, candidate)
            except DatatraceError as exc:
                tried.append({"setting": candidate, "error": str(exc)})
                continue
            v = lds(values[val], gt.subsets, gt.targets[:, val]).mean
            tried.append({"setting": candidate, "val_lds": v})
            if best is None or v > best[0]:
                best = (v, candidate, values, fit_s, attr_s)
        if best is None:
            rows.append({"method": method, "error": tried})
            continue
        v, chosen, values, fit_s, attr_s = best
        result = lds(values[test], gt.subsets, gt.targets[:, test])
        per_query[method] = result.per_query
        low, high = result.bootstrap_ci()
        rows.append(
            {
                "method": method,
                "setting": chosen,
                "val_lds": v,
                "lds": result.mean,
                "ci": [low, high],
                "fit_s": fit_s,
                "attribute_s": attr_s,
                "grid": tried,
            }
        )
    _print_table(setting.name, rows, random_lds.mean, None if ceiling is None else ceiling.mean)
    if args.json is not None:
        payload = {
            "setting": setting.to_json(),
            "recipe_hash": setting.recipe_hash(),
            "rows": rows,
            "random_lds": random_lds.mean,
            "noise_ceiling": None if ceiling is None else ceiling.mean,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.out is not None:
        from datatrace.bench.plots import plot_lds_distribution, plot_pareto

        done = [r for r in rows if "error" not in r]
        if done:
            plot_pareto(done, args.out / "pareto.png", f"{setting.name}: efficacy vs cost")
            plot_lds_distribution(
                per_query, args.out / "lds_per_query.png", f"{setting.name}: per-query LDS"
            )
            print(f"plots written to {args.out}/pareto.png and lds_per_query.png")
    return 0


def _print_table(
    name: str, rows: list[dict[str, Any]], random_lds: float, ceiling: float | None
) -> None:
    print(f"\n{name}: LDS on test queries (hyperparameters chosen on validation queries)")
    print(f"{'method':14s} {'LDS':>7s} {'95% CI':>17s} {'fit s':>8s} {'attr s':>8s}  setting")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:14s} failed on every grid point: {r['error'][0]['error']}")
            continue
        ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        print(
            f"{r['method']:14s} {r['lds']:7.3f} {ci:>17s} {r['fit_s']:8.2f} {r['attribute_s']:8.2f}  {json.dumps(r['setting'])}"
        )
    print(f"{'random scores':14s} {random_lds:7.3f}")
    if ceiling is not None:
        print(f"{'noise ceiling':14s} {ceiling:7.3f}")


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".datatrace-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {str(path)!r} ({exc.strerror}); choose a writable directory."
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datatrace", description="Training data attribution benchmark."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="list registered settings").set_defaults(fn=_cmd_settings)
    for name, fn, help_text in (
        ("groundtruth", _cmd_groundtruth, "build (or reuse) the LDS ground truth of a setting"),
        ("bench", _cmd_bench, "LDS and cost of every method on a setting"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        p.add_argument(
            "--setting", default="digits-mlp", help="registered setting (see `datatrace settings`)"
        )
        p.add_argument(
            "--size", choices=["full", "small"], default=None, help="setting size preset"
        )
        p.add_argument("--m", type=int, default=50, help="LDS subsets (default 50)")
        p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
        p.add_argument("--seeds", type=int, default=2, help="retrainings per subset (default 2)")
        p.add_argument("--workers", type=int, default=2, help="retraining processes (default 2)")
        p.add_argument("--cache", type=Path, default=None, help="ground-truth cache directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "bench":
            p.add_argument(
                "--methods",
                default=DEFAULT_METHODS,
                help="comma-separated ids, options as id:key=value",
            )
            p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
            p.add_argument("--out", type=Path, default=None, help="output directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except DatatraceError as exc:
        print(f"datatrace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
