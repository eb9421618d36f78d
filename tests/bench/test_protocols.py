"""Ground-truth protocols: lds-half and fixed-seed-drop (the seed-0 run without k% of its data)."""

import pytest
import torch
import torch.nn.functional as F

import datatrace.bench.protocols as protocols
from datatrace import ConfigError
from datatrace.bench.cache import GroundTruthSpec
from datatrace.bench.protocols import (
    DropGroundTruth,
    DropSpec,
    drop_ground_truth,
    parse_protocol,
    protocol_name,
    train_dropped,
)
from datatrace.bench.settings import get_setting
from datatrace.metrics import lds, spearman_batched
from tests.bench.test_cache import Blobs  # registers "test-blobs" (Adam, a replay recipe)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parse_protocol():
    assert parse_protocol("lds-half", m=7) == GroundTruthSpec(m=7, alpha=0.5, seeds=2)
    assert parse_protocol("lds-half", m=7, alpha=0.3, seeds=1) == GroundTruthSpec(7, 0.3, 1)
    assert parse_protocol(" fixed-seed-drop:0.05", m=9) == DropSpec(fraction=0.05, m=9)
    assert protocol_name(parse_protocol("fixed-seed-drop:1e-2")) == "fixed-seed-drop:0.01"
    assert protocol_name(GroundTruthSpec()) == "lds-half"


@pytest.mark.parametrize(
    "text, kwargs, match",
    [
        ("bogus", {}, "unknown protocol 'bogus'; choose lds-half"),
        ("lds-half:0.5", {}, "lds-half takes no argument"),
        ("fixed-seed-drop", {}, "needs the fraction"),
        ("fixed-seed-drop:", {}, "needs the fraction"),
        ("fixed-seed-drop:abc", {}, "needs the fraction"),
        ("fixed-seed-drop:nan", {}, "needs the fraction"),
        ("fixed-seed-drop:0", {}, "strictly between 0 and 1"),
        ("fixed-seed-drop:1.5", {}, "got 1.5"),
        ("fixed-seed-drop:0.01", {"seeds": 2}, "--seeds belong(s) to the lds-half protocol"),
        ("fixed-seed-drop:0.01", {"alpha": 0.5}, "--alpha belong(s)"),
        ("fixed-seed-drop:0.01", {"m": 1}, "m (number of drop sets) must be an int >= 2"),
        ("lds-half", {"alpha": 1.0}, "alpha must lie strictly between 0 and 1"),
    ],
)
def test_protocol_parsing_errors(text, kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        parse_protocol(text, **kwargs)


def test_a_fraction_that_drops_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"round\(0.01 x 24\) = 0 of the 24"):
        DropSpec(fraction=0.01).dropped(24)
    dropped = DropSpec(fraction=0.1, m=5).dropped(24)
    assert dropped.shape == (5, 24) and dropped.sum(1).tolist() == [2] * 5


@pytest.mark.parametrize("name", ["test-blobs", "digits-mlp-short"])
def test_nothing_dropped_is_the_seed0_model_bit_for_bit(name):
    setting = get_setting(name, **({"size": "small"} if name.startswith("digits") else {}))
    replayed = train_dropped(setting, torch.zeros(setting.n_train, dtype=torch.bool))
    assert _states_equal(replayed, setting.train(seed=0))
    assert not replayed.training


def test_a_drop_zeroes_the_loss_weight_and_keeps_the_batches():
    """An independent loop: torch.optim.Adam on Σ_{i ∈ B_t} w_i ℓ_i / |B_t| over the recorded
    batches (w_i = 0 for the dropped examples) ends at the weights train_dropped gives."""
    setting = Blobs()
    _, recipe = setting.train_recipe(seed=0)
    dropped = torch.tensor([3, 10, 17])
    model = setting.build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=setting.lr, weight_decay=setting.weight_decay)
    weights = torch.ones(setting.n_train).index_fill_(0, dropped, 0.0)
    x, y = setting.data.train
    for step in recipe.steps:
        idx = torch.tensor(step.indices)
        opt.zero_grad()
        losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        ((losses * weights[idx]).sum() / len(idx)).backward()
        opt.step()
    got = train_dropped(setting, dropped)
    for (name, a), b in zip(got.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # float32
    # and it differs from training on the kept examples only (other batches, denominators)
    kept = torch.ones(setting.n_train, dtype=torch.bool).index_fill_(0, dropped, False)
    assert not _states_equal(got, setting.train(kept, seed=0))


def test_drop_ground_truth_is_cached_and_its_full_run_is_the_seed0_model(tmp_path, monkeypatch):
    setting = Blobs()
    spec = DropSpec(fraction=0.1, m=4)
    calls = {"n": 0}
    real = protocols._retrain_dropped

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(protocols, "_retrain_dropped", counted)
    gt = drop_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 5  # the full run, then 4 drop sets
    assert isinstance(gt, DropGroundTruth) and gt.targets.shape == (4, 10)
    assert torch.equal(gt.dropped, spec.dropped(setting.n_train))
    assert torch.equal(gt.full, setting.measure(setting.train(seed=0), "all").double())
    direct = setting.measure(train_dropped(setting, gt.dropped[2]), "all").double()
    assert torch.equal(gt.targets[2], direct)
    assert gt.changes.abs().sum() > 0
    again = drop_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 5 and torch.equal(again.targets, gt.targets)  # reused
    # lds-half's store is another one
    assert len(list(tmp_path.iterdir())) == 1


def test_lds_on_kept_sets_is_the_spearman_of_predicted_and_actual_drop_effects(tmp_path):
    setting = Blobs()
    gt = drop_ground_truth(setting, DropSpec(fraction=0.1, m=6), cache_dir=tmp_path, progress=False)
    scores = torch.randn(gt.targets.shape[1], setting.n_train, dtype=torch.float64)
    predicted = -(gt.dropped.double() @ scores.T)  # dropping removes the examples' scores
    expected = spearman_batched(predicted, gt.changes, dim=0)
    torch.testing.assert_close(lds(scores, gt.subsets, gt.targets).per_query, expected)


def test_settings_without_a_replay_recipe_are_refused(tmp_path):
    setting = get_setting("digits-lr", size="small")
    with pytest.raises(ConfigError, match="setting 'digits-lr' records no replay recipe"):
        drop_ground_truth(setting, DropSpec(fraction=0.05), cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # refused before any store is written


def test_workers_share_the_result(tmp_path):
    setting = Blobs()
    spec = DropSpec(fraction=0.1, m=3)
    one = drop_ground_truth(setting, spec, cache_dir=tmp_path / "a", progress=False)
    two = drop_ground_truth(setting, spec, cache_dir=tmp_path / "b", workers=2, progress=False)
    assert torch.equal(one.targets, two.targets) and torch.equal(one.full, two.full)
