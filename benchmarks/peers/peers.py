"""datatrace next to the peer libraries (traker, dattri, kronfluence) on one digits MLP and ground truth.

    .venv/bin/python benchmarks/peers/peers.py --json out/peers.json

Each peer lives in its own throw-away virtualenv outside the repository (``--venv-root``,
default ``/tmp``: ``/tmp/peer-traker``, ``/tmp/peer-dattri``, ``/tmp/peer-kronfluence``), created on first use by
:func:`setup_peer` with ``python3 -m venv`` and ``pip install torch==2.14.1
torchvision==0.29.1 <peer>==<version>`` (torch pinned: an unpinned torch pulls a multi-GB CUDA
build). The peers are never datatrace dependencies. ``--setup-only`` only builds the venvs.

Flow: this script (run with the project's venv) trains the members (``train_model`` with seeds
0..4, cached in ``benchmarks.peers.digits.CACHE``), saves state dicts, training data and the test queries
as ``.pt`` to a temporary directory, computes datatrace's scores, then runs
``benchmarks/peers/peer_runner.py`` (torch + the peer only) in each peer venv, which writes the
peer's scores and times back. Everything runs on CPU with the same thread count.

For every algorithm both sides implement (TRAK with 1 and 5 members at the same
``proj_dim``, TRAK on the last layer without projection, Grad-Dot, Grad-Cos, IF with CG on
the damped exact Hessian; with kronfluence, K-FAC and EK-FAC influence on the true Fisher),
it reports: the Spearman correlation of our scores with the peer's
(mean over queries of the per-query correlation over training examples, and over all
entries flattened); for TRAK also ours against ours with another projection seed (the
agreement projection randomness alone allows); the LDS of both on the test queries with the
paired-bootstrap 95% interval of ours - peer (DESIGN.md §9: "not worse" iff its upper end is
>= 0); and median warm fit+attribute times with the ratio peer / ours.

Only the test queries (``recipe.n_val : n_val + n_test``) are attributed: no hyperparameter
is tuned here (settings are matched to the peer or are the libraries' defaults; the IF
damping is set from the Hessian's spectrum, see ``--damping``), so validation queries are
not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers.digits import (
    CACHE,
    DigitsRecipe,
    digits_ground_truth,
    digits_queries,
    train_model,
)
from benchmarks.peers.peer_runner import SLOW, timed
from datatrace import Task, make_attributor
from datatrace.bench.digits import digits_mlp
from datatrace.bench.groundtruth import noise_ceiling
from datatrace.metrics import lds, paired_bootstrap, spearman, spearman_batched

RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
# Peer versions the comparison was written and run against (docs/peers.md).
PEERS = {"traker": "0.3.2", "dattri": "0.3.0", "kronfluence": "1.0.1"}
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Which of our method keys each peer implements.
PEER_METHODS = {
    "traker": ["trak-1", "trak-5", "trak-last-exact"],
    "dattri": ["trak-1", "trak-5", "trak-last-exact", "grad-dot", "grad-cos", "if-cg"],
    "kronfluence": ["if-ekfac", "if-kfac"],
}
ALL_METHODS = [
    "trak-1",
    "trak-5",
    "trak-last-exact",
    "grad-dot",
    "grad-cos",
    "if-cg",
    "if-ekfac",
    "if-kfac",
]
LAST_LAYER = ["4.weight", "4.bias"]  # the 64 -> 10 output layer of the 64-128-64-10 MLP

EXPLAIN = {
    "trak-1": (
        "Same estimator in all three (margin features, Q = 1 - p averaged separately, Gaussian "
        "projection, (Phi^T Phi)^-1 kernel). Each library draws its own projection matrix, so "
        "the scores agree only as well as two projection seeds of one library do ('ours vs "
        "ours' column; the LDS of our other seed is listed below). traker's CPU projector and "
        "dattri's are the same code with the same seed scheme, so the two peers give the same "
        "matrix and near-identical scores (peer vs peer below)."
    ),
    "trak-5": (
        "As trak-1, averaged over 5 members; member averaging also averages projection noise, "
        "so the agreement rises, and again equals the seed-to-seed agreement of ours."
    ),
    "trak-last-exact": (
        "No projection (last layer only, 650 parameters): deterministic, so this isolates the "
        "formula. The margin gradient is orthogonal to the all-ones class direction, so the "
        "kernel is singular and all three get the same damping (1e-3 x mean diagonal, "
        "rescaled by each peer's 1/sqrt(n_params) gradient normalisation). dattri matches to "
        "~4e-4; traker inverts the kernel (condition number ~1e5) with an explicit float32 "
        "torch.linalg.inv, which alone costs ~1% relative error and Spearman ~0.99 (emulated: "
        "float32 inv vs float64 solve gives 0.988); our Cholesky solve agrees with float64 "
        "to 2e-4."
    ),
    "grad-dot": (
        "dattri TracInAttributor with one checkpoint, weight 1 and its projection switched off "
        "(dattri 0.3.0 projects to 512 dims unless projector_kwargs is cleared after "
        "construction); query gradient of -margin, train gradient of the cross-entropy loss, "
        "as ours. Same gradients; ours are scored from layer factors (exact, summed in another "
        "order), so the scores agree to float32 rounding (relative L2 ~1e-7)."
    ),
    "grad-cos": (
        "As grad-dot with normalised gradients (normalized_grad=True): equal to float32 rounding."
    ),
    "if-cg": (
        "dattri IFAttributorCG: exact Hessian of the mean training loss (one full batch) + "
        "regularization * I, exactly max_iter CG steps from x0 = v, no 1/n factor, positive "
        "= proponent when the target is loss-like (we pass -margin); ours: curvature="
        "'hessian', the same damping and max_iter, scores / n. So peer = n x ours (n = 1437, "
        "'scale' below), which neither Spearman nor LDS sees."
    ),
    "if-ekfac": (
        "kronfluence Analyzer, strategy 'ekfac': true Fisher with labels sampled from the model "
        "(each library draws its own), K-FAC eigenbases of every Linear layer (bias as a ones "
        "column), eigenvalues corrected on the training gradients, damping 0.1 x each layer's "
        "mean eigenvalue (or --kfac-damping), measurement -margin, no 1/n factor. Ours: "
        "curvature='ekfac', fisher='true', the same damping rule, scores / n."
    ),
    "if-kfac": (
        "As if-ekfac with strategy 'kfac' (eigenvalues = products of the factor eigenvalues)."
    ),
}


# ------------------------------------------------------------------------------------ venvs


def peer_python(name: str, root: Path) -> Path:
    return root / f"peer-{name}" / "bin" / "python"


def setup_peer(name: str, root: Path, version: str | None = None) -> Path:
    """Create ``root/peer-NAME`` with ``python3 -m venv`` and install pinned torch + the peer.

    Idempotent: an existing venv whose interpreter can import the peer is reused.
    """
    py = peer_python(name, root)
    module = "trak" if name == "traker" else name
    if py.exists() and subprocess.run([py, "-c", f"import {module}"]).returncode == 0:
        return py
    base = shutil.which("python3") or sys.executable
    venv = py.parent.parent
    print(f"setting up {venv} (torch 2.14.1 + {name}) ...", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    spec = f"{name}=={version or PEERS[name]}"
    subprocess.run([py, "-m", "pip", "install", "-q", *TORCH_PINS, spec], check=True)
    return py


def run_peer(
    name: str, py: Path, inputs: Path, out: Path, spec: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run peer_runner.py in the peer's venv; its result dict, or ``{"failed": message}``."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(py), str(RUNNER), "--peer", name, "--inputs", str(inputs), "--out", str(out)]
    cmd += ["--spec", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f}s"}
    sys.stdout.write(proc.stdout)
    if proc.returncode == 0 and out.exists():
        return torch.load(out, weights_only=True)
    why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
    message = f"{why}: {proc.stderr.strip()[-2000:]}"
    if not out.exists():
        return {"failed": message}
    partial = torch.load(out, weights_only=True)  # the methods that finished before the crash
    partial["crashed"] = message
    return partial


# ------------------------------------------------------------------------------------ ours


def member_states(train: Any, recipe: DigitsRecipe, k: int) -> list[dict[str, torch.Tensor]]:
    """State dicts of ``train_model(train, recipe, seed)`` for seeds 0..k-1 (cached on disk)."""
    states = []
    for seed in range(k):
        path = CACHE / f"digits-member-{recipe.key()}-seed{seed}.pt"
        if path.exists():
            states.append(torch.load(path, weights_only=True))
            continue
        t0 = time.perf_counter()
        sd = {
            k_: v.detach().clone()
            for k_, v in train_model(train, recipe, seed).state_dict().items()
        }
        print(f"trained member {seed} in {time.perf_counter() - t0:.1f}s", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(sd, tmp)
        tmp.replace(path)
        states.append(sd)
    return states


def last_layer_damping(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rel: float
) -> float:
    """``rel`` x the mean diagonal of the exact last-layer TRAK kernel ``G^T G``.

    A last-layer margin gradient is ``delta h^T`` (weight) and ``delta`` (bias), so its squared
    norm is ``|delta|^2 (|h|^2 + 1)``; summing over examples gives the kernel's trace.
    """
    from datatrace.task import margin

    with torch.no_grad():
        h = model[:-1](x)
    z = model[-1](h).detach().requires_grad_(True)
    (delta,) = torch.autograd.grad(margin(z, y).sum(), z)
    trace = float(((delta**2).sum(1) * ((h**2).sum(1) + 1)).sum())
    n_params = sum(p.numel() for p in model[-1].parameters())
    return rel * trace / n_params


def ours_methods(
    sds: list[dict[str, torch.Tensor]],
    hidden: tuple[int, ...],
    args: argparse.Namespace,
    lam_last: float,
) -> dict[str, Any]:
    model = digits_mlp(hidden)
    model.load_state_dict(sds[0])
    model.eval()
    full = Task(model, target="margin")
    last = Task(model, target="margin", params=LAST_LAYER)
    common = {"batch_size": args.batch_size}
    # relative_damping 1e-4 (our default until session 3): near traker's plain inverse
    trak: dict[str, Any] = {
        "projector": args.trak_projector,
        "proj_dim": args.trak_proj_dim or args.proj_dim,
        "relative_damping": args.trak_relative_damping,
        **common,
    }
    return {
        "trak-1": ("trak", full, {**trak, "members": sds[:1]}),
        "trak-5": ("trak", full, {**trak, "members": sds[:5]}),
        "trak-last-exact": (
            "trak",
            last,
            {"projector": "none", "damping": lam_last, "members": sds[:1], **common},
        ),
        "grad-dot": ("grad-dot", full, {"members": sds[:1], **common}),
        # K-FAC / EK-FAC with kronfluence's defaults: true Fisher (sampled labels) and, unless
        # --kfac-damping is a number, 0.1 x each layer's mean eigenvalue.
        **{
            f"if-{kind}": (
                f"if-{kind}",
                full,
                {
                    "damping": args.kfac_damping,
                    "fisher": args.kfac_fisher,
                    "fisher_samples": args.kfac_fisher_samples,
                    "members": sds[:1],
                    **common,
                },
            )
            for kind in ("ekfac", "kfac")
        },
        "grad-cos": ("grad-cos", full, {"members": sds[:1], **common}),
        "if-cg": IF_CG_OURS[args.if_cg_ours](full, args, {"members": sds[:1], **common}),
    }


# Our side of the if-cg row: "cg" runs dattri's algorithm (same Hessian, damping and CG
# steps); "ekfac"/"kfac" run our closed-form K-FAC/EK-FAC influence instead (true Fisher,
# heuristic damping): another estimator, so compare LDS and time, not scores.
IF_CG_OURS: dict[str, Any] = {
    "cg": lambda task, args, common: (
        "if-cg",
        task,
        {
            "curvature": "hessian",
            "damping": args.damping,
            "solver_options": {"max_iter": args.cg_iter},
            **common,
        },
    ),
    **{
        kind: (
            lambda task, args, common, kind=kind: (
                f"if-{kind}",
                task,
                {"damping": "heuristic", "fisher": "true", **common},
            )
        )
        for kind in ("ekfac", "kfac")
    },
}


def run_ours(
    method_id: str, task: Task, opts: dict[str, Any], train: Any, queries: Any, reps: int, warm: int
) -> tuple[dict[str, Any], list[str]]:
    caught: list[str] = []

    def fit() -> Any:
        return make_attributor(method_id, task, **opts).fit(train)

    def attribute(attr: Any) -> torch.Tensor:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            values = attr.attribute(queries).values
        # Only our own numerical warnings (e.g. CG not converged), not torch deprecations.
        caught[:] = sorted({str(x.message) for x in w if issubclass(x.category, RuntimeWarning)})
        return values

    return timed(fit, attribute, reps, warm), caught


# ------------------------------------------------------------------------------------ compare


def compare(
    ours: torch.Tensor, peer: torch.Tensor, subsets: torch.Tensor, targets: torch.Tensor
) -> dict[str, Any]:
    a, b = ours.double(), peer.double()
    scale = float((a * b).sum() / (a * a).sum())  # least-squares c in peer ~ c * ours
    lo_o = lds(a, subsets, targets)
    lo_p = lds(b, subsets, targets)
    low, high = paired_bootstrap(lo_o, lo_p)
    verdict = "better" if low > 0 else ("not worse" if high >= 0 else "worse")
    return {
        "spearman_per_query": float(spearman_batched(a, b, dim=1).nanmean()),
        "spearman_flat": spearman(a.flatten(), b.flatten()),
        "scale_peer_over_ours": scale,
        "rel_err_after_scale": float((b - scale * a).norm() / b.norm()),
        "lds_ours": lo_o.mean,
        "lds_ours_ci": list(lo_o.bootstrap_ci()),
        "lds_peer": lo_p.mean,
        "lds_peer_ci": list(lo_p.bootstrap_ci()),
        "lds_diff_ci": [low, high],
        "verdict": verdict,
    }


def fmt_row(r: dict[str, Any]) -> str:
    ref = r.get("spearman_ours_other_seed")
    ref_s = f"{ref:.3f}" if ref is not None else "-"
    lo, hi = r["lds_diff_ci"]
    return (
        f"| {r['method']} | {r['peer']} | {r['spearman_per_query']:.3f} / "
        f"{r['spearman_flat']:.3f} | {ref_s} | {r['rel_err_after_scale']:.1e} | "
        f"{r['lds_ours']:.3f} | {r['lds_peer']:.3f} | "
        f"[{lo:+.3f}, {hi:+.3f}] {r['verdict']} | {r['time_ours_s']:.2f} | "
        f"{r['time_peer_s']:.2f} | {r['time_peer_s'] / r['time_ours_s']:.1f}x |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="datatrace vs traker / dattri on the digits MLP")
    ap.add_argument(
        "--peers", default="traker,dattri,kronfluence", help="comma-separated: " + ",".join(PEERS)
    )
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated keys")
    ap.add_argument(
        "--trak-projector",
        default="gaussian",
        help="our TRAK rows' projector (gaussian = the peers' own; e.g. factored: our fastest "
        "path, a different random sketch, so compare LDS and time, not scores)",
    )
    ap.add_argument(
        "--trak-relative-damping",
        type=float,
        default=1e-4,
        help="our TRAK rows' relative_damping (1e-4: near the peers' plain inverse; our "
        "library default is 1.0)",
    )
    ap.add_argument(
        "--trak-proj-dim",
        type=int,
        default=None,
        help="our TRAK rows' proj_dim (default --proj-dim; factored: features per layer)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median) per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument(
        "--slow-repeats",
        type=int,
        default=1,
        help="timed runs of IF-CG (tens of seconds each; no warm-up run)",
    )
    ap.add_argument("--proj-dim", type=int, default=512, help="TRAK projection dimension")
    ap.add_argument(
        "--damping",
        type=float,
        default=0.1,
        help="IF-CG damping on the mean-loss Hessian; must exceed -lambda_min(H) ~ 0.045",
    )
    ap.add_argument("--cg-iter", type=int, default=30, help="CG iterations (both libraries)")
    ap.add_argument(
        "--if-cg-ours",
        default="cg",
        choices=sorted(IF_CG_OURS),
        help="our side of the if-cg row: cg (dattri's algorithm) or our K-FAC/EK-FAC influence "
        "(another estimator: compare LDS and time)",
    )
    ap.add_argument(
        "--kfac-damping",
        type=lambda t: t if t == "heuristic" else float(t),
        default="heuristic",
        help="K-FAC/EK-FAC damping: a number, or 'heuristic' (0.1 x mean eigenvalue per layer)",
    )
    ap.add_argument(
        "--kfac-fisher",
        default="true",
        choices=["true", "empirical", "exact"],
        help="our K-FAC/EK-FAC Fisher (kronfluence: 'true', one sampled label per example)",
    )
    ap.add_argument(
        "--kfac-fisher-samples", type=int, default=1, help="sampled labels per example (ours)"
    )
    ap.add_argument("--batch-size", type=int, default=256, help="featurization batch size")
    ap.add_argument(
        "--if-query-batch", type=int, default=25, help="queries per CG batch in dattri's IF"
    )
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--setup-only", action="store_true", help="only build the peer venvs")
    ap.add_argument("--peer-timeout", type=float, default=900.0, help="seconds per peer run")
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from {sorted(PEERS)}")
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {ALL_METHODS}")

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    pythons: dict[str, Path] = {}
    setup_errors: dict[str, str] = {}
    for p in peers:
        try:
            pythons[p] = setup_peer(p, args.venv_root)
        except (subprocess.CalledProcessError, OSError) as exc:
            setup_errors[p] = f"setup failed: {exc}"
            print(f"{p}: {setup_errors[p]}", flush=True)
    if args.setup_only:
        return

    torch.set_num_threads(args.threads)
    recipe = DigitsRecipe()
    gt = digits_ground_truth(recipe)
    train, queries = digits_queries(recipe)
    test = slice(recipe.n_val, recipe.n_val + recipe.n_test)
    q_test = (queries[0][test], queries[1][test])
    targets = gt.targets[:, test]
    ceiling = noise_ceiling(gt.per_seed[:, :, test])
    g = torch.Generator().manual_seed(0)
    random_lds = lds(
        torch.randn(recipe.n_test, len(train[1]), generator=g, dtype=torch.float64),
        gt.subsets,
        targets,
    )
    sds = member_states(train, recipe, args.members)
    model0 = digits_mlp(recipe.hidden)
    model0.load_state_dict(sds[0])
    model0.eval()
    lam_last = last_layer_damping(model0, *train, rel=1e-3)

    spec = {
        "proj_dim": args.proj_dim,
        "damping": args.damping,
        "cg_iter": args.cg_iter,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "slow_repeats": args.slow_repeats,
        "slow_warmup": 0,
        "threads": args.threads,
        "last_layer": LAST_LAYER,
        "last_layer_damping": lam_last,
        "seed": 0,
        "if_query_batch": args.if_query_batch,
        "if_cg_ours": args.if_cg_ours,
        "kfac_damping": None if args.kfac_damping == "heuristic" else args.kfac_damping,
    }

    # ---- ours
    ours: dict[str, dict[str, Any]] = {}
    table = ours_methods(sds, recipe.hidden, args, lam_last)
    for key in methods:
        method_id, task, opts = table[key]
        slow = key in SLOW
        t0 = time.perf_counter()
        res, caught = run_ours(
            method_id,
            task,
            opts,
            train,
            q_test,
            args.slow_repeats if slow else args.repeats,
            0 if slow else args.warmup,
        )
        res["warnings"] = caught
        ours[key] = res
        print(f"[datatrace] {key}: {time.perf_counter() - t0:.1f}s", flush=True)
    # Projection-noise reference: the same TRAK with another projection seed.
    other_seed: dict[str, torch.Tensor] = {}
    for key in ("trak-1", "trak-5"):
        if key in methods:
            method_id, task, opts = table[key]
            attr = make_attributor(method_id, task, **{**opts, "seed": 1}).fit(train)
            other_seed[key] = attr.attribute(q_test).values

    # ---- peers
    peer_out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="datatrace-peers-") as tmp:
        inputs = Path(tmp) / "inputs.pt"
        torch.save(
            {
                "x_train": train[0],
                "y_train": train[1],
                "x_query": q_test[0],
                "y_query": q_test[1],
                "members": sds,
                "hidden": list(recipe.hidden),
            },
            inputs,
        )
        for p, py in pythons.items():
            todo = [m for m in methods if m in PEER_METHODS[p]]
            t0 = time.perf_counter()
            peer_out[p] = run_peer(
                p, py, inputs, Path(tmp) / f"{p}.pt", {**spec, "methods": todo}, args.peer_timeout
            )
            print(f"[{p}] total {time.perf_counter() - t0:.1f}s", flush=True)

    # ---- compare
    rows: list[dict[str, Any]] = []
    problems: dict[str, Any] = dict(setup_errors)
    for p, out in peer_out.items():
        if "failed" in out:
            problems[p] = out["failed"]
            continue
        if "crashed" in out:
            problems[p] = out["crashed"]
        for key, err in out["errors"].items():
            problems[f"{p}/{key}"] = err
        for key in methods:
            if key not in out["results"] or key not in ours:
                continue
            mine, theirs = ours[key], out["results"][key]
            row = {"method": key, "peer": f"{p} {out['version']}"}
            row.update(compare(mine["scores"], theirs["scores"], gt.subsets, targets))
            if key in other_seed:
                row["spearman_ours_other_seed"] = float(
                    spearman_batched(
                        mine["scores"].double(), other_seed[key].double(), dim=1
                    ).mean()
                )
                row["lds_ours_other_seed"] = lds(other_seed[key], gt.subsets, targets).mean
            row.update(
                {
                    "time_ours_s": mine["total_s"],
                    "time_peer_s": theirs["total_s"],
                    "fit_ours_s": mine["fit_s"],
                    "attribute_ours_s": mine["attribute_s"],
                    "fit_peer_s": theirs["fit_s"],
                    "attribute_peer_s": theirs["attribute_s"],
                    "timed_runs": theirs["runs"],
                    "ours_warnings": mine["warnings"],
                }
            )
            rows.append(row)

    print()
    print(
        f"digits MLP 64-128-64-10, {len(train[1])} train, {recipe.n_test} test queries, "
        f"LDS over {recipe.m} subsets (alpha={recipe.alpha}); noise ceiling {ceiling.mean:.3f}, "
        f"random scores {random_lds.mean:+.3f}; CPU, {args.threads} threads"
    )
    print()
    print(
        "| method | peer | Spearman ours vs peer (per query / flat) | ours vs ours, other "
        "proj. seed | rel. L2 diff | LDS ours | LDS peer | ours - peer LDS, 95% CI | "
        "time ours (s) | time peer (s) | peer / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt_row(r))
    # traker vs dattri where both ran (their CPU projectors share code and seeds).
    both = {p: o["results"] for p, o in peer_out.items() if "failed" not in o and "results" in o}
    peer_vs_peer: dict[str, float] = {}
    if len(both) == 2:
        (_, ra), (_, rb) = both.items()
        for key in methods:
            if key in ra and key in rb:
                peer_vs_peer[key] = float(
                    spearman_batched(
                        ra[key]["scores"].double(), rb[key]["scores"].double(), dim=1
                    ).mean()
                )

    print()
    if args.trak_projector != "gaussian" or args.trak_relative_damping != 1e-4:
        print(
            f"- NOTE: our TRAK rows use projector={args.trak_projector!r} "
            f"(proj_dim {args.trak_proj_dim or args.proj_dim}, relative_damping "
            f"{args.trak_relative_damping}), not the peers' Gaussian "
            "projection: same estimator, another random sketch; compare LDS and time."
        )
    if args.if_cg_ours != "cg":
        print(
            f"- NOTE: our if-cg row runs if-{args.if_cg_ours} (true Fisher, heuristic damping), "
            "not CG on the Hessian: another estimator; compare LDS and time."
        )
    for key in methods:
        if any(r["method"] == key for r in rows):
            print(f"- {key}: {EXPLAIN[key]}")
    for r in rows:
        extra = f"scale peer/ours {r['scale_peer_over_ours']:.4g}"
        if "lds_ours_other_seed" in r:
            extra += f"; LDS of ours with projection seed 1: {r['lds_ours_other_seed']:.3f}"
        print(f"- {r['method']} vs {r['peer']}: {extra}")
    for key, rho in peer_vs_peer.items():
        print(f"- {key}: traker vs dattri Spearman (per query) {rho:.3f}")
    for r in rows:
        if r["ours_warnings"]:
            print(f"- datatrace {r['method']} warned: {r['ours_warnings']}")
    for k, v in problems.items():
        print(f"- PROBLEM {k}: {v.splitlines()[0] if v else v}")
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()
    print(
        f"\nwall time {wall:.0f}s; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} cores"
    )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out_json = {
            "command": " ".join(
                [".venv/bin/python", "benchmarks/peers/peers.py", *(argv or sys.argv[1:])]
            ),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "spec": spec,
            "versions": {
                "datatrace_torch": torch.__version__,
                **{
                    p: {"version": o.get("version"), "torch": o.get("torch")}
                    for p, o in peer_out.items()
                    if "failed" not in o
                },
            },
            "noise_ceiling": ceiling.mean,
            "random": random_lds.mean,
            "rows": rows,
            "spearman_traker_vs_dattri": peer_vs_peer,
            "problems": problems,
            "explanations": {k: EXPLAIN[k] for k in methods},
            "wall_s": wall,
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
            "cpu_count": os.cpu_count(),
        }
        args.json.write_text(json.dumps(out_json, indent=2, default=str))


if __name__ == "__main__":
    main()
