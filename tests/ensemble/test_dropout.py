"""Dropout members: fixed masks shared by all examples, deterministic, batch-size invariant."""

import pytest
import torch
from torch import nn

from datatrace import (
    METHODS,
    ConfigError,
    DropoutMember,
    ModelError,
    StoreError,
    Task,
    dropout_members,
    make_attributor,
)
from datatrace.ensemble import member_scope
from tests.ensemble.helpers import FixedMask, dropout_mlp, with_module
from tests.models import classification_data, mlp

TRAIN, QUERIES = classification_data(n=10), classification_data(n=4, seed=7)


def scores(method_id, model, members, **opts):
    target = METHODS[method_id][0].target_kind
    if method_id == "trak":
        opts = {"proj_dim": 16, **opts}
    attr = make_attributor(method_id, Task(model, target=target), members=members, **opts)
    return attr.fit(TRAIN).attribute(QUERIES).values


def masked_outputs(member, model, consumer, x):
    """What the module ``consumer`` receives under the member's masks."""
    seen = []
    handle = dict(model.named_modules())[consumer].register_forward_pre_hook(
        lambda m, i: seen.append(i[0].detach())
    )
    try:
        with member_scope(Task(model), member) as task:
            task.model(x)
    finally:
        handle.remove()
    return seen[0]


def test_mask_is_bernoulli_over_features_shared_by_examples():
    model = dropout_mlp(hidden=4000, p=0.3)
    (member,) = dropout_members(1, seed=11)
    x = torch.randn(7, 6, dtype=torch.float64)
    out = masked_outputs(member, model, "3", x)
    unmasked = torch.tanh(model[0](x))
    dropped = out == 0
    # the same features are dropped for every example; kept ones are scaled by 1 / (1 - p)
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))
    torch.testing.assert_close(out[~dropped], (unmasked / 0.7)[~dropped], rtol=1e-12, atol=0)
    assert abs(float(dropped[0].double().mean()) - 0.3) < 0.03
    # ... and the model is back to its unmasked self after the scope
    torch.testing.assert_close(model[2](model[1](model[0](x))), unmasked, rtol=0, atol=0)


def test_masks_are_seeded_by_seed_member_and_layer_only():
    a, b = dropout_members(2, seed=3), dropout_members(5, seed=3)
    assert torch.equal(a[1].mask("2", (50,), 0.5), b[1].mask("2", (50,), 0.5))
    assert not torch.equal(a[0].mask("2", (50,), 0.5), a[1].mask("2", (50,), 0.5))
    assert not torch.equal(a[0].mask("2", (50,), 0.5), a[0].mask("5", (50,), 0.5))
    c = dropout_members(1, seed=4)[0]
    assert not torch.equal(a[0].mask("2", (50,), 0.5), c.mask("2", (50,), 0.5))
    # rate 0 keeps everything, unscaled
    assert torch.equal(a[0].mask("2", (9,), 0.0), torch.ones(9, dtype=torch.float64))


@pytest.mark.parametrize("method_id", ["grad-dot", "trak", "if-explicit"])
def test_same_seed_identical_different_seed_differs(method_id):
    model = dropout_mlp()
    s1 = scores(method_id, model, dropout_members(3, seed=0))
    s2 = scores(method_id, model, dropout_members(3, seed=0))
    s3 = scores(method_id, model, dropout_members(3, seed=1))
    plain = scores(method_id, model, None)
    assert torch.equal(s1, s2)
    assert not torch.allclose(s1, s3, rtol=1e-3)
    assert not torch.allclose(s1, plain, rtol=1e-3)


@pytest.mark.parametrize("engine", ["hooks", "functional"])
@pytest.mark.parametrize("method_id", ["grad-dot", "trak", "if-explicit", "tracin"])
def test_batch_size_invariance(method_id, engine):
    model = dropout_mlp()
    members = dropout_members(2, seed=5)
    a = scores(method_id, model, members, batch_size=3, engine=engine)
    b = scores(method_id, model, members, batch_size=7, engine=engine)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ensemble_is_the_mean_of_its_members():
    model = dropout_mlp()
    members = dropout_members(3, seed=2)
    together = scores("grad-dot", model, members)
    alone = torch.stack([scores("grad-dot", model, [m]) for m in members]).mean(0)
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)


def test_injection_at_a_linear_layer_hook_engine_equals_reference():
    # The hook engine reads a Linear layer's own output; a mask on that output must not fool it.
    model = mlp()
    (member,) = dropout_members(1, rate=0.5, layers=["0"], seed=2)
    mask = member.mask("0", (5,), 0.5)

    class MaskedLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * mask

    ref_layer = MaskedLinear(6, 5).double()
    ref_layer.load_state_dict(model[0].state_dict())
    reference = with_module(model, "0", ref_layer)
    ref = scores("grad-dot", reference, None, engine="functional")
    for engine in ("hooks", "functional"):
        got = scores("grad-dot", model, [member], engine=engine)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_channel_dropout_masks_whole_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Dropout2d(0.5), nn.Flatten()).eval()
    (member,) = dropout_members(1, seed=1)
    out = masked_outputs(member, model, "2", torch.randn(3, 1, 4, 4))
    zero = (out == 0).flatten(2)
    assert torch.equal(zero.all(2), zero.any(2))  # a channel is dropped everywhere or nowhere
    assert torch.equal(zero.all(2), zero.all(2)[:1].expand(3, 16))  # the same for every example
    assert 0 < int(zero.all(2)[0].sum()) < 16


def test_models_are_used_round_robin():
    a, b = mlp(seed=1), mlp(seed=2)
    members = dropout_members(3, rate=0.3, layers=["1"], models=[a, b])
    assert [m.index for m in members] == [0, 1, 2]
    finals = [m.final.load()["0.weight"] for m in members]
    assert torch.equal(finals[0], a[0].weight) and torch.equal(finals[1], b[0].weight)
    assert torch.equal(finals[2], a[0].weight)


def test_q_only_dropout_trak_averages_q_over_masked_forward_passes():
    model = dropout_mlp()
    k = 3
    plain = make_attributor("trak", Task(model, target="margin"), proj_dim=16).fit(TRAIN)
    q_only = make_attributor("trak", Task(model, target="margin"), proj_dim=16, q_dropout=k)
    q_only.fit(TRAIN)
    qs = []
    for member in dropout_members(k, seed=0):
        masked = with_module(model, "2", FixedMask(member.mask("2", (5,), 0.3)))
        with torch.no_grad():
            logits = masked(TRAIN[0])
        p = logits.softmax(1).gather(1, TRAIN[1].view(-1, 1)).squeeze(1)
        qs.append(1 - p)
    q_masked = torch.stack(qs).mean(0)
    with torch.no_grad():
        q_plain = 1 - model(TRAIN[0]).softmax(1).gather(1, TRAIN[1].view(-1, 1)).squeeze(1)
    expected = plain.attribute(QUERIES).values * (q_masked / q_plain)
    torch.testing.assert_close(q_only.attribute(QUERIES).values, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(q_masked, q_plain, rtol=1e-3)


def test_store_refuses_features_of_another_mask(tmp_path):
    model = dropout_mlp()
    task = Task(model)
    make_attributor("grad-dot", task, members=dropout_members(1, seed=0), store=tmp_path).fit(TRAIN)
    with pytest.raises(StoreError):
        make_attributor("grad-dot", task, members=dropout_members(1, seed=1), store=tmp_path).fit(
            TRAIN
        )


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.2", True])
def test_bad_rate(rate):
    with pytest.raises(ConfigError, match="rate"):
        dropout_members(2, rate=rate)
    with pytest.raises(ConfigError, match="rate"):
        make_attributor(
            "trak", Task(dropout_mlp(), target="margin"), q_dropout=2, q_dropout_rate=rate
        )


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_bad_k(k):
    with pytest.raises(ConfigError, match="k must be"):
        dropout_members(k)


def test_unknown_layer_names():
    attr = make_attributor(
        "grad-dot", Task(mlp()), members=dropout_members(2, rate=0.2, layers=["1", "nope"])
    )
    with pytest.raises(ModelError, match=r"\['nope'\]"):
        attr.fit(TRAIN)


def test_model_without_dropout_and_no_layers():
    attr = make_attributor("grad-dot", Task(mlp()), members=dropout_members(2))
    with pytest.raises(ConfigError, match=r"no nn\.Dropout layers"):
        attr.fit(TRAIN)


def test_layers_without_rate_and_bad_member_fields():
    with pytest.raises(ConfigError, match="needs a rate"):
        dropout_members(2, layers=["1"])
    with pytest.raises(ConfigError, match="index"):
        DropoutMember(index=-1)
    with pytest.raises(ConfigError, match="q_dropout"):
        make_attributor("trak", Task(dropout_mlp(), target="margin"), q_dropout=-1)


def test_q_dropout_with_dropout_members_is_refused():
    attr = make_attributor(
        "trak",
        Task(dropout_mlp(), target="margin"),
        proj_dim=8,
        q_dropout=2,
        members=dropout_members(2),
    )
    with pytest.raises(ConfigError, match="q_dropout"):
        attr.fit(TRAIN)
