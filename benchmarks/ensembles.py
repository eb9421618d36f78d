"""LDS vs number of members for independent, Dropout and LoRA ensembles, with their cost.

    python benchmarks/ensembles.py --json out/ensembles.json --out out
    python benchmarks/ensembles.py --setting digits-cnn --ks 1,2,4 --dropout-layers 5,7 \
        --dropout-rate 0.1 --methods trak,grad-cos --kinds independent,dropout --threads 1

On a registered setting (default ``digits-mlp``, full preset: 1,437 train, 60 validation and
300 test queries, MLP 64-128-64-10 with dropout 0.1, Adam 30 epochs), for K in ``--ks``
(default {1, 2, 4, 8}):

- ``independent``: K models trained with seeds 0..K-1 (the naive ensemble).
- ``dropout``: the seed-0 model seen through K fixed masks of its own dropout layers, or of
  the outputs of ``--dropout-layers`` at ``--dropout-rate`` (injected dropout, for models
  without dropout layers such as ``digits-cnn``'s).
- ``dropout-2``: masks spread over the seed-0 and seed-1 models (round robin).
- ``lora``: the seed-0 model plus K LoRA adapters (rank ``--rank`` on every Linear),
  each fine-tuned from it with its own seed and data order; adapter gradients.
- ``lora-full`` (optional): the same adapters, gradients w.r.t. all parameters.
- ``trak-q-dropout`` (TRAK only): one unmasked model's features, Q averaged over K masks.

Methods: TRAK, influence (``if-explicit``, projected empirical Fisher) and Grad-Cos, with the
settings chosen on validation queries for one digits-MLP model in ``benchmarks/lds_digits.py``
(not re-tuned per ensemble or setting). Costs: training time (every model and adapter the ensemble needs,
measured once each), serving time (fit + attribute, features written to a store), bytes
stored (member weights + the store's train features on disk). LDS is reported on the test
queries with 95% bootstrap intervals; the comparisons use paired bootstraps (DESIGN.md §9).
Two PNGs go to ``--out``: LDS vs training time and LDS vs serving time, one line per method
and ensemble kind, points labelled by K.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datatrace import Checkpoint, dropout_members, make_attributor, train_lora_members
from datatrace.bench.cache import GroundTruthSpec, lds_ground_truth
from datatrace.bench.ensembles import EnsembleSpec
from datatrace.bench.plots import CostPoint, plot_cost_curves
from datatrace.bench.settings import get_setting
from datatrace.data import num_examples
from datatrace.errors import DatatraceError
from datatrace.metrics import beats, lds, not_worse

METHODS: dict[str, dict[str, Any]] = {
    "trak": {"proj_dim": 2048, "relative_damping": 1.0},
    "if-explicit": {
        "curvature": "fisher",
        "projector": "rademacher",
        "proj_dim": 2048,
        "damping": 1e-3,
    },
    "grad-cos": {},
}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plot_rows(rows: list[dict[str, Any]], out: Path, setting_name: str) -> list[Path]:
    """LDS vs training time and vs serving time, one line per method x kind, labelled by K."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cost, xlabel, key in (
        ("training", "training time: every model and adapter (s, log scale)", "train"),
        ("serving", "serving time: fit + attribute (s, log scale)", "serve"),
    ):
        points = [
            CostPoint(
                method=r["method"],
                series=f"{r['method']} {r['kind']}",
                k=r["k"],
                cost=r["train_s"] if key == "train" else r["fit_s"] + r["attribute_s"],
                lds=r["test_lds"],
                ci=(r["ci"][0], r["ci"][1]),
            )
            for r in rows
        ]
        path = out / f"ensembles_{setting_name}_{key}.png"
        title = f"{setting_name}: ensemble LDS vs {cost} cost"
        written.append(plot_cost_curves(points, path, title, xlabel))
    return written


def time_training(setting: Any, args: argparse.Namespace) -> None:
    """Median seconds of one full training and one LoRA fine-tuning, interleaved.

    Interleaving puts both under the same machine load, so their ratio is fair even where
    the absolute times are not (a shared machine).
    """
    model_s, adapter_s = [], []
    for r in range(args.time_training):
        t0 = time.perf_counter()
        model = setting.train(seed=100 + r)
        model_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_lora_members(
            setting.make_task(model),
            setting.data.train,
            1,
            rank=args.rank,
            epochs=args.lora_epochs,
            lr=args.lora_lr,
            seed=r,
        )
        adapter_s.append(time.perf_counter() - t0)
    m, a = statistics.median(model_s), statistics.median(adapter_s)
    print(f"one model: median {m:.2f} s of {[round(t, 2) for t in model_s]}")
    print(f"one adapter: median {a:.2f} s of {[round(t, 2) for t in adapter_s]}")
    for k in args.ks:
        print(
            f"K={k}: independent {k * m:.1f} s, dropout (1 model) {m:.1f} s, LoRA "
            f"{m + k * a:.1f} s = {(m + k * a) / (k * m):.0%} of independent"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="digits-mlp", help="registered setting")
    parser.add_argument("--size", default="full", choices=["full", "small"])
    parser.add_argument("--ks", default="1,2,4,8", help="numbers of members K")
    parser.add_argument(
        "--dropout-layers",
        default=None,
        help="comma-separated modules to inject dropout after (models without dropout layers)",
    )
    parser.add_argument(
        "--dropout-rate", type=float, default=None, help="drop rate (needed with --dropout-layers)"
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory of the PNGs")
    parser.add_argument("--m", type=int, default=50, help="LDS subsets")
    parser.add_argument("--workers", type=int, default=2, help="ground-truth processes")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kinds", default="independent,dropout,dropout-2,lora,trak-q-dropout")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lora-epochs", type=int, default=5)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--time-training",
        type=int,
        default=0,
        help="only time training: N interleaved repeats of one model and one adapter",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.ks = tuple(sorted({int(k) for k in args.ks.split(",")}))
    layers = None if args.dropout_layers is None else tuple(args.dropout_layers.split(","))

    setting = get_setting(args.setting, size=args.size)
    kinds = args.kinds.split(",")
    if {"dropout", "dropout-2"} & set(kinds):
        try:  # a model without dropout layers needs injection: say so before any training
            EnsembleSpec("dropout", 1, rate=args.dropout_rate, layers=layers).check(setting)
        except DatatraceError as exc:
            parser.error(f"{exc} (here: --dropout-layers NAME,NAME --dropout-rate 0.1)")
    if args.time_training:
        time_training(setting, args)
        return
    gt = lds_ground_truth(setting, GroundTruthSpec(m=args.m, seeds=2), workers=args.workers)
    train = setting.data.train
    queries = setting.data.queries("all")
    val = slice(0, setting.n_val)
    test = slice(setting.n_val, setting.n_val + setting.n_test)

    def score(values: torch.Tensor, part: slice):
        return lds(values[part], gt.subsets, gt.targets[:, part])

    # ---------------------------------------------------------------- training (timed once each)
    models, train_s = [], []
    kmax = max(args.ks)
    n_models = kmax if "independent" in kinds else (2 if "dropout-2" in kinds else 1)
    for seed in range(n_models):
        t0 = time.perf_counter()
        models.append(setting.train(seed=seed))
        train_s.append(time.perf_counter() - t0)
    model_bytes = state_bytes(models[0].state_dict())
    base_task = setting.make_task(models[0])
    lora, lora_s = [], []
    if "lora" in kinds or "lora-full" in kinds:
        for j in range(kmax):  # one at a time, to time each adapter
            t0 = time.perf_counter()
            (member,) = train_lora_members(
                base_task,
                train,
                1,
                rank=args.rank,
                epochs=args.lora_epochs,
                lr=args.lora_lr,
                seed=j,
            )
            lora_s.append(time.perf_counter() - t0)
            lora.append(member)
    adapter_bytes = state_bytes(dict(lora[0].adapter)) if lora else 0
    adapter_dim = sum(t.numel() for t in lora[0].adapter.values()) if lora else 0
    print(
        f"trained {len(models)} models: {sum(train_s):.1f} s (median {statistics.median(train_s):.2f} s "
        f"each), {model_bytes / 1e3:.0f} kB each"
    )
    if lora:
        print(
            f"trained {len(lora)} LoRA adapters (rank {args.rank}, {adapter_dim} parameters): "
            f"{sum(lora_s):.1f} s (median {statistics.median(lora_s):.2f} s each), "
            f"{adapter_bytes / 1e3:.1f} kB each"
        )

    def plan(kind: str, k: int) -> tuple[list[Any] | None, float, int, dict[str, Any]]:
        """members, training seconds, weight bytes, extra method options."""
        if kind == "independent":
            members = [Checkpoint(m.state_dict()) for m in models[:k]]
            return members, sum(train_s[:k]), k * model_bytes, {}
        if kind == "dropout":
            members = dropout_members(k, rate=args.dropout_rate, layers=layers, models=models[:1])
            return members, train_s[0], model_bytes, {}
        if kind == "dropout-2":
            used = min(k, 2)
            members = dropout_members(
                k, rate=args.dropout_rate, layers=layers, models=models[:used]
            )
            return members, sum(train_s[:used]), used * model_bytes, {}
        if kind == "lora":
            extra = {"projector": "none"} if adapter_dim <= 2048 else {}
            return lora[:k], train_s[0] + sum(lora_s[:k]), model_bytes + k * adapter_bytes, extra
        if kind == "lora-full":  # the same adapters, gradients w.r.t. all parameters
            members = [dataclasses.replace(m, params="full") for m in lora[:k]]
            return members, train_s[0] + sum(lora_s[:k]), model_bytes + k * adapter_bytes, {}
        if kind == "trak-q-dropout":
            extra = {"q_dropout": k, "q_dropout_rate": args.dropout_rate}
            return None, train_s[0], model_bytes, {**extra, "q_dropout_layers": layers}
        raise ValueError(kind)

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    per_query: dict[tuple[str, str, int], torch.Tensor] = {}
    ceiling = gt.noise_ceiling()
    g = torch.Generator().manual_seed(0)
    rand = score(torch.randn(num_examples(queries), setting.n_train, generator=g), test)
    print(f"noise ceiling {ceiling.mean:.3f}; random scores {rand.mean:+.3f}")
    for method in args.methods.split(","):
        # warm-up (first-call costs would otherwise land on the first row)
        make_attributor(method, base_task, batch_size=256, **METHODS[method]).fit(train)
        for kind in kinds:
            if kind == "trak-q-dropout" and method != "trak":
                continue
            for k in args.ks:
                members, t_train, w_bytes, extra = plan(kind, k)
                opts = {**METHODS[method], **extra}
                with tempfile.TemporaryDirectory() as tmp:
                    attr = make_attributor(
                        method,
                        base_task,
                        members=members,
                        batch_size=256,
                        store=Path(tmp) / "store",
                        **opts,
                    )
                    t0 = time.perf_counter()
                    try:
                        attr.fit(train)
                        t1 = time.perf_counter()
                        values = attr.attribute(queries).values
                    except DatatraceError as exc:  # one failing point must not lose the rest
                        failures.append({"method": method, "kind": kind, "k": k, "error": str(exc)})
                        print(f"  {method:11s} {kind:15s} K={k}: failed: {exc}", flush=True)
                        continue
                    t2 = time.perf_counter()
                    f_bytes = dir_bytes(Path(tmp) / "store")
                result, v = score(values, test), score(values, val).mean
                lo, hi = result.bootstrap_ci()
                per_query[(method, kind, k)] = result.per_query
                row = {
                    "method": method,
                    "kind": kind,
                    "k": k,
                    "val_lds": v,
                    "test_lds": result.mean,
                    "ci": [lo, hi],
                    "train_s": t_train,
                    "fit_s": t1 - t0,
                    "attribute_s": t2 - t1,
                    "weight_bytes": w_bytes,
                    "feature_bytes": f_bytes,
                }
                rows.append(row)
                print(
                    f"  {method:11s} {kind:15s} K={k}: test LDS {result.mean:.3f} "
                    f"[{lo:.3f}, {hi:.3f}]  train {t_train:6.1f} s  serve "
                    f"{t1 - t0 + t2 - t1:6.1f} s  weights {w_bytes / 1e6:6.2f} MB  "
                    f"features {f_bytes / 1e6:7.1f} MB",
                    flush=True,
                )

    print()
    print(
        "| method | ensemble | K | test LDS | 95% CI | train s | serve s (fit + attribute) "
        "| weights MB | features MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['kind']} | {r['k']} | {r['test_lds']:.3f} | "
            f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['train_s']:.1f} | "
            f"{r['fit_s'] + r['attribute_s']:.1f} ({r['fit_s']:.1f} + {r['attribute_s']:.1f}) | "
            f"{r['weight_bytes'] / 1e6:.2f} | {r['feature_bytes'] / 1e6:.1f} |"
        )
    print(f"| random scores | - | - | {rand.mean:.3f} | - | - | - | - | - |")
    print(f"| noise ceiling | - | - | {ceiling.mean:.3f} | - | - | - | - | - |")

    # ---------------------------------------------------------------- the comparisons
    claims = []

    def compare(a: tuple[str, str, int], b: tuple[str, str, int], how: str) -> None:
        if a not in per_query or b not in per_query:
            return
        fn = beats if how == "beats" else not_worse
        ok, (lo, hi) = fn(per_query[a], per_query[b])
        text = (
            f"{a[0]}: {a[1]} K={a[2]} {'beats' if how == 'beats' else 'is not worse than'} "
            f"{b[1]} K={b[2]}? {'yes' if ok else 'NO'} (paired 95% interval of the LDS "
            f"difference [{lo:.3f}, {hi:.3f}])"
        )
        claims.append({"a": a, "b": b, "how": how, "holds": ok, "interval": [lo, hi]})
        print(text)

    print()
    for method in args.methods.split(","):
        compare((method, "dropout-2", kmax), (method, "independent", kmax), "not-worse")
        compare((method, "dropout", kmax), (method, "independent", 1), "beats")
        compare((method, "dropout-2", kmax), (method, "independent", 2), "beats")
        compare((method, "trak-q-dropout", kmax), (method, "independent", 1), "beats")
    by = {(r["method"], r["kind"], r["k"]): r for r in rows}
    for method in args.methods.split(","):
        naive, lo_ra = by.get((method, "independent", kmax)), by.get((method, "lora", kmax))
        if naive is None or lo_ra is None:
            continue
        ratio = lo_ra["test_lds"] / naive["test_lds"]
        t_ratio = lo_ra["train_s"] / naive["train_s"]
        w_ratio = lo_ra["weight_bytes"] / naive["weight_bytes"]
        s_ratio = (lo_ra["fit_s"] + lo_ra["attribute_s"]) / (naive["fit_s"] + naive["attribute_s"])
        f_ratio = lo_ra["feature_bytes"] / max(naive["feature_bytes"], 1)
        print(
            f"{method}: LoRA K={kmax} / independent K={kmax}: LDS {ratio:.0%} (goal >= 90%), training "
            f"time {t_ratio:.0%} (goal <= 40%), member storage {w_ratio:.0%} (goal <= 30%), "
            f"serving time {s_ratio:.0%}, feature storage {f_ratio:.0%}"
        )
        claims.append(
            {
                "method": method,
                f"lora_vs_independent_k{kmax}": {
                    "lds": ratio,
                    "train_time": t_ratio,
                    "weights": w_ratio,
                    "serve_time": s_ratio,
                    "features": f_ratio,
                },
            }
        )
    for path in plot_rows(rows, args.out, setting.name):
        print(f"plot written: {path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "setting": setting.to_json(),
            "ground_truth": {"m": args.m, "seeds": 2},
            "args": {k: str(v) for k, v in vars(args).items()},
            "noise_ceiling": ceiling.mean,
            "random": rand.mean,
            "train_s": train_s,
            "lora_s": lora_s,
            "rows": rows,
            "failures": failures,
            "claims": claims,
        }
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
