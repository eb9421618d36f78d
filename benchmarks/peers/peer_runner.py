"""Run one peer library (traker, dattri or kronfluence) on the inputs a peer driver wrote.

In the peer's venv: imports the standard library, torch and the peer (transformers for GPT-2),
never datatrace. Rebuilds the model, times fit + attribute, writes scores ``(n_query, n_train)``
with datatrace's sign (docs/peers.md). The drivers call ``peer_runner.py --peer NAME --inputs
DIR/inputs.pt --out DIR/NAME.pt --spec JSON``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

Methods = dict[str, Callable[[], dict[str, Any]]]
SLOW = {"if-cg"}  # tens of seconds a run: timed with spec["slow_repeats"], no warm-up
GPT2_BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's margin ``logit_y - logsumexp_{c != y} logit_c`` = ``log(p_y / (1 - p_y))``."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    return true - torch.logsumexp(logits.scatter(1, labels.view(-1, 1), float("-inf")), dim=1)


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # transformers: ``.logits``


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-chunk summed next-token NLL, ``(B,)`` (position t predicts token t+1)."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(1)


def timed(fit: Callable[[], Any], attribute: Callable[[Any], torch.Tensor], repeats: int,
          warmup: int) -> dict[str, Any]:  # fmt: skip
    """Median fit / attribute / total seconds of ``repeats`` runs after ``warmup`` runs."""
    seconds = []
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        state = fit()
        t1 = time.perf_counter()
        scores = attribute(state)
        t2 = time.perf_counter()
        seconds.append((t1 - t0, t2 - t1, t2 - t0))
    fit_s, attribute_s, total_s = (statistics.median(s) for s in zip(*seconds[warmup:]))
    return dict(scores=scores.detach().to(torch.float32).contiguous(), fit_s=fit_s,
                attribute_s=attribute_s, total_s=total_s, runs=float(repeats))  # fmt: skip


def build_sequential(layers: list[dict[str, Any]]) -> nn.Sequential:
    """An ``nn.Sequential`` from ``common.describe``'s layer list (children "0", "1", ...)."""
    kwargs = [{k: v for k, v in layer.items() if k != "type"} for layer in layers]
    return nn.Sequential(*(getattr(nn, s["type"])(**kw) for s, kw in zip(layers, kwargs)))


def gpt2_with_linear(arch: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """GPT-2 with every ``Conv1D`` replaced by the equal ``nn.Linear`` (weight transposed), as
    kronfluence tracks Linear/Conv2d only (its own GPT-2 example converts the same way)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**arch))
    model.load_state_dict(state)
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, Conv1D)]  # fmt: skip
    for parent, name, conv in swaps:
        n_in, n_out = conv.weight.shape  # Conv1D stores its weight (in, out)
        linear = nn.Linear(n_in, n_out, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        setattr(parent, name, linear)
    if len(swaps) != len(GPT2_BLOCK_LAYERS) * model.config.n_layer:
        raise RuntimeError(f"converted {len(swaps)} Conv1D layers; expected 4 per block")
    return model


def build_model(data: dict[str, Any], member: int = 0) -> nn.Module:
    """Member ``member`` of ``data["model"]`` (sequential, charlm, gpt2), in eval mode. Building
    draws initial weights from the global generator, which kronfluence's labels then follow;
    ``model_gap`` checks the rebuilt model's outputs against the driver's."""
    state = data["members"][member]
    if data["model"] == "gpt2":
        return gpt2_with_linear(data["arch"], state).eval()
    if data["model"] == "charlm":  # the setting's own classes, as source: torch only
        scope: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "math": math}
        scope["ConfigError"] = ValueError  # raised for d_model % n_heads != 0 only
        source = f"from __future__ import annotations\n{data['source']}"
        exec(compile(source, "charlm", "exec"), scope)
        model: nn.Module = scope["CharTransformer"](**data["arch"])
    else:
        model = build_sequential(data["layers"]).to(getattr(torch, data["dtype"]))
    model.load_state_dict(state)
    return model.eval()


def model_gap(data: dict[str, Any]) -> float:
    """Largest difference of the rebuilt model's query outputs (logits; an LM's summed
    log-likelihood) from the driver's ``query_check``; raises above ``check_atol``."""
    with torch.no_grad():
        model = build_model(data)
        if data["model"] == "sequential":
            out = model(data["x_query"])
        else:
            out = -summed_nll(logits_of(model(data["query_ids"])), data["query_ids"])
    gap = float((out - data["query_check"]).abs().max())
    if not gap <= data["check_atol"]:
        raise RuntimeError(f"the rebuilt model's query outputs differ from datatrace's by "
                           f"{gap:.2e} (> {data['check_atol']}); update peer_runner.build_model")  # fmt: skip
    return gap


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _timed(spec: dict[str, Any], name: str, fit: Any, attribute: Any) -> Any:
    reps, warm = (spec["slow_repeats"], 0) if name in SLOW else (spec["repeats"], spec["warmup"])
    return lambda: timed(fit, attribute, reps, warm)


def dattri_methods(data: dict[str, Any], spec: dict[str, Any], work: Path, out: Any) -> Methods:
    from dattri.algorithm import IFAttributorCG, TracInAttributor, TRAKAttributor
    from dattri.task import AttributionTask

    model, members = build_model(data), data["members"]
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
        return margin(*call(params, d)).mean()  # dattri's TRAK examples: log(p / (1 - p))

    def correct_prob(params: dict[str, torch.Tensor], d: Any) -> torch.Tensor:
        logits, y = call(params, d)
        return torch.softmax(logits, dim=-1).gather(1, y.view(-1, 1)).squeeze()

    def task(loss: Any, target: Any, k: int = 1) -> Any:
        return AttributionTask(loss_func=loss, model=model, checkpoints=members[:k],
                               target_func=target)  # fmt: skip

    def trak(k: int, proj_dim: int | None, layer_name: list[str] | None) -> Any:
        def fit() -> Any:
            kwargs = {"proj_dim": proj_dim if proj_dim is not None else 1, "device": "cpu",
                      "proj_max_batch_size": 32, "proj_seed": spec["seed"],
                      "proj_type": "normal" if proj_dim is not None else "identity"}  # fmt: skip
            attr = TRAKAttributor(task(pos_margin, pos_margin, k), device="cpu",
                                  correct_probability_func=correct_prob, projector_kwargs=kwargs,
                                  layer_name=layer_name, regularization=0.0)  # fmt: skip
            if layer_name is not None:  # dattri divides grads by sqrt(#params of the model):
                # rescale datatrace's absolute damping so both invert the same matrix
                attr.regularization = spec["last_layer_damping"] / attr.norm_scaler**2
            attr.cache(loader(xt, yt, bs))
            return attr

        return fit, lambda attr: attr.attribute(loader(xq, yq, bs)).T

    def tracin(normalized: bool) -> Any:
        def fit() -> Any:
            attr = TracInAttributor(task(ce_loss, neg_margin), weight_list=torch.ones(1),
                                    normalized_grad=normalized, device="cpu")  # fmt: skip
            # dattri 0.3.0 merges projector_kwargs=None into a 512-dim Gaussian default; its
            # attribute() takes None set afterwards as "no projection" (exact, like ours)
            attr.projector_kwargs = None
            attr.cache()
            return attr

        return fit, lambda attr: attr.attribute(loader(xt, yt, bs), loader(xq, yq, len(yq))).T

    def if_cg() -> Any:
        def fit() -> Any:
            attr = IFAttributorCG(task(ce_loss, neg_margin), device="cpu",
                                  max_iter=spec["cg_iter"], regularization=spec["damping"])  # fmt: skip
            # one batch: dattri sums the inverse-HVPs of every batch of the cached loader, and
            # recomputes the query transform for every train batch of attribute()
            attr.cache(loader(xt, yt, n_train))
            return attr

        # CG is vmapped over a test batch's queries; all 200 at once needs ~14 GB
        queries = loader(xq, yq, spec["if_query_batch"])
        return fit, lambda attr: attr.attribute(loader(xt, yt, n_train), queries).T

    P = spec["proj_dim"]
    table = {"trak-1": trak(1, P, None), "trak-5": trak(5, P, None),
             "trak-last-exact": trak(1, None, spec["last_layer"]), "grad-dot": tracin(False),
             "grad-cos": tracin(True), "if-cg": if_cg()}  # fmt: skip
    return {name: _timed(spec, name, *pair) for name, pair in table.items()}


def traker_methods(data: dict[str, Any], spec: dict[str, Any], work: Path, out: Any) -> Methods:
    from trak import TRAKer
    from trak.projectors import NoOpProjector

    model, members = build_model(data), data["members"]
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    bs = spec["batch_size"]

    def trak(k: int, exact_last_layer: bool) -> Any:
        def fit() -> Any:
            save_dir = Path(tempfile.mkdtemp(dir=work, prefix="trak-"))
            kwargs: dict[str, Any] = {"proj_dim": spec["proj_dim"], "projector_seed": spec["seed"]}
            if exact_last_layer:
                kwargs = {"projector": NoOpProjector(device="cpu"), "grad_wrt": spec["last_layer"]}
            # load_from_save_dir=False skips writing experiments.json (0.3.2); float16 on CPU
            # is slow and lossy: all three libraries run float32
            traker = TRAKer(model=model, task="image_classification", train_set_size=len(yt),
                            save_dir=str(save_dir), load_from_save_dir=True, device="cpu",
                            use_half_precision=False, logging_level=logging.ERROR, **kwargs)  # fmt: skip
            for i, sd in enumerate(members[:k]):
                traker.load_checkpoint(sd, model_id=i)
                for x, y in loader(xt, yt, bs):
                    traker.featurize(batch=(x, y), num_samples=len(y))
            if exact_last_layer:  # its kernel uses grads / sqrt(n_params): rescale our damping
                lam = spec["last_layer_damping"] / float(traker.normalize_factor) ** 2
                traker.score_computer.lambda_reg = lam
            traker.finalize_features()
            return traker, save_dir

        def attribute(state: Any) -> torch.Tensor:
            traker, save_dir = state
            for i, sd in enumerate(members[:k]):
                traker.start_scoring_checkpoint(exp_name="queries", checkpoint=sd, model_id=i,
                                                num_targets=len(yq))  # fmt: skip
                for x, y in loader(xq, yq, bs):
                    traker.score(batch=(x, y), num_samples=len(y))
            scores = torch.from_numpy(traker.finalize_scores(exp_name="queries").copy())
            shutil.rmtree(save_dir, ignore_errors=True)
            return scores.T

        return fit, attribute

    table = {"trak-1": trak(1, False), "trak-5": trak(5, False), "trak-last-exact": trak(1, True)}
    return {name: _timed(spec, name, *pair) for name, pair in table.items()}


def kronfluence_methods(
    data: dict[str, Any], spec: dict[str, Any], work: Path, out: dict[str, Any]
) -> Methods:
    """K-FAC / EK-FAC with kronfluence's defaults (true Fisher, one unseeded label per example
    or token); loss-like measurement (-margin; summed NLL), no 1/n. Each run: a timed fit +
    attribute at ``spec["dampings"][0]`` (None: its heuristic), then the other dampings."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.module.utils import get_tracked_module_names
    from kronfluence.task import Task

    lm = data["model"] != "sequential"
    keys = (
        [["train_ids"], ["query_ids"]] if lm else [["x_train", "y_train"], ["x_query", "y_query"]]
    )
    train, queries = (TensorDataset(*(data[k] for k in ks)) for ks in keys)
    tracked = None  # GPT-2: the block projections; not the LM head tied to the embedding
    if data["model"] == "gpt2":
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
            analyzer = Analyzer(analysis_name="peer", model=model, task=Peer(), cpu=True,
                                disable_tqdm=True, output_dir=str(out_dir))  # fmt: skip
            analyzer.fit_all_factors(factors_name=strategy, dataset=train,
                                     per_device_batch_size=bs, overwrite_output_dir=True,
                                     factor_args=FactorArguments(strategy=strategy))  # fmt: skip
            last.update(analyzer=analyzer, out_dir=out_dir)
            return analyzer

        def scores(analyzer: Any, damping: float | None = dampings[0]) -> torch.Tensor:
            analyzer.compute_pairwise_scores(
                scores_name="scores", factors_name=strategy, query_dataset=queries,
                train_dataset=train, per_device_query_batch_size=len(queries),
                per_device_train_batch_size=bs, overwrite_output_dir=True,
                score_args=ScoreArguments(damping_factor=damping),
            )  # fmt: skip
            return analyzer.load_pairwise_scores("scores")["all_modules"].clone()

        def run() -> dict[str, Any]:
            result = timed(fit, scores, spec["repeats"], spec["warmup"])
            result["more"] = {}
            for damping in dampings[1:]:
                t0, values = time.perf_counter(), scores(last["analyzer"], damping)
                result["more"]["heuristic" if damping is None else repr(damping)] = {
                    "scores": values.to(torch.float32).contiguous(),
                    "attribute_s": time.perf_counter() - t0}  # fmt: skip
            shutil.rmtree(last["out_dir"], ignore_errors=True)
            return result

        return run

    return {"if-ekfac": method("ekfac"), "if-kfac": method("kfac")}


def main() -> None:
    """``--peer NAME --inputs X.pt --out Y.pt --spec JSON``: run each of ``spec["methods"]``
    ``spec.get("runs", 1)`` times; ``out`` is saved after every method (a crash keeps the
    others), with ``"results"`` (name: list of runs) and ``"errors"``."""
    tables = {"dattri": dattri_methods, "traker": traker_methods,
              "kronfluence": kronfluence_methods}  # fmt: skip
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, choices=sorted(tables))
    for flag in ("--inputs", "--out", "--spec"):  # paths, and the JSON spec (threads, methods..)
        ap.add_argument(flag, required=True, type=Path if flag != "--spec" else str)
    args = ap.parse_args()
    spec = json.loads(args.spec)
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    data = torch.load(args.inputs, weights_only=True)
    work = Path(tempfile.mkdtemp(prefix=f"peer-{args.peer}-"))
    results: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"library": args.peer, "version": metadata.version(args.peer),
                           "torch": str(torch.__version__), "results": results, "errors": errors,
                           "threads": float(torch.get_num_threads())}  # fmt: skip
    try:
        available = tables[args.peer](data, spec, work, out)
        for name in [m for m in spec["methods"] if m in available]:
            t0 = time.perf_counter()
            try:
                for _ in range(spec.get("runs", 1)):
                    results.setdefault(name, []).append(available[name]())
            except Exception as exc:  # report, and go on with the other methods
                errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            print(f"[{args.peer}] {name}: {time.perf_counter() - t0:.1f}s", flush=True)
            torch.save(out, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
