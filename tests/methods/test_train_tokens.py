"""Per-position scores of training examples (K-FAC/EK-FAC influence on language models)."""

import pytest
import torch

from datatrace import ConfigError, Task, make_attributor
from tests.hf_models import gpt2, lm_batch
from tests.models import cnn


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("if-ekfac", {}),
        ("if-kfac", {}),
        ("if-kfac", {"factored_damping": True}),
        ("if-ekfac", {"query_rank": 2}),
        ("if-ekfac", {"train_features": "recompute"}),
    ],
)
def test_train_token_scores_sum_to_the_example_scores(method, options):
    model = gpt2()
    train, queries = lm_batch(n=10, seed=3), lm_batch(n=3, seed=4)
    task = Task(model, loss="lm", target="log_prob", module_types="layers")
    attr = make_attributor(method, task, **options).fit(train)
    picked = [7, 2, 4]
    subset = {k: v[picked] for k, v in train.items()}
    tokens = attr.attribute_train_tokens(queries, subset)
    assert tokens.shape == (3, 3, train["input_ids"].shape[1])
    full = attr.attribute(queries).values
    torch.testing.assert_close(tokens.sum(2), full[:, picked], rtol=1e-10, atol=1e-14)
    # positions the loss ignores carry nothing, real ones do
    masked = subset["labels"] == -100
    assert bool((tokens[:, masked] == 0).all()) and masked.any()
    assert bool((tokens[:, ~masked].abs() > 0).any())


def test_train_token_scores_are_refused_where_positions_are_not_tokens():
    model = gpt2()
    train = lm_batch(n=6, seed=3)
    dense = make_attributor("if-explicit", Task(model, loss="lm", params=["transformer.h.0.mlp"]))
    with pytest.raises(ConfigError, match="per-token training scores need curvature"):
        dense.fit(train).attribute_train_tokens(train, train)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    conv = make_attributor("if-ekfac", Task(cnn(), module_types="layers")).fit((x, y))
    with pytest.raises(ConfigError, match="positions per example"):
        conv.attribute_train_tokens((x, y), (x, y))


def test_one_generated_token_is_attributed_by_masking_the_other_labels():
    model = gpt2()
    train, queries = lm_batch(n=10, seed=3), lm_batch(n=2, seed=4)
    task = Task(model, loss="lm", target="log_prob", module_types="layers")
    attr = make_attributor("if-ekfac", task).fit(train)
    per_token = attr.attribute_per_token(queries)
    t0 = 3  # the label of position 3 is predicted from positions < 3
    only = dict(queries, labels=torch.full_like(queries["labels"], -100))
    only["labels"][:, t0] = queries["labels"][:, t0]
    torch.testing.assert_close(attr.attribute(only).values, per_token[:, t0], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("train_features", ["auto", "recompute"])
def test_documents_of_several_chunks_score_as_the_sum_of_their_chunks(train_features):
    """A document cut into chunks is a group: its influence is the sum of its chunks'."""
    model = gpt2()
    train, queries = lm_batch(n=12, seed=3), lm_batch(n=3, seed=4)
    task = Task(model, loss="lm", target="log_prob", module_types="layers")
    doc_of_chunk = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    chunks = make_attributor("if-ekfac", task, damping="heuristic").fit(train)
    docs = make_attributor(
        "if-ekfac", task, damping="heuristic", groups=doc_of_chunk, train_features=train_features
    ).fit(train)
    per_doc = docs.attribute(queries).values
    per_chunk = chunks.attribute(queries).values
    expected = torch.zeros(3, 5, dtype=per_chunk.dtype).index_add_(1, doc_of_chunk, per_chunk)
    assert per_doc.shape == (3, 5)
    torch.testing.assert_close(per_doc, expected, rtol=1e-9, atol=1e-12)
