"""kronfluence EK-FAC influence on a digits-family model (inputs from ``kronfluence_digits.py``).

This file runs inside kronfluence's own throw-away virtualenv (``/tmp/peer-kronfluence``), so
it imports only the standard library, torch, kronfluence and ``peer_runner.py`` (torch only)
-- never datatrace. It rebuilds the setting's ``nn.Sequential`` model from a layer-by-layer
description (:func:`build_sequential`; child names ``"0"``, ``"1"``, ... as in datatrace, so
the state dict loads), checks that its logits on the queries equal the ones datatrace's model
computed (``atol`` 1e-5; it stops otherwise), then fits kronfluence's factors on the training
examples ``spec["runs"]`` times with its default ``FactorArguments(strategy=...)`` (true
Fisher, one label per example drawn by ``torch.multinomial``: unseeded, so every run draws
other labels) and scores the queries with ``damping_factor=spec["damping"]`` (None:
kronfluence's 0.1 x mean-eigenvalue heuristic per module). Measurement ``-margin``
(:func:`peer_runner.kronfluence_classification_task`), so a positive score means that training
on the example raises the query's margin: datatrace's sign.

With ``spec["factors"]`` it also returns every run's fitted factors (covariances,
eigenvectors, eigenvalue-corrected ``lambda_matrix`` and the counts they are divided by) for
``kronfluence_digits_diagnose.py``.

Usage (kronfluence_digits.py does this)::

    /tmp/peer-kronfluence/bin/python benchmarks/peers/kronfluence_digits_runner.py \
        --inputs DIR/inputs.pt --out DIR/kronfluence.pt --spec '{"threads": 1, ...}'
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from peer_runner import (  # same directory; torch and the standard library only
    kronfluence_classification_task,
    kronfluence_fit,
    kronfluence_pairwise,
    run_kronfluence_script,
)
from torch import nn
from torch.utils.data import TensorDataset

LOGIT_ATOL = 1e-5


def build_sequential(layers: list[dict[str, Any]]) -> nn.Sequential:
    """An ``nn.Sequential`` from ``[{"type": "Linear", ...}, ...]`` (see ``describe_layer``).

    Raises:
        ValueError: for a layer type this copy does not know.
    """
    made: list[nn.Module] = []
    for spec in layers:
        kind = spec["type"]
        if kind == "Linear":
            made.append(nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"]))
        elif kind == "Conv2d":
            made.append(
                nn.Conv2d(
                    spec["in_channels"],
                    spec["out_channels"],
                    tuple(spec["kernel_size"]),
                    stride=tuple(spec["stride"]),
                    padding=tuple(spec["padding"]),
                    bias=spec["bias"],
                )
            )
        elif kind == "ReLU":
            made.append(nn.ReLU())
        elif kind == "Dropout":
            made.append(nn.Dropout(spec["p"]))
        elif kind == "MaxPool2d":
            made.append(nn.MaxPool2d(spec["kernel_size"], stride=spec["stride"]))
        elif kind == "Flatten":
            made.append(nn.Flatten())
        else:
            raise ValueError(f"unknown layer type {kind!r}; add it to build_sequential")
    return nn.Sequential(*made)


def build(data: dict[str, Any]) -> nn.Module:
    model = build_sequential(data["layers"]).to(getattr(torch, data["dtype"]))
    model.load_state_dict(data["state"])
    return model.eval()


def run(data: dict[str, Any], spec: dict[str, Any], work: Path) -> dict[str, Any]:
    xt, yt, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    with torch.no_grad():
        gap = float((build(data)(xq) - data["query_logits"]).abs().max())
    if not gap <= LOGIT_ATOL:
        raise RuntimeError(
            f"the rebuilt model's query logits differ from datatrace's by {gap:.2e} (> "
            f"{LOGIT_ATOL}); the layer description or build_sequential is wrong."
        )
    train, queries = TensorDataset(xt, yt), TensorDataset(xq, yq)
    strategy, bs = spec["strategy"], spec["batch_size"]
    runs: list[dict[str, Any]] = []
    factors: list[dict[str, Any]] = []
    for i in range(spec["runs"]):
        t0 = time.perf_counter()
        analyzer, out_dir = kronfluence_fit(
            build(data),
            kronfluence_classification_task(),
            train,
            strategy=strategy,
            batch_size=bs,
            work=work,
        )
        t1 = time.perf_counter()
        scores = kronfluence_pairwise(
            analyzer, strategy, queries, train, train_batch_size=bs, damping=spec["damping"]
        )
        t2 = time.perf_counter()
        if spec.get("factors"):
            loaded = {
                **(analyzer.load_covariance_matrices(strategy) or {}),
                **analyzer.load_all_factors(factors_name=strategy),
            }
            factors.append(
                {
                    kind: {m: t.detach().clone() for m, t in per_module.items() if t is not None}
                    for kind, per_module in loaded.items()
                    if per_module is not None
                }
            )
        shutil.rmtree(out_dir, ignore_errors=True)
        runs.append(
            {
                "scores": scores.to(torch.float32).contiguous(),
                "fit_s": t1 - t0,
                "attribute_s": t2 - t1,
                "total_s": t2 - t0,
            }
        )
        print(f"[kronfluence] run {i + 1}: {t2 - t0:.1f}s", flush=True)
    return {"runs": runs, "logit_gap": gap, "factors": factors}


def main() -> None:
    run_kronfluence_script(__doc__.splitlines()[0], "peer-kronfluence-digits-", run)


if __name__ == "__main__":
    main()
