"""kronfluence EK-FAC influence on the ``pydoc-charlm`` transformer (inputs from ``kronfluence_charlm.py``).

This file runs inside kronfluence's own throw-away virtualenv (``/tmp/peer-kronfluence``), so
it imports only the standard library, torch and kronfluence -- never datatrace. It rebuilds
the character transformer from the saved state dict (the architecture is copied below), checks
that its query log-likelihoods equal the ones datatrace's model computed, fits kronfluence's
EK-FAC factors on the training chunks (``Analyzer.fit_all_factors``, default
``FactorArguments``: true Fisher with one sampled label per predicted token) and scores the
queries against them (``compute_pairwise_scores``) for every requested damping, timing the
first one (median of warm repeated fit + attribute runs).

Sign: the train loss is the summed next-character NLL of a chunk and the measurement the
query's summed NLL (loss-like), so a positive kronfluence score means that upweighting the
training chunk lowers the query's NLL, i.e. raises its log-likelihood: datatrace's sign for
``target="log_prob"``. kronfluence does not divide by ``n``; LDS and rank correlations
ignore the scale.

Usage (kronfluence_charlm.py does this)::

    /tmp/peer-kronfluence/bin/python benchmarks/peers/kronfluence_charlm_runner.py \
        --inputs DIR/inputs.pt --out DIR/kronfluence.pt --spec '{"threads": 1, ...}'
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peer_runner import (  # same directory; torch and the standard library only
    run_kronfluence_script,
    timed,
)
from torch import nn
from torch.utils.data import TensorDataset


# ------------------------------------------------------------------------------------ model
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


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output (a transformers model returns them as ``.logits``)."""
    return out.logits if hasattr(out, "logits") else out


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-chunk summed next-character NLL, ``(B,)`` (position t predicts character t+1)."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(1)


# ------------------------------------------------------------------------------------ kronfluence


def kronfluence_ekfac(
    data: dict[str, Any],
    spec: dict[str, Any],
    work: Path,
    build_model: Callable[[dict[str, Any]], nn.Module] | None = None,
    tracked: list[str] | None = None,
) -> dict[str, Any]:
    """Timed EK-FAC fit + attribute at ``spec["dampings"][0]``, scores at every damping.

    ``build_model(data)`` rebuilds the model in eval mode (default: the copied
    ``CharTransformer``); ``tracked`` names the modules kronfluence tracks (default: every
    ``nn.Linear``).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.module.utils import get_tracked_module_names
    from kronfluence.task import Task

    train_ids, query_ids = data["train_ids"], data["query_ids"]
    bs = spec["batch_size"]

    class CharLM(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            (ids,) = batch
            logits = logits_of(model(ids))[:, :-1]
            labels = ids[:, 1:]
            if sample:  # true Fisher: one label per position from the model's distribution
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probs.flatten(0, 1), num_samples=1)
            vocab = logits.shape[-1]
            return F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            (ids,) = batch
            return summed_nll(logits_of(model(ids)), ids).sum()

        def get_influence_tracked_modules(self) -> list[str] | None:
            return tracked

    def build() -> nn.Module:
        if build_model is not None:
            return build_model(data)
        model = CharTransformer(**data["arch"])
        model.load_state_dict(data["state"])
        return model.eval()

    def fit() -> Any:
        model = prepare_model(build(), CharLM())
        if tracked is not None and sorted(get_tracked_module_names(model)) != sorted(tracked):
            raise RuntimeError(
                f"kronfluence tracks {get_tracked_module_names(model)}, not {tracked}"
            )
        out_dir = Path(tempfile.mkdtemp(dir=work, prefix="kronfluence-"))
        analyzer = Analyzer(
            analysis_name="charlm",
            model=model,
            task=CharLM(),
            cpu=True,
            disable_tqdm=True,
            output_dir=str(out_dir),
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=TensorDataset(train_ids),
            per_device_batch_size=bs,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        return analyzer

    def scores(analyzer: Any, damping: float | None) -> torch.Tensor:
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=TensorDataset(query_ids),
            train_dataset=TensorDataset(train_ids),
            per_device_query_batch_size=len(query_ids),
            per_device_train_batch_size=bs,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"].clone()

    with torch.no_grad():
        gap = float(
            (summed_nll(logits_of(build()(query_ids)), query_ids) + data["query_log_prob"])
            .abs()
            .max()
        )
    if gap > 1e-3:
        raise RuntimeError(
            f"the rebuilt model disagrees with datatrace's by {gap:.2e} nats on the queries; "
            "update its copy in this runner to match datatrace/bench/settings/."
        )

    dampings = spec["dampings"]
    last: dict[str, Any] = {}

    def fit_and_keep() -> Any:
        last["analyzer"] = fit()
        return last["analyzer"]

    def first(analyzer: Any) -> torch.Tensor:
        return scores(analyzer, dampings[0])

    result = timed(fit_and_keep, first, spec["repeats"], spec["warmup"])
    rows = {_key(dampings[0]): result}
    for damping in dampings[1:]:
        t0 = time.perf_counter()
        values = scores(last["analyzer"], damping)
        rows[_key(damping)] = {
            "scores": values.to(torch.float32).contiguous(),
            "attribute_s": time.perf_counter() - t0,
        }
    return {"rows": rows, "model_gap_nats": gap}


def _key(damping: float | None) -> str:
    return "heuristic" if damping is None else repr(damping)


def main() -> None:
    run_kronfluence_script(__doc__.splitlines()[0], "peer-kronfluence-charlm-", kronfluence_ekfac)


if __name__ == "__main__":
    main()
