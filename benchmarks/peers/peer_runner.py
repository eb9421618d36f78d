"""Run one peer library (traker, dattri or kronfluence) on the inputs a peer driver wrote.

Runs inside the peer's own throw-away virtualenv, so it imports only the standard library,
torch, the peer and ``runner.py`` (same directory) -- never datatrace. It rebuilds the model
from the saved states, computes the peer's scores of the saved queries, times ``fit`` and
``attribute`` (median of warm repeated runs) and writes everything back as a ``.pt`` file
that loads with ``torch.load(..., weights_only=True)``. Scores come back in datatrace's
orientation, ``(n_query, n_train)``, positive = training on the example improves the query
(docs/peers.md). Usage (the drivers do this)::

    /tmp/peer-dattri/bin/python benchmarks/peers/peer_runner.py --peer dattri \
        --inputs DIR/inputs.pt --out DIR/dattri.pt --spec '{"methods": ["grad-dot"], ...}'
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from runner import (  # same directory; torch and the standard library only
    GPT2_BLOCK_LAYERS,
    SLOW,
    Methods,
    build_model,
    logits_of,
    main,
    margin,
    model_gap,
    summed_nll,
    timed,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _timed(spec: dict[str, Any], name: str, fit: Any, attribute: Any) -> Any:
    slow = name in SLOW
    reps = spec["slow_repeats"] if slow else spec["repeats"]
    return lambda: timed(fit, attribute, reps, spec["slow_warmup"] if slow else spec["warmup"])


# ------------------------------------------------------------------------------------ dattri


def dattri_methods(data: dict[str, Any], spec: dict[str, Any], work: Path, out: Any) -> Methods:
    from dattri.algorithm import IFAttributorCG, TracInAttributor, TRAKAttributor
    from dattri.task import AttributionTask

    model = build_model(data)
    members = data["members"]
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    n_train, bs = len(yt), spec["batch_size"]

    def call(params: dict[str, torch.Tensor], d: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # TRAK/TracIn call the functions per example without a batch dim; IF with one.
        x, y = (d[0].unsqueeze(0), d[1].unsqueeze(0)) if d[0].ndim == 1 else d
        return torch.func.functional_call(model, params, (x,)), y

    def ce_loss(params: dict[str, torch.Tensor], d: Any) -> torch.Tensor:
        return F.cross_entropy(*call(params, d))

    def neg_margin(params: dict[str, torch.Tensor], d: Any) -> torch.Tensor:
        return -margin(*call(params, d)).mean()  # loss-like query objective, as ours

    def pos_margin(params: dict[str, torch.Tensor], d: Any) -> torch.Tensor:
        # dattri's TRAK examples use log(p / (1 - p)) for both loss_func and target_func.
        return margin(*call(params, d)).mean()

    def correct_prob(params: dict[str, torch.Tensor], d: Any) -> torch.Tensor:
        logits, y = call(params, d)
        return torch.softmax(logits, dim=-1).gather(1, y.view(-1, 1)).squeeze()

    def task(loss: Any, target: Any, k: int = 1) -> Any:
        return AttributionTask(
            loss_func=loss, model=model, checkpoints=members[:k], target_func=target
        )

    def trak(k: int, proj_dim: int | None, layer_name: list[str] | None) -> Any:
        def fit() -> Any:
            kwargs = {
                "proj_dim": proj_dim if proj_dim is not None else 1,
                "proj_max_batch_size": 32,
                "proj_seed": spec["seed"],
                "device": "cpu",
                "proj_type": "normal" if proj_dim is not None else "identity",
            }
            attr = TRAKAttributor(
                task(pos_margin, pos_margin, k),
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

        return fit, lambda attr: attr.attribute(loader(xq, yq, bs)).T

    def tracin(normalized: bool) -> Any:
        def fit() -> Any:
            attr = TracInAttributor(
                task(ce_loss, neg_margin),
                weight_list=torch.ones(1),
                normalized_grad=normalized,
                device="cpu",
            )
            # dattri 0.3.0 merges projector_kwargs=None into a 512-dim Gaussian default, so
            # Grad-Dot/Grad-Cos are always projected unless the attribute is cleared; its
            # attribute() handles None as "no projection" (exact gradients, like ours).
            attr.projector_kwargs = None
            attr.cache()
            return attr

        return fit, lambda attr: attr.attribute(loader(xt, yt, bs), loader(xq, yq, len(yq))).T

    def if_cg() -> Any:
        def fit() -> Any:
            attr = IFAttributorCG(
                task(ce_loss, neg_margin),
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
    table = {
        "trak-1": trak(1, P, None),
        "trak-5": trak(5, P, None),
        "trak-last-exact": trak(1, None, spec["last_layer"]),
        "grad-dot": tracin(False),
        "grad-cos": tracin(True),
        "if-cg": if_cg(),
    }
    return {name: _timed(spec, name, *pair) for name, pair in table.items()}


# ------------------------------------------------------------------------------------ traker


def traker_methods(data: dict[str, Any], spec: dict[str, Any], work: Path, out: Any) -> Methods:
    from trak import TRAKer
    from trak.projectors import NoOpProjector

    model = build_model(data)
    members = data["members"]
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    bs = spec["batch_size"]

    def trak(k: int, exact_last_layer: bool) -> Any:
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

    table = {"trak-1": trak(1, False), "trak-5": trak(5, False), "trak-last-exact": trak(1, True)}
    return {name: _timed(spec, name, *pair) for name, pair in table.items()}


# ------------------------------------------------------------------------------------ kronfluence


def kronfluence_methods(
    data: dict[str, Any], spec: dict[str, Any], work: Path, out: dict[str, Any]
) -> Methods:
    """K-FAC / EK-FAC influence with kronfluence's ``Analyzer`` and default
    ``FactorArguments(strategy=...)``: the true Fisher, one label per example (per token of
    a language model) drawn by ``torch.multinomial``, unseeded as in kronfluence's examples.

    The measurement is loss-like (``-margin``; an LM's summed NLL), so a positive score means
    that training on the example improves the query: datatrace's sign. kronfluence does not
    divide by ``n``; LDS and rank correlations ignore the scale. Each run is a timed fit +
    attribute at ``spec["dampings"][0]`` (``None``: kronfluence's 0.1 x mean-eigenvalue
    heuristic per module), scored at the other dampings on the last fit (``"more"``).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.module.utils import get_tracked_module_names
    from kronfluence.task import Task

    lm = data["model"] != "sequential"
    if lm:
        train, queries = TensorDataset(data["train_ids"]), TensorDataset(data["query_ids"])
    else:
        train = TensorDataset(data["x_train"], data["y_train"])
        queries = TensorDataset(data["x_query"], data["y_query"])
    tracked = None
    if data["model"] == "gpt2":  # the block projections; not the LM head tied to the embedding
        n_layer = data["arch"]["n_layer"]
        tracked = [f"transformer.h.{i}.{m}" for i in range(n_layer) for m in GPT2_BLOCK_LAYERS]
    if "query_check" in data:
        out["model_gap"] = model_gap(data)
    bs, dampings = spec["batch_size"], spec["dampings"]

    class Peer(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            if lm:
                (ids,) = batch
                logits, labels = logits_of(model(ids))[:, :-1], ids[:, 1:]
            else:
                x, labels = batch
                logits = model(x)
            if sample:  # the true Fisher: labels from the model's distribution
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probs.flatten(0, -2), num_samples=1).flatten()
            vocab = logits.shape[-1]
            return F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            if lm:
                (ids,) = batch
                return summed_nll(logits_of(model(ids)), ids).sum()
            x, y = batch
            return -margin(model(x), y).sum()

        def get_influence_tracked_modules(self) -> list[str] | None:
            return tracked

    def method(strategy: str) -> Any:
        last: dict[str, Any] = {}

        def fit() -> Any:
            model = prepare_model(build_model(data), Peer())
            if tracked is not None and sorted(get_tracked_module_names(model)) != sorted(tracked):
                raise RuntimeError(f"kronfluence tracks {get_tracked_module_names(model)}")
            out_dir = Path(tempfile.mkdtemp(dir=work, prefix="kronfluence-"))
            analyzer = Analyzer(
                analysis_name="peer",
                model=model,
                task=Peer(),
                cpu=True,
                disable_tqdm=True,
                output_dir=str(out_dir),
            )
            analyzer.fit_all_factors(
                factors_name=strategy,
                dataset=train,
                per_device_batch_size=bs,
                factor_args=FactorArguments(strategy=strategy),
                overwrite_output_dir=True,
            )
            last.update(analyzer=analyzer, out_dir=out_dir)
            return analyzer

        def scores(analyzer: Any, damping: float | None = dampings[0]) -> torch.Tensor:
            analyzer.compute_pairwise_scores(
                scores_name="scores",
                factors_name=strategy,
                query_dataset=queries,
                train_dataset=train,
                per_device_query_batch_size=len(queries),
                per_device_train_batch_size=bs,
                score_args=ScoreArguments(damping_factor=damping),
                overwrite_output_dir=True,
            )
            return analyzer.load_pairwise_scores("scores")["all_modules"].clone()

        def run() -> dict[str, Any]:
            result = timed(fit, scores, spec["repeats"], spec["warmup"])
            result["more"] = {}
            for damping in dampings[1:]:
                t0 = time.perf_counter()
                values = scores(last["analyzer"], damping)
                result["more"]["heuristic" if damping is None else repr(damping)] = {
                    "scores": values.to(torch.float32).contiguous(),
                    "attribute_s": time.perf_counter() - t0,
                }
            shutil.rmtree(last["out_dir"], ignore_errors=True)
            return result

        return run

    return {"if-ekfac": method("ekfac"), "if-kfac": method("kfac")}


if __name__ == "__main__":
    main({"dattri": dattri_methods, "traker": traker_methods, "kronfluence": kronfluence_methods})
