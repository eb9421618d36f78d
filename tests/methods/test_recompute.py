"""Influence with recomputed training gradients (``train_features="recompute"`` / ``"auto"``).

The recompute path keeps nothing per training example and must give the stored path's
scores, top-k and self-influence (rtol 1e-10 in float64) wherever both apply.
"""

from __future__ import annotations

import pytest
import torch

import datatrace.methods.influence as influence
from datatrace import Checkpoint, ConfigError, ModelError, Task, make_attributor
from datatrace.ensemble import dropout_members
from datatrace.lora import lora_members
from tests.methods.test_kfac_influence import CASES
from tests.models import classification_data, mlp, tiny_lm

RTOL = 1e-10


def _gpt2_case():
    hf = pytest.importorskip("tests.hf_models")
    task = Task(hf.gpt2(), loss="lm", target="log_prob", module_types="layers")
    return task, hf.lm_batch(n=7, seed=1), hf.lm_batch(n=3, seed=2)


ALL_CASES = {**CASES, "gpt2": _gpt2_case}


def _pair(method_id, task, train, **opts):
    """The same attributor with stored and with recomputed factors, both fitted."""
    opts = {"damping": 1e-2, "batch_size": 3, **opts}
    stored = make_attributor(method_id, task, train_features="factored", **opts).fit(train)
    recomputed = make_attributor(method_id, task, train_features="recompute", **opts).fit(train)
    return stored, recomputed


def _assert_same(stored, recomputed, queries, k=2):
    a, b = stored.attribute(queries), recomputed.attribute(queries)
    torch.testing.assert_close(b.values, a.values, rtol=RTOL, atol=1e-13)
    assert torch.equal(b.unit_ids, a.unit_ids)
    torch.testing.assert_close(
        recomputed.self_attribute(), stored.self_attribute(), rtol=RTOL, atol=1e-13
    )
    ta, tb = stored.topk(queries, k), recomputed.topk(queries, k)
    for name in ("proponent", "opponent"):
        torch.testing.assert_close(
            getattr(tb, f"{name}_values"), getattr(ta, f"{name}_values"), rtol=RTOL, atol=1e-13
        )
        assert torch.equal(getattr(tb, f"{name}_ids"), getattr(ta, f"{name}_ids"))


@pytest.mark.parametrize("case", list(ALL_CASES))
@pytest.mark.parametrize("method_id", ["if-kfac", "if-ekfac"])
def test_recomputed_factors_give_the_stored_scores(case, method_id):
    task, train, queries = ALL_CASES[case]()
    stored, recomputed = _pair(method_id, task, train)
    assert not stored.recomputes_train_features and recomputed.recomputes_train_features
    assert stored._contexts[0].features  # kept ...
    assert recomputed._contexts[0].features == []  # ... and not
    _assert_same(stored, recomputed, queries)


def test_query_rank_and_per_module_scores_recompute_too():
    task, train, queries = CASES["lm-masked"]()
    stored, recomputed = _pair("if-ekfac", task, train, query_rank=2)
    _assert_same(stored, recomputed, queries)
    a, b = stored.attribute_per_module(queries), recomputed.attribute_per_module(queries)
    assert list(a) == list(b)
    for module in a:
        torch.testing.assert_close(b[module].values, a[module].values, rtol=RTOL, atol=1e-13)


def test_a_store_gets_the_curvature_and_no_train_shards(tmp_path):
    task, train, queries = CASES["lm-masked"]()
    opts = {"damping": 1e-2, "batch_size": 3}
    stores = {}
    for mode in ("factored", "recompute"):
        attr = make_attributor(
            "if-ekfac", task, train_features=mode, store=tmp_path / mode, **opts
        ).fit(train)
        assert attr.attribute(queries).values.shape == (3, 7)
        assert attr.store is not None
        stores[mode] = attr.store
    assert len(stores["factored"].shard_indices("train-m0")) == 1  # 7 rows: one shard
    assert len(stores["recompute"].shard_indices("train-m0")) == 0
    assert not list((tmp_path / "recompute").glob("shard-*"))
    kfac = sorted(p.name for p in (tmp_path / "recompute").glob("*kfac*"))
    assert kfac and kfac == sorted(p.name for p in (tmp_path / "factored").glob("*kfac*"))

    def size(path):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    n_params = task.num_tracked
    assert size(tmp_path / "factored") - size(tmp_path / "recompute") > 7 * n_params // 4
    # reopened: the factors come back from the store and nothing is featurized
    again = make_attributor(
        "if-ekfac", task, train_features="recompute", store=tmp_path / "recompute", **opts
    ).fit(train)
    torch.testing.assert_close(
        again.attribute(queries).values,
        make_attributor("if-ekfac", task, train_features="factored", **opts)
        .fit(train)
        .attribute(queries)
        .values,
        rtol=RTOL,
        atol=1e-13,
    )


def test_members_and_groups_recompute_at_each_members_state():
    train, queries = classification_data(n=11), classification_data(n=4, seed=7)
    g = torch.Generator().manual_seed(0)
    adapter = {
        "0.lora_A.weight": torch.randn(2, 6, generator=g, dtype=torch.float64),
        "0.lora_B.weight": torch.randn(5, 2, generator=g, dtype=torch.float64),
    }
    member_sets = {
        "independent": [mlp(seed=0).state_dict(), mlp(seed=1).state_dict()],
        # masks applied once per recomputed batch, also inside self_attribute's member scope
        "dropout": dropout_members(2, rate=0.4, layers=["1"], seed=3),
        "lora": lora_members([adapter], params="full"),
    }
    for kind, members in member_sets.items():
        stored, recomputed = _pair("if-ekfac", Task(mlp()), train, members=members)
        assert recomputed.recomputes_train_features, kind
        _assert_same(stored, recomputed, queries)
    # groups: group gradients recomputed (not factors), equal to the kept group gradients
    groups = torch.arange(11) % 4
    kept = make_attributor("if-ekfac", Task(mlp()), damping=1e-2, batch_size=3, groups=groups).fit(
        train
    )
    recomputed = make_attributor(
        "if-ekfac",
        Task(mlp()),
        damping=1e-2,
        batch_size=3,
        groups=groups,
        train_features="recompute",
    ).fit(train)
    assert recomputed._contexts[0].form == "flat" and recomputed._contexts[0].features == []
    _assert_same(kept, recomputed, queries)


def test_other_curvatures_recompute_their_gradients():
    train, queries = classification_data(n=11), classification_data(n=4, seed=7)
    opts = {"damping": 1e-2, "batch_size": 3}
    for method_id in ("if-explicit", "if-cg"):
        kept = make_attributor(method_id, Task(mlp()), **opts).fit(train)
        recomputed = make_attributor(
            method_id, Task(mlp()), train_features="recompute", **opts
        ).fit(train)
        assert recomputed._contexts[0].form == "factored" and recomputed._contexts[0].features == []
        _assert_same(kept, recomputed, queries)
    # a LayerNorm is outside the hook engine: flattened gradients are recomputed
    task = Task(tiny_lm(), loss="lm")
    _, train_lm, queries_lm = CASES["lm-masked"]()
    kept = make_attributor("if-explicit", task, **opts).fit(train_lm)
    recomputed = make_attributor("if-explicit", task, train_features="recompute", **opts)
    recomputed.fit(train_lm)
    assert recomputed._contexts[0].form == "flat"  # the loop's decision
    _assert_same(kept, recomputed, queries_lm)


@pytest.mark.parametrize("method_id", ["grad-dot", "grad-cos", "tracin"])
def test_gradient_similarity_recomputes_its_features(method_id):
    train, queries = classification_data(n=11), classification_data(n=4, seed=7)
    model = mlp()
    checkpoints = [Checkpoint(mlp(seed=s).state_dict(), learning_rate=0.1 * s) for s in (1, 2)]
    task = Task(model, checkpoints=checkpoints if method_id == "tracin" else None)
    for opts in ({}, {"groups": torch.arange(11) % 4}, {"projector": "sjlt", "proj_dim": 16}):
        kept = make_attributor(method_id, task, batch_size=3, **opts).fit(train)
        recomputed = make_attributor(
            method_id, task, batch_size=3, train_features="recompute", **opts
        ).fit(train)
        assert recomputed._contexts[0].features == [] and recomputed.recomputes_train_features
        _assert_same(kept, recomputed, queries)


@pytest.mark.parametrize("case", ["mlp", "lm-masked"])
def test_auto_stores_within_the_budget_and_recomputes_beyond_it(case, monkeypatch):
    task, train, queries = CASES[case]()
    opts = {"damping": 1e-2, "batch_size": 3}
    tiny = make_attributor("if-ekfac", task, **opts).fit(train)  # default: auto
    assert not tiny.recomputes_train_features
    stored = sum(f.numel() * f.element_size() for f in tiny._contexts[0].features)
    assert stored > 0
    expected = tiny.attribute(queries).values
    # the rule: stored bytes (members x examples x row bytes) above the budget -> recompute
    for budget, recomputes in [(stored, False), (stored - 1, True), (0, True)]:
        monkeypatch.setattr(influence, "TRAIN_FEATURE_BUDGET", budget)
        attr = make_attributor("if-ekfac", task, **opts).fit(train)
        assert attr.recomputes_train_features is recomputes, budget
        assert bool(attr._contexts[0].features) is not recomputes
        torch.testing.assert_close(attr.attribute(queries).values, expected, rtol=RTOL, atol=1e-13)
    # two members need twice the bytes; an explicit setting overrides the rule
    monkeypatch.setattr(influence, "TRAIN_FEATURE_BUDGET", stored)
    two = [task.model.state_dict(), task.model.state_dict()]
    assert make_attributor("if-ekfac", task, members=two, **opts).fit(train)._recompute
    explicit = make_attributor("if-ekfac", task, train_features="factored", members=two, **opts)
    assert not explicit.fit(train).recomputes_train_features
    monkeypatch.setattr(influence, "TRAIN_FEATURE_BUDGET", 0)
    grads = make_attributor("if-ekfac", task, train_features="gradients", **opts).fit(train)
    assert not grads.recomputes_train_features  # auto's rule is for factored rows only


def test_bad_recompute_settings():
    task = Task(mlp())
    with pytest.raises(ConfigError, match="curvature='fisher'"):
        make_attributor("if-datainf", task, train_features="recompute")
    with pytest.raises(ConfigError, match="'recompute'"):
        make_attributor("if-ekfac", task, train_features="stream")
    with pytest.raises(ConfigError, match="groups="):
        make_attributor(
            "if-ekfac",
            task,
            train_features="recompute",
            query_rank=2,
            groups=torch.arange(4) % 2,
        )
    # query_rank needs factored features, which the LM's embedding and LayerNorm rule out
    with pytest.raises(ModelError, match=r"query_rank=2 needs factored.*emb\.weight"):
        make_attributor(
            "if-cg", Task(tiny_lm(), loss="lm"), train_features="recompute", query_rank=2
        )


def test_recompute_keeps_kfacs_layer_requirement():
    # K-FAC needs every tracked parameter in a Linear/Conv2d layer, recomputed or not
    with pytest.raises(ModelError, match="module_types"):
        make_attributor("if-ekfac", Task(tiny_lm(), loss="lm"), train_features="recompute")
