"""A one-member ensemble of any kind equals the plain method on that member's effective model.

Runs over every registered method (``datatrace.METHODS``), so methods added later are covered.
References are models built by hand: the dropout layer replaced by a fixed multiplication
with the member's mask; the LoRA-adapted model with the adapter loaded as its weights.
"""

import copy

import pytest
import torch
from torch import nn

from datatrace import METHODS, Checkpoint, Task, dropout_members, independent_members, lora_members
from datatrace.lora import apply_lora
from tests.ensemble.helpers import FixedMask, build, dropout_mlp, target_of, with_module
from tests.models import classification_data, mlp

# Methods that replay the training run need its recipe, which a member of another effective
# model (dropout masks, an adapter) does not have: tests/methods/test_unrolled.py covers them.
IDS = sorted(m for m in METHODS if not METHODS[m][0].replays_training)
# Variants of a kind already covered for every method run on a representative few.
SOME = ["grad-dot", "trak", "if-explicit", "if-cg", "tracin"]


@pytest.fixture(scope="module")
def data():
    return classification_data(n=10), classification_data(n=3, seed=7)


def assert_same(method_id, reference_task, member_task, member, data, **extra):
    train, queries = data
    plain = build(method_id, reference_task, **extra).fit(train)
    via = build(method_id, member_task, members=[member], **extra).fit(train)
    a, b = plain.attribute(queries).values, via.attribute(queries).values
    assert torch.isfinite(a).all() and a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method_id", IDS)
def test_dropout_member_equals_masked_model(method_id, data):
    model = dropout_mlp()
    (member,) = dropout_members(1, seed=3)
    mask = member.mask("2", (5,), 0.3)
    assert 0 < int((mask == 0).sum()) < 5  # the mask drops something and keeps something
    reference = with_module(model, "2", FixedMask(mask))
    target = target_of(method_id)
    assert_same(method_id, Task(reference, target=target), Task(model, target=target), member, data)


@pytest.mark.parametrize("method_id", SOME)
def test_injected_dropout_member_equals_masked_model(method_id, data):
    model = mlp()  # no dropout layers: inject after the Tanh
    (member,) = dropout_members(1, rate=0.4, layers=["1"], seed=1)
    mask = member.mask("1", (5,), 0.4)
    assert 0 < int((mask == 0).sum()) < 5
    reference = with_module(model, "1", FixedMask(mask, nn.Tanh()))
    target = target_of(method_id)
    assert_same(method_id, Task(reference, target=target), Task(model, target=target), member, data)


def _adapter(rank: int = 2, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"0": (5, 6), "2": (3, 5)}
    out = {}
    for name, (o, i) in shapes.items():
        out[f"{name}.lora_A.weight"] = torch.randn(rank, i, generator=g, dtype=torch.float64)
        out[f"{name}.lora_B.weight"] = 0.5 * torch.randn(o, rank, generator=g, dtype=torch.float64)
    return out


def _adapted(model: nn.Module, adapter, rank: int, scaling: float) -> nn.Module:
    out = apply_lora(copy.deepcopy(model), ["0", "2"], rank, scaling)
    out.load_state_dict({**out.state_dict(), **adapter})
    return out


@pytest.mark.parametrize(
    ("method_id", "params"), [(m, "adapter") for m in IDS] + [(m, "full") for m in SOME]
)
def test_lora_member_equals_adapted_model(method_id, params, data):
    base = mlp(seed=2)
    adapter = _adapter()
    (member,) = lora_members([adapter], alpha=3.0, params=params)
    assert member.rank == 2 and member.scaling == 1.5 and member.targets == ("0", "2")
    reference = _adapted(base, adapter, 2, 1.5)
    names = list(adapter) if params == "adapter" else [n for n, _ in base.named_parameters()]
    target = target_of(method_id)
    # rps refits the final layer; with LoRA there, name it (its default picks the last Linear,
    # which is the adapter's lora_B).
    extra = {"layer": "2"} if method_id == "rps" else {}
    assert_same(
        method_id,
        Task(reference, target=target, params=names),
        Task(base, target=target),
        member,
        data,
        **extra,
    )


@pytest.mark.parametrize("method_id", SOME)
def test_lora_member_on_a_base_checkpoint(method_id, data):
    task_model, base = mlp(seed=0), mlp(seed=6)
    adapter = _adapter(seed=9)
    (member,) = lora_members([adapter], base=Checkpoint(base.state_dict()))
    reference = _adapted(base, adapter, 2, 1.0)
    target = target_of(method_id)
    extra = {"layer": "2"} if method_id == "rps" else {}
    assert_same(
        method_id,
        Task(reference, target=target, params=list(adapter)),
        Task(task_model, target=target),
        member,
        data,
        **extra,
    )


@pytest.mark.parametrize("method_id", [*SOME, "source"] if "source" in METHODS else SOME)
def test_independent_member_on_a_subset_equals_plain(method_id, data):
    other = mlp(seed=4)
    (member,) = independent_members([other.state_dict()], train_indices=[[0, 2, 5]])
    assert member.final is not None and member.final.train_indices == (0, 2, 5)
    target = target_of(method_id)
    # the plain method on the same checkpoint (Source reads which examples a run used)
    reference = Task(other, target=target, checkpoints=[member.final])
    assert_same(method_id, reference, Task(mlp(), target=target), member, data)
