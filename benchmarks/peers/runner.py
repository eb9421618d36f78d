"""What the peer runners share: rebuilt models, the margin, warm timing and the ``main`` loop.

Runs inside a peer's own throw-away virtualenv, so it imports only the standard library and
torch (transformers for the GPT-2, lazily) -- never datatrace. ``peer_runner.py`` imports it
from the same directory.
"""

from __future__ import annotations

import argparse
import json
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

Methods = dict[str, Callable[[], dict[str, Any]]]
# Methods whose single run takes tens of seconds: timed with spec["slow_repeats"].
SLOW = {"if-cg"}


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's margin ``logit_y - logsumexp_{c != y} logit_c`` = ``log(p_y / (1 - p_y))``."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output (a transformers model returns them as ``.logits``)."""
    return out.logits if hasattr(out, "logits") else out


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-chunk summed next-token NLL, ``(B,)`` (position t predicts token t+1)."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(1)


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


# ------------------------------------------------------------------------------------ models


def build_sequential(layers: list[dict[str, Any]]) -> nn.Sequential:
    """An ``nn.Sequential`` from the driver's ``[{"type": "Linear", ...}, ...]`` description
    (child names ``"0"``, ``"1"``, ... as in datatrace, so the state dict loads)."""
    made: list[nn.Module] = []
    for s in layers:
        kind = s["type"]
        if kind == "Linear":
            made.append(nn.Linear(s["in_features"], s["out_features"], bias=s["bias"]))
        elif kind == "Conv2d":
            conv = (s["in_channels"], s["out_channels"], tuple(s["kernel_size"]))
            made.append(
                nn.Conv2d(
                    *conv, stride=tuple(s["stride"]), padding=tuple(s["padding"]), bias=s["bias"]
                )
            )
        elif kind == "Dropout":
            made.append(nn.Dropout(s["p"]))
        elif kind == "MaxPool2d":
            made.append(nn.MaxPool2d(s["kernel_size"], stride=s["stride"]))
        elif kind in ("ReLU", "Flatten"):
            made.append(getattr(nn, kind)())
        else:
            raise ValueError(f"unknown layer type {kind!r}; add it to build_sequential")
    return nn.Sequential(*made)


# Copied from datatrace/bench/settings/charlm.py (same module names, so the state dict loads;
# the driver's log-likelihoods are compared with this copy's before anything is scored).
class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.ln1(h)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads)
        att = att.masked_fill(~keep, torch.finfo(att.dtype).min).softmax(-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.proj(F.gelu(self.fc(self.ln2(h))))


class CharTransformer(nn.Module):
    """The setting's causal character transformer (token + position embeddings, blocks, head)."""

    def __init__(
        self, vocab_size: int, max_len: int, d_model: int, n_heads: int, n_layers: int
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        keep = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        keep = keep.expand(input_ids.shape[0], 1, t, t)
        for block in self.blocks:
            h = block(h, keep)
        return self.head(self.ln(h))


GPT2_BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_with_linear(arch: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """GPT-2 with every transformers ``Conv1D`` replaced by the equal ``nn.Linear`` (weight
    transposed: ``x W + b = x (W^T)^T + b``), as kronfluence tracks Linear/Conv2d only (its
    own GPT-2 example converts the same way)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**arch))
    model.load_state_dict(state)
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Conv1D)
    ]
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
    """Member ``member`` of the driver's model (``data["model"]``: sequential, charlm, gpt2),
    in eval mode. Building draws the initial weights from the global generator, as before
    every fit (kronfluence's unseeded label sampling follows it)."""
    state = data["members"][member]
    if data["model"] == "gpt2":
        return gpt2_with_linear(data["arch"], state).eval()
    if data["model"] == "charlm":
        model: nn.Module = CharTransformer(**data["arch"])
    else:
        model = build_sequential(data["layers"]).to(getattr(torch, data["dtype"]))
    model.load_state_dict(state)
    return model.eval()


def model_gap(data: dict[str, Any]) -> float:
    """Largest difference between the rebuilt model's query outputs (logits; an LM's summed
    log-likelihood) and the driver's ``query_check``; raises above ``check_atol``."""
    with torch.no_grad():
        model = build_model(data)
        if data["model"] == "sequential":
            out = model(data["x_query"])
        else:
            ids = data["query_ids"]
            out = -summed_nll(logits_of(model(ids)), ids)
    gap = float((out - data["query_check"]).abs().max())
    if not gap <= data["check_atol"]:
        raise RuntimeError(
            f"the rebuilt model's query outputs differ from datatrace's by {gap:.2e} (> "
            f"{data['check_atol']}); update the copy in runner.py to match datatrace."
        )
    return gap


# ------------------------------------------------------------------------------------ main


def main(
    tables: dict[str, Callable[[dict[str, Any], dict[str, Any], Path, dict[str, Any]], Methods]],
) -> None:
    """``--peer NAME --inputs X.pt --out Y.pt --spec JSON``: run ``spec["methods"]`` of
    ``tables[NAME](data, spec, work_dir, out)`` ``spec.get("runs", 1)`` times each; every
    method's runs are saved as a list in ``out["results"]``, after every method (a crash keeps
    the others), its failures in ``out["errors"]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, choices=sorted(tables))
    ap.add_argument("--inputs", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--spec", required=True, help="JSON: threads, methods, ...")
    args = ap.parse_args()
    spec = json.loads(args.spec)
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    data = torch.load(args.inputs, weights_only=True)
    work = Path(tempfile.mkdtemp(prefix=f"peer-{args.peer}-"))
    results: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    out: dict[str, Any] = {
        "library": args.peer,
        "version": metadata.version(args.peer),
        "torch": str(torch.__version__),
        "threads": float(torch.get_num_threads()),
        "results": results,
        "errors": errors,
    }
    try:
        available = tables[args.peer](data, spec, work, out)
        for name in spec["methods"]:
            if name not in available:
                continue
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
