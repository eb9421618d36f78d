"""Group gradients (hook and functional engines) and their projections against autograd."""

import pytest
import torch
import torch.nn.functional as F

from datatrace import Task
from datatrace.gradients import compute_group_grads, compute_per_sample_grads, group_members
from datatrace.projection import make_projector
from tests.models import cnn, mlp, tiny_lm


def summed_loss_grads(model, x, y, local, n_groups):
    """Reference: one autograd backward of each group's summed loss."""
    params = list(model.parameters())
    rows = []
    for j in range(n_groups):
        idx = (local == j).nonzero().flatten()
        loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum")
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_group_members_pads_and_keeps_batch_order():
    members = group_members(torch.tensor([2, 0, 2, 2, 1]))
    assert members.tolist() == [[1, -1, -1], [4, -1, -1], [0, 2, 3]]


@pytest.mark.parametrize("engine", ["hooks", "functional"])
@pytest.mark.parametrize("model_fn", [mlp, cnn])
def test_group_grads_equal_autograd_of_summed_loss(engine, model_fn):
    model = model_fn()
    if model_fn is mlp:
        x = torch.randn(9, 6, dtype=torch.float64)
    else:
        x = torch.randn(9, 1, 8, 8, dtype=torch.float64)
    n_out = 3 if model_fn is mlp else 4
    y = torch.randint(0, n_out, (9,))
    local = torch.tensor([1, 0, 1, 2, 0, 1, 1, 2, 1])  # unequal sizes: padded members
    got = compute_group_grads(Task(model), (x, y), group_members(local), engine=engine).flat()
    ref = summed_loss_grads(model, x, y, local, 3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_group_grads_of_sequences_match_per_sample_sums():
    model = tiny_lm()
    batch = {"input_ids": torch.randint(0, 11, (6, 5))}
    task = Task(model, loss="lm")
    local = torch.tensor([0, 0, 1, 1, 1, 2])
    for engine in ("hooks", "functional"):
        got = compute_group_grads(task, batch, group_members(local), engine=engine).flat()
        ps = compute_per_sample_grads(task, batch, engine="functional").flat()
        ref = torch.zeros(3, ps.shape[1], dtype=ps.dtype).index_add_(0, local, ps)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "factored"])
@pytest.mark.parametrize("model_fn", [mlp, cnn])
def test_every_projector_is_linear_in_group_factors(kind, model_fn):
    model = model_fn()
    shape = (10, 6) if model_fn is mlp else (10, 1, 8, 8)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    task = Task(model)
    local = torch.tensor([0, 3, 3, 1, 0, 2, 3, 3, 1, 0])
    proj = make_projector(kind, 16, seed=3)
    grouped = proj.project(compute_group_grads(task, (x, y), group_members(local)))
    per_sample = proj.project(compute_per_sample_grads(task, (x, y)))
    ref = torch.zeros(4, per_sample.shape[1], dtype=torch.float64).index_add_(0, local, per_sample)
    torch.testing.assert_close(grouped, ref, rtol=1e-10, atol=1e-12)


def test_equal_consecutive_groups_take_the_reshape_path():
    model = mlp()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    local = torch.tensor([0, 0, 1, 1, 2, 2])
    psg = compute_group_grads(Task(model), (x, y), group_members(local))
    assert psg.batch_size == 3 and psg.factors[0].a.shape[:2] == (3, 2)
    ref = summed_loss_grads(model, x, y, local, 3)
    torch.testing.assert_close(psg.flat(), ref, rtol=1e-10, atol=1e-12)
