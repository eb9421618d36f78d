"""Factored feature rows against per-sample gradients from an autograd loop (float64)."""

import pytest
import torch
from torch import nn

from datatrace import ModelError, Task
from datatrace.gradients import compute_per_sample_grads
from datatrace.gradients.factored import (
    FactorCodec,
    GradientBlock,
    ParamLayout,
    contract_preconditioned,
    covers_tracked,
    factored_modules,
    pairs_factors,
    stores_factors,
)
from tests.models import TinyLM, autograd_loop, bias_free_mlp, classification_data, mlp

RTOL = 1e-10


def _lm_ids(n: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (n, t), generator=g)}


def test_rules_at_their_boundaries():
    # T (I' + O) <= O I' for storage; T^2 (I' + O) < O I' for the pairwise product
    assert stores_factors(1, 2, 2) and not stores_factors(2, 2, 2)
    assert not pairs_factors(1, 2, 2) and pairs_factors(1, 3, 3)
    assert pairs_factors(3, 16, 65) and not pairs_factors(4, 16, 17)
    assert not pairs_factors(1, 1, 100)  # O = 1: the matrix is the smaller


def test_mlp_rows_give_autograd_inner_products_norms_and_scaling():
    model = bias_free_mlp(n_out=1)
    task = Task(model, loss="mse")
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(7, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = autograd_loop(model, lambda m, xb, yb: 0.5 * (m(xb) - yb).square().sum(), x, y)
    codec = FactorCodec(ParamLayout(task), pairs_factors)
    rows = codec.encode(compute_per_sample_grads(task, (x, y)).factors)
    kinds = [len(part) for part in codec.decode(rows)]
    assert kinds == [2, 2, 1]  # the O = 1 layer keeps its matrix
    assert rows.shape[1] == 3 + (6 + 9) + (10 + 7) + 8 < ref.shape[1]
    torch.testing.assert_close(codec.inner(rows[:3], rows), ref[:3] @ ref.T, rtol=RTOL, atol=0)
    torch.testing.assert_close(codec.sq_norms(rows), ref.square().sum(1), rtol=RTOL, atol=0)
    factor = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    scaled = codec.scale(rows, factor)
    torch.testing.assert_close(
        codec.inner(scaled, rows), (factor[:, None] * ref) @ ref.T, rtol=RTOL, atol=0
    )


def test_sequence_rows_choose_per_layer_and_join_ragged_batches():
    # d = 16, vocab 64, T = 3: q/k/v (O 16, I' 17) keep matrices, the head (O 64) its factors
    torch.manual_seed(0)
    task = Task(TinyLM(vocab=64, d=16).double().eval(), loss="lm", module_types=(nn.Linear,))
    codec = FactorCodec(ParamLayout(task), pairs_factors)
    long, short = _lm_ids(4, 3, 0), _lm_ids(3, 2, 1)
    rows = [codec.encode(compute_per_sample_grads(task, b).factors) for b in (long, short)]
    assert [len(part) for part in codec.decode(rows[0])] == [1, 1, 1, 2]
    assert [len(part) for part in codec.decode(rows[1])] == [2, 2, 2, 2]  # T = 2: all factors
    ref = torch.cat(
        [compute_per_sample_grads(task, b, engine="functional").flat() for b in (long, short)]
    )
    joined = codec.join(rows)
    assert [len(part) for part in codec.decode(joined)] == [1, 1, 1, 2]  # at the longer T
    torch.testing.assert_close(codec.inner(joined, joined), ref @ ref.T, rtol=RTOL, atol=0)
    torch.testing.assert_close(codec.inner(joined, rows[1]), ref @ ref[4:].T, rtol=RTOL, atol=0)
    torch.testing.assert_close(codec.sq_norms(joined), ref.square().sum(1), rtol=RTOL, atol=0)


def test_segments_add_up():
    task = Task(mlp())
    x, y = classification_data(n=5)
    codec = FactorCodec(ParamLayout(task), pairs_factors)
    rows = codec.encode(compute_per_sample_grads(task, (x, y)).factors)
    two = torch.cat([rows, codec.scale(rows, 3.0)], 1)
    assert len(codec.segments(two)) == 2
    torch.testing.assert_close(
        codec.inner(two, two), 10 * codec.inner(rows, rows), rtol=RTOL, atol=0
    )


def test_uncovered_parameters_are_refused_by_name():
    torch.manual_seed(0)
    task = Task(TinyLM().double().eval(), loss="lm")
    assert not covers_tracked(task)
    assert covers_tracked(Task(TinyLM().double().eval(), loss="lm", module_types=(nn.Linear,)))
    with pytest.raises(ModelError, match=r"emb\.weight"):
        factored_modules(task)


@pytest.mark.parametrize("n_queries", [1, 40])
def test_gradient_block_is_the_batchwise_contraction(n_queries):
    # one query: the LM's layers keep factors (k T < I'); forty: gradient matrices in the
    # block's buffers. Either way the block's scores are each batch's contraction, side by side.
    task = Task(TinyLM(vocab=64, d=16).double().eval(), loss="lm", module_types="layers")
    layout = ParamLayout(task)
    g = torch.Generator().manual_seed(5)
    queries = [
        torch.randn(n_queries, s.out_features, s.in_width, generator=g, dtype=torch.float64)
        for s in layout.slots
    ]
    block = GradientBlock(layout, capacity=9, n_queries=n_queries)
    expected = []
    for n, t in [(4, 3), (3, 5)]:  # batches of different lengths
        psg = compute_per_sample_grads(task, _lm_ids(n, t, seed=n), engine="hooks")
        by_module = {f.module: f for f in psg.factors}
        parts = [(by_module[m].a, by_module[m].g) for m in layout.modules]
        block.add(parts)
        expected.append(sum(contract_preconditioned(p, part) for p, part in zip(queries, parts)))
    assert block.rows == 7
    forms = {mats is None for mats in block._mats}
    assert forms == ({True} if n_queries == 1 else {False})
    torch.testing.assert_close(block.contract(queries), torch.cat(expected, 1), rtol=RTOL, atol=0)
    with pytest.raises(ValueError, match="a block of 9 rows cannot take rows 7:11"):
        block.add([(a[:1].expand(4, -1, -1), gg[:1].expand(4, -1, -1)) for a, gg in parts])
