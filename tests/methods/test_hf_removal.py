"""Counterfactual check on a locally trained GPT-2: removing a query's top proponents hurts it.

A GPT-2 (built from a config, default attention) is trained from scratch on sequences of 8
"families" (each family its own peaked Markov chain over the tokens). For each query
sequence, retraining without its 20 strongest EK-FAC proponents must raise its loss more than
retraining without 20 random training sequences — for most queries, and as a paired
bootstrap 95% interval of the mean difference above 0 (DESIGN.md §9's "beats" rule).
"""

import numpy as np
import pytest
import torch

from datatrace import Task, make_attributor
from datatrace.task import lm_loss

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, FAMILIES, PER_FAMILY, STEPS, K = 16, 16, 8, 20, 150, 20


def markov_corpus(n_per_family: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # the families are fixed; seed picks the sequences
    chains = torch.softmax(4.0 * torch.randn(FAMILIES, VOCAB, VOCAB, generator=g), dim=-1)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for f in range(FAMILIES):
        for _ in range(n_per_family):
            tok = int(torch.randint(0, VOCAB, (1,), generator=g))
            seq = [tok]
            for _ in range(LENGTH - 1):
                tok = int(torch.multinomial(chains[f, tok], 1, generator=g))
                seq.append(tok)
            rows.append(seq)
    return torch.tensor(rows)


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def train(ids: torch.Tensor) -> torch.nn.Module:
    """Adam from a fixed initialisation and a fixed batch order (removed rows just skipped)."""
    model = build().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randperm(ids.shape[0], generator=g)[:32]
        loss = lm_loss(model(input_ids=ids[idx]).logits, ids[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def query_losses(model: torch.nn.Module, queries: torch.Tensor) -> torch.Tensor:
    return lm_loss(model(input_ids=queries).logits, queries)


def paired_bootstrap_low(diff: np.ndarray, reps: int = 2000) -> float:
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (reps, len(diff)))].mean(1)
    return float(np.quantile(means, 0.025))


@pytest.mark.slow
def test_removing_top_proponents_raises_query_loss_more_than_random():
    torch.set_num_threads(1)
    train_ids = markov_corpus(PER_FAMILY, seed=1)
    queries = markov_corpus(1, seed=2)
    model = train(train_ids)
    base = query_losses(model, queries)
    task = Task(model, loss="lm", module_types="layers")
    batch = {"input_ids": train_ids, "labels": train_ids}
    attributor = make_attributor(
        "if-ekfac", task, damping="heuristic", fisher="empirical", batch_size=40
    )
    top = attributor.fit(batch).topk({"input_ids": queries, "labels": queries}, K)
    rng = torch.Generator().manual_seed(3)
    n = train_ids.shape[0]
    rise_top, rise_random = [], []
    for q in range(queries.shape[0]):
        keep = torch.ones(n, dtype=torch.bool)
        keep[top.proponent_ids[q]] = False
        rise_top.append(
            float(query_losses(train(train_ids[keep]), queries[q : q + 1])[0] - base[q])
        )
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=rng)[:K]] = False
        rise_random.append(
            float(query_losses(train(train_ids[keep]), queries[q : q + 1])[0] - base[q])
        )
    diff = np.array(rise_top) - np.array(rise_random)
    assert (diff > 0).sum() > len(diff) / 2, (rise_top, rise_random)
    assert paired_bootstrap_low(diff) > 0, (rise_top, rise_random)
