"""Run one peer library (traker, dattri or kronfluence) on the inputs written by ``benchmarks/peers/peers.py``.

This file runs inside the peer's own throw-away virtualenv, so it imports only the standard
library, torch and the peer library -- never datatrace. It rebuilds the digits MLP
(64-128-64-10, ReLU) from the saved state dicts, computes the peer's scores for the saved
queries, times ``fit`` and ``attribute`` (median of warm repeated runs) and writes
everything back as a ``.pt`` file that loads with ``torch.load(..., weights_only=True)``.

Scores are returned in datatrace's orientation, ``(n_query, n_train)`` with positive =
training on the example improves the query; both peers already use that sign (see
``docs/peers.md``), so only the transpose is needed.

Usage (peers.py does this)::

    /tmp/peer-dattri/bin/python benchmarks/peers/peer_runner.py --peer dattri \
        --inputs DIR/inputs.pt --out DIR/dattri.pt --spec '{"methods": ["grad-dot"], ...}'
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

# Methods whose single run takes tens of seconds: timed with spec["slow_repeats"].
SLOW = {"if-cg"}


def build_mlp(hidden: list[int]) -> nn.Module:
    """The benchmark's MLP: 64 -> hidden -> 10 with ReLU (same parameter names)."""
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's margin ``logit_y - logsumexp_{c != y} logit_c`` = ``log(p_y / (1 - p_y))``."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def timed(
    fit: Callable[[], Any], attribute: Callable[[Any], torch.Tensor], repeats: int, warmup: int
) -> dict[str, Any]:
    """Median fit / attribute / total seconds of ``repeats`` runs after ``warmup`` runs."""
    fits, attrs, totals = [], [], []
    scores = None
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        state = fit()
        t1 = time.perf_counter()
        scores = attribute(state)
        t2 = time.perf_counter()
        if i >= warmup:
            fits.append(t1 - t0)
            attrs.append(t2 - t1)
            totals.append(t2 - t0)
    assert scores is not None
    return {
        "scores": scores.detach().to(torch.float32).contiguous(),
        "fit_s": statistics.median(fits),
        "attribute_s": statistics.median(attrs),
        "total_s": statistics.median(totals),
        "runs": float(repeats),
    }


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------ dattri


def dattri_methods(data: dict[str, Any], spec: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    from dattri.algorithm import IFAttributorCG, TracInAttributor, TRAKAttributor
    from dattri.task import AttributionTask

    model = build_mlp(data["hidden"]).eval()
    members = data["members"]
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    n_train, bs = len(yt), spec["batch_size"]

    def _batched(d: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # TRAK/TracIn call the functions per example without a batch dim; IF with one.
        x, y = d
        return (x.unsqueeze(0), y.unsqueeze(0)) if x.ndim == 1 else (x, y)

    def ce_loss(params: dict[str, torch.Tensor], data_: Any) -> torch.Tensor:
        x, y = _batched(data_)
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    def neg_margin(params: dict[str, torch.Tensor], data_: Any) -> torch.Tensor:
        # Loss-like query objective (lower = better), as datatrace's "query" gradient.
        x, y = _batched(data_)
        return -margin(torch.func.functional_call(model, params, (x,)), y).mean()

    def pos_margin(params: dict[str, torch.Tensor], data_: Any) -> torch.Tensor:
        # dattri's TRAK examples use log(p / (1 - p)) for both loss_func and target_func.
        x, y = _batched(data_)
        return margin(torch.func.functional_call(model, params, (x,)), y).mean()

    def correct_prob(params: dict[str, torch.Tensor], data_: Any) -> torch.Tensor:
        x, y = _batched(data_)
        logits = torch.func.functional_call(model, params, (x,))
        return torch.softmax(logits, dim=-1).gather(1, y.view(-1, 1)).squeeze()

    def trak(k: int, proj_dim: int | None, layer_name: list[str] | None) -> tuple[Any, Any]:
        def fit() -> Any:
            task = AttributionTask(
                loss_func=pos_margin, model=model, checkpoints=members[:k], target_func=pos_margin
            )
            kwargs = {
                "proj_dim": proj_dim if proj_dim is not None else 1,
                "proj_max_batch_size": 32,
                "proj_seed": spec["seed"],
                "device": "cpu",
                "proj_type": "normal" if proj_dim is not None else "identity",
            }
            attr = TRAKAttributor(
                task,
                correct_probability_func=correct_prob,
                projector_kwargs=kwargs,
                layer_name=layer_name,
                device="cpu",
                regularization=0.0,
            )
            if layer_name is not None:
                # dattri divides grads by sqrt(#params of the whole model): rescale
                # datatrace's absolute damping so both invert the same matrix.
                attr.regularization = spec["last_layer_damping"] / attr.norm_scaler**2
            attr.cache(loader(xt, yt, bs))
            return attr

        def attribute(attr: Any) -> torch.Tensor:
            return attr.attribute(loader(xq, yq, bs)).T

        return fit, attribute

    def tracin(normalized: bool) -> tuple[Any, Any]:
        def fit() -> Any:
            task = AttributionTask(
                loss_func=ce_loss, model=model, checkpoints=members[:1], target_func=neg_margin
            )
            attr = TracInAttributor(
                task, weight_list=torch.ones(1), normalized_grad=normalized, device="cpu"
            )
            # dattri 0.3.0 merges projector_kwargs=None into a 512-dim Gaussian default, so
            # Grad-Dot/Grad-Cos are always projected unless the attribute is cleared; its
            # attribute() handles None as "no projection" (exact gradients, like ours).
            attr.projector_kwargs = None
            attr.cache()
            return attr

        def attribute(attr: Any) -> torch.Tensor:
            return attr.attribute(loader(xt, yt, bs), loader(xq, yq, len(yq))).T

        return fit, attribute

    def if_cg() -> tuple[Any, Any]:
        def fit() -> Any:
            task = AttributionTask(
                loss_func=ce_loss, model=model, checkpoints=members[:1], target_func=neg_margin
            )
            attr = IFAttributorCG(
                task,
                device="cpu",
                max_iter=spec["cg_iter"],
                regularization=spec["damping"],
            )
            # One batch: dattri sums the inverse-HVPs of every batch of the cached loader,
            # and recomputes the query transform for every train batch of attribute().
            attr.cache(loader(xt, yt, n_train))
            return attr

        def attribute(attr: Any) -> torch.Tensor:
            # CG is vmapped over the queries of a test batch; all 200 at once needs ~14 GB.
            queries = loader(xq, yq, spec["if_query_batch"])
            return attr.attribute(loader(xt, yt, n_train), queries).T

        return fit, attribute

    P = spec["proj_dim"]
    return {
        "trak-1": trak(1, P, None),
        "trak-5": trak(5, P, None),
        "trak-last-exact": trak(1, None, spec["last_layer"]),
        "grad-dot": tracin(False),
        "grad-cos": tracin(True),
        "if-cg": if_cg(),
    }


# ------------------------------------------------------------------------------------ traker


def traker_methods(data: dict[str, Any], spec: dict[str, Any], work: Path) -> dict[str, Any]:
    from trak import TRAKer
    from trak.projectors import NoOpProjector

    model = build_mlp(data["hidden"]).eval()
    members = data["members"]
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    bs = spec["batch_size"]

    def trak(k: int, exact_last_layer: bool) -> tuple[Any, Any]:
        def fit() -> Any:
            save_dir = Path(tempfile.mkdtemp(dir=work, prefix="trak-"))
            kwargs: dict[str, Any] = {"proj_dim": spec["proj_dim"], "projector_seed": spec["seed"]}
            if exact_last_layer:
                kwargs = {"projector": NoOpProjector(device="cpu"), "grad_wrt": spec["last_layer"]}
            traker = TRAKer(
                model=model,
                task="image_classification",
                train_set_size=len(yt),
                save_dir=str(save_dir),
                load_from_save_dir=True,  # False skips writing experiments.json (0.3.2)
                device="cpu",
                use_half_precision=False,  # float16 on CPU is slow and lossy; we compare fp32
                logging_level=logging.ERROR,
                **kwargs,
            )
            for i, sd in enumerate(members[:k]):
                traker.load_checkpoint(sd, model_id=i)
                for x, y in loader(xt, yt, bs):
                    traker.featurize(batch=(x, y), num_samples=len(y))
            if exact_last_layer:
                # traker's kernel is built from grads / sqrt(n_params): rescale datatrace's
                # absolute damping so both invert the same matrix.
                lam = spec["last_layer_damping"] / float(traker.normalize_factor) ** 2
                traker.score_computer.lambda_reg = lam
            traker.finalize_features()
            return traker, save_dir

        def attribute(state: Any) -> torch.Tensor:
            traker, save_dir = state
            for i, sd in enumerate(members[:k]):
                traker.start_scoring_checkpoint(
                    exp_name="queries", checkpoint=sd, model_id=i, num_targets=len(yq)
                )
                for x, y in loader(xq, yq, bs):
                    traker.score(batch=(x, y), num_samples=len(y))
            scores = torch.from_numpy(traker.finalize_scores(exp_name="queries").copy())
            shutil.rmtree(save_dir, ignore_errors=True)
            return scores.T

        return fit, attribute

    return {
        "trak-1": trak(1, False),
        "trak-5": trak(5, False),
        "trak-last-exact": trak(1, True),
    }


# ------------------------------------------------------------------------------------ kronfluence


def kronfluence_classification_task() -> Any:
    """kronfluence ``Task`` of a classifier: summed cross-entropy, measurement ``-margin``.

    With ``sample=True`` (the true Fisher, kronfluence's default ``FactorArguments``) the
    labels are drawn from the model's softmax, one per example, unseeded as in kronfluence's
    own examples. The measurement is loss-like (lower = better), so a positive pairwise
    score means that training on the example raises the query's margin: datatrace's sign.
    """
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    y = torch.multinomial(probs, num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            x, y = batch
            return -margin(model(x), y).sum()

    return Classification()


def kronfluence_fit(
    model: nn.Module,
    task: Any,
    dataset: Any,
    *,
    strategy: str,
    batch_size: int,
    work: Path,
    name: str = "digits",
) -> tuple[Any, Path]:
    """``Analyzer.fit_all_factors`` with default ``FactorArguments(strategy=...)``.

    ``model`` is wrapped in place by ``prepare_model``; returns the analyzer and its output
    folder (remove it when done).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    model = prepare_model(model.eval(), task)
    out_dir = Path(tempfile.mkdtemp(dir=work, prefix="kronfluence-"))
    analyzer = Analyzer(
        analysis_name=name,
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(out_dir),
    )
    analyzer.fit_all_factors(
        factors_name=strategy,
        dataset=dataset,
        per_device_batch_size=batch_size,
        factor_args=FactorArguments(strategy=strategy),
        overwrite_output_dir=True,
    )
    return analyzer, out_dir


def kronfluence_pairwise(
    analyzer: Any,
    factors_name: str,
    query_dataset: Any,
    train_dataset: Any,
    *,
    train_batch_size: int,
    damping: float | None,
) -> torch.Tensor:
    """``(n_query, n_train)`` pairwise scores on the fitted factors (all queries in one batch).

    ``damping=None`` is kronfluence's heuristic, 0.1 x each module's mean eigenvalue.
    """
    from kronfluence.arguments import ScoreArguments

    analyzer.compute_pairwise_scores(
        scores_name="scores",
        factors_name=factors_name,
        query_dataset=query_dataset,
        train_dataset=train_dataset,
        per_device_query_batch_size=len(query_dataset),
        per_device_train_batch_size=train_batch_size,
        score_args=ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("scores")["all_modules"].clone()


def kronfluence_methods(data: dict[str, Any], spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """K-FAC / EK-FAC influence with kronfluence's Analyzer (true Fisher, sampled labels).

    The measurement is ``-margin`` (:func:`kronfluence_classification_task`), so scores have
    datatrace's sign. kronfluence does not divide by ``n``; LDS and rank correlations ignore
    the scale. Damping ``None`` is kronfluence's 0.1 x mean-eigenvalue heuristic, per module.
    """
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    bs = spec["batch_size"]
    damping = spec.get("kfac_damping")

    def method(strategy: str) -> tuple[Any, Any]:
        def fit() -> Any:
            model = build_mlp(data["hidden"])
            model.load_state_dict(data["members"][0])
            return kronfluence_fit(
                model,
                kronfluence_classification_task(),
                TensorDataset(xt, yt),
                strategy=strategy,
                batch_size=bs,
                work=work,
            )

        def attribute(state: Any) -> torch.Tensor:
            analyzer, out_dir = state
            scores = kronfluence_pairwise(
                analyzer,
                strategy,
                TensorDataset(xq, yq),
                TensorDataset(xt, yt),
                train_batch_size=bs,
                damping=damping,
            )
            shutil.rmtree(out_dir, ignore_errors=True)
            return scores

        return fit, attribute

    return {"if-ekfac": method("ekfac"), "if-kfac": method("kfac")}


# ------------------------------------------------------------------------------------ main


def run_kronfluence_script(
    description: str,
    prefix: str,
    run: Callable[[dict[str, Any], dict[str, Any], Path], dict[str, Any]],
) -> None:
    """The ``main`` of a kronfluence runner script: ``--inputs``, ``--out``, ``--spec`` (JSON,
    with ``threads``); ``run(data, spec, work_dir)`` in a throw-away directory, its result
    saved with kronfluence's and torch's versions and the thread count."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--inputs", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--spec", required=True, help="JSON: threads, batch_size, ...")
    args = ap.parse_args()
    spec = json.loads(args.spec)
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    data = torch.load(args.inputs, weights_only=True)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        out = run(data, spec, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.update(
        {
            "version": metadata.version("kronfluence"),
            "torch": str(torch.__version__),
            "threads": float(torch.get_num_threads()),
        }
    )
    torch.save(out, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, choices=["traker", "dattri", "kronfluence"])
    ap.add_argument("--inputs", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--spec", required=True, help="JSON: methods, proj_dim, damping, ...")
    args = ap.parse_args()
    spec = json.loads(args.spec)
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    data = torch.load(args.inputs, weights_only=True)
    work = Path(tempfile.mkdtemp(prefix=f"peer-{args.peer}-"))
    try:
        if args.peer == "dattri":
            available = dattri_methods(data, spec)
        elif args.peer == "kronfluence":
            available = kronfluence_methods(data, spec, work)
        else:
            available = traker_methods(data, spec, work)
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        out = {
            "library": args.peer,
            "version": metadata.version(args.peer),
            "torch": str(torch.__version__),
            "threads": float(torch.get_num_threads()),
            "results": results,
            "errors": errors,
        }
        for name in spec["methods"]:
            if name not in available:
                continue
            fit, attribute = available[name]
            slow = name in SLOW
            reps = spec["slow_repeats"] if slow else spec["repeats"]
            warm = spec["slow_warmup"] if slow else spec["warmup"]
            t0 = time.perf_counter()
            try:
                results[name] = timed(fit, attribute, reps, warm)
            except Exception as exc:  # report, and go on with the other methods
                errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            print(f"[{args.peer}] {name}: {time.perf_counter() - t0:.1f}s", flush=True)
            # Written after every method: a crash (e.g. out of memory) keeps the others.
            torch.save(out, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
