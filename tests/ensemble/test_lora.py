"""LoRA members: the adapted function, adapter gradients, fine-tuning, peft adapters, bad input."""

import copy

import pytest
import torch
from torch import nn

from datatrace import (
    ConfigError,
    LoRAMember,
    ModelError,
    Task,
    lora_members,
    make_attributor,
    train_lora_members,
)
from datatrace.lora import LoRALinear, apply_lora
from tests.models import classification_data, mlp

TRAIN, QUERIES = classification_data(n=10), classification_data(n=4, seed=7)


def random_adapter(rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "0.lora_A.weight": torch.randn(rank, 6, generator=g, dtype=torch.float64),
        "0.lora_B.weight": torch.randn(5, rank, generator=g, dtype=torch.float64),
        "2.lora_A.weight": torch.randn(rank, 5, generator=g, dtype=torch.float64),
        "2.lora_B.weight": torch.randn(3, rank, generator=g, dtype=torch.float64),
    }


def manual_forward(base, adapter, s, x):
    """``W x + b + s B A x`` for both layers of tests.models.mlp, written out."""
    h = x @ base[0].weight.T + base[0].bias
    h = h + s * (x @ adapter["0.lora_A.weight"].T) @ adapter["0.lora_B.weight"].T
    h = torch.tanh(h)
    out = h @ base[2].weight.T + base[2].bias
    return out + s * (h @ adapter["2.lora_A.weight"].T) @ adapter["2.lora_B.weight"].T


def test_lora_linear_computes_the_adapted_function_and_starts_as_the_base():
    base = mlp()
    x = QUERIES[0]
    fresh = apply_lora(copy.deepcopy(base), ["0", "2"], rank=3, scaling=2.0)
    assert isinstance(fresh[0], LoRALinear) and fresh[0].lora_A.weight.shape == (3, 6)
    torch.testing.assert_close(fresh(x), base(x), rtol=0, atol=0)  # B = 0
    adapter = random_adapter()
    adapted = apply_lora(copy.deepcopy(base), ["0", "2"], rank=2, scaling=0.7)
    adapted.load_state_dict({**adapted.state_dict(), **adapter})
    torch.testing.assert_close(
        adapted(x), manual_forward(base, adapter, 0.7, x), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("engine", ["hooks", "functional"])
def test_adapter_gradients_match_an_autograd_loop(engine):
    base, adapter, s = mlp(), random_adapter(), 1.5
    (member,) = lora_members([adapter], alpha=3.0)
    got = make_attributor("grad-dot", Task(base), members=[member], engine=engine)
    got = got.fit(TRAIN).attribute(QUERIES).values

    def grads(x, y):
        rows = []
        for i in range(len(y)):
            leaves = {k: v.clone().requires_grad_(True) for k, v in adapter.items()}
            out = manual_forward(base, leaves, s, x[i : i + 1])
            loss = nn.functional.cross_entropy(out, y[i : i + 1])
            rows.append(
                torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(leaves.values()))])
            )
        return torch.stack(rows)

    expected = grads(*QUERIES) @ grads(*TRAIN).T
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_full_parameter_gradients_are_those_of_the_merged_model():
    base, adapter = mlp(), random_adapter()
    (member,) = lora_members([adapter], params="full")
    got = make_attributor("grad-dot", Task(base), members=[member]).fit(TRAIN)
    got = got.attribute(QUERIES).values
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for layer in ("0", "2"):
            delta = adapter[f"{layer}.lora_B.weight"] @ adapter[f"{layer}.lora_A.weight"]
            merged.get_submodule(layer).weight += delta
    expected = make_attributor("grad-dot", Task(merged)).fit(TRAIN).attribute(QUERIES).values
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_train_lora_members_is_seeded_and_fits_the_data():
    base = mlp()
    task = Task(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    a = train_lora_members(task, TRAIN, 2, rank=2, epochs=20, lr=0.05, batch_size=4, seed=0)
    b = train_lora_members(task, TRAIN, 2, rank=2, epochs=20, lr=0.05, batch_size=4, seed=0)
    c = train_lora_members(task, TRAIN, 1, rank=2, epochs=20, lr=0.05, batch_size=4, seed=1)
    for k in before:  # the base is frozen
        assert torch.equal(base.state_dict()[k], before[k])
    for ma, mb in zip(a, b):
        assert all(torch.equal(ma.adapter[k], mb.adapter[k]) for k in ma.adapter)
    key = "0.lora_A.weight"
    assert not torch.equal(a[0].adapter[key], a[1].adapter[key])
    assert not torch.equal(a[0].adapter[key], c[0].adapter[key])
    x, y = TRAIN
    loss0 = nn.functional.cross_entropy(base(x), y)
    for m in a:
        loss = nn.functional.cross_entropy(manual_forward(base, m.adapter, m.scaling, x), y)
        assert loss < 0.8 * loss0
    assert a[0].targets == ("0", "2") and a[0].rank == 2


def test_peft_adapters_are_accepted():
    peft = pytest.importorskip(
        "peft", reason="peft is an optional extra (pip install datatrace[hf])"
    )
    base = mlp()
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    adapter = random_adapter(seed=4)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_" in name:
                layer, ab = name.split("base_model.model.")[1].split(".lora_")
                p.copy_(adapter[f"{layer}.lora_{ab[0]}.weight"])
    wrapped.eval()
    (member,) = lora_members([wrapped])
    assert member.rank == 2 and member.scaling == 3.0 and member.targets == ("0", "2")
    with member.applied(Task(base)) as task:
        state = member.states(task)[-1][1]
        out = torch.func.functional_call(task.model, state, (QUERIES[0],))
    torch.testing.assert_close(out, wrapped(QUERIES[0]), rtol=1e-12, atol=1e-12)
    # the same adapter as a peft state dict (get_peft_model_state_dict keys)
    state_dict = peft.get_peft_model_state_dict(wrapped)
    (from_dict,) = lora_members([state_dict], alpha=6.0)
    s1 = make_attributor("grad-dot", Task(base), members=[member]).fit(TRAIN).attribute(QUERIES)
    s2 = make_attributor("grad-dot", Task(base), members=[from_dict]).fit(TRAIN).attribute(QUERIES)
    torch.testing.assert_close(s1.values, s2.values, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_bad_rank(rank):
    with pytest.raises(ConfigError, match="rank"):
        LoRAMember(adapter=random_adapter(), rank=rank, targets=("0", "2"))
    with pytest.raises(ConfigError, match="rank"):
        train_lora_members(Task(mlp()), TRAIN, 2, rank=rank)
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(mlp(), ["0"], rank=rank, scaling=1.0)


def test_missing_target_modules():
    with pytest.raises(ModelError, match=r"\['7'\]"):
        train_lora_members(Task(mlp()), TRAIN, 2, targets=["0", "7"])
    with pytest.raises(ModelError, match=r"\['1'\]"):  # a Tanh, not a Linear
        apply_lora(mlp(), ["1"], rank=2, scaling=1.0)
    adapter = {"9.lora_A.weight": torch.zeros(2, 6), "9.lora_B.weight": torch.zeros(5, 2)}
    attr = make_attributor("grad-dot", Task(mlp()), members=lora_members([adapter]))
    with pytest.raises(ModelError, match="do not exist"):
        attr.fit(TRAIN)


def test_mismatched_architectures():
    wrong = random_adapter()
    wrong["0.lora_A.weight"] = torch.zeros(2, 7, dtype=torch.float64)  # layer 0 takes 6 inputs
    attr = make_attributor("grad-dot", Task(mlp()), members=lora_members([wrong]))
    with pytest.raises(ModelError, match="architecture"):
        attr.fit(TRAIN)
    with pytest.raises(ModelError, match="rank 3"):
        LoRAMember(adapter=random_adapter(rank=2), rank=3, targets=("0", "2"))
    with pytest.raises(ModelError, match="missing"):
        LoRAMember(adapter=random_adapter(), rank=2, targets=("0",))
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    base_mismatch = lora_members([random_adapter()], base=other.state_dict())
    attr = make_attributor("grad-dot", Task(mlp()), members=base_mismatch)
    with pytest.raises(ModelError, match="architecture"):
        attr.fit(TRAIN)
    with pytest.raises(ModelError, match="not a LoRA weight"):
        lora_members([{"0.weight": torch.zeros(5, 6)}])
