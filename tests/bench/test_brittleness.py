"""Removal ground truth: flips counted against direct retraining, cached, shared sets."""

import pytest
import torch

import datatrace.bench.cache as cache
from datatrace import ConfigError
from datatrace.bench.brittleness import correct_queries, removal_brittleness
from datatrace.metrics import top_proponents
from tests.bench.test_cache import Blobs


def test_removal_matches_direct_retraining_and_is_cached(tmp_path, monkeypatch):
    setting = Blobs(gap=1.0)  # overlapping blobs: small removals can flip predictions
    model = setting.train(seed=0)
    queries = correct_queries(setting, model, 3)
    margins = setting.measure(model, "all")
    assert len(queries) == 3 and bool((margins[queries] > 0).all())
    assert bool((queries >= setting.n_val).all())  # test queries only
    n_all = setting.n_val + setting.n_test
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.randn(n_all, setting.n_train, generator=g)}
    values["b"] = values["a"].clone()  # same ranking: shares every retraining
    calls = {"n": 0}
    real = cache._retrain
    monkeypatch.setattr(
        cache, "_retrain", lambda *a: (calls.__setitem__("n", calls["n"] + 1), real(*a))[1]
    )
    ks = [2, 8]
    curves = removal_brittleness(setting, values, queries, ks, cache_dir=tmp_path, progress=False)
    assert calls["n"] == len(queries) * len(ks)  # "b" reused "a"'s retrainings
    top = top_proponents(values["a"][queries], max(ks))
    for j, k in enumerate(ks):
        for row, q in enumerate(queries.tolist()):
            keep = [i for i in range(setting.n_train) if i not in set(top[row, :k].tolist())]
            retrained = setting.measure(setting.train(keep, seed=0), "all")
            assert bool(curves["a"].flipped[j, row]) == bool(retrained[q] <= 0)
    assert torch.equal(curves["a"].flipped, curves["b"].flipped)
    assert curves["a"].query_ids.tolist() == queries.tolist()
    removal_brittleness(setting, values, queries, ks, cache_dir=tmp_path, progress=False)
    assert calls["n"] == len(queries) * len(ks)  # second run: all cached


def test_removal_bad_input(tmp_path):
    setting = Blobs()
    values = {"a": torch.zeros(setting.n_val + setting.n_test, setting.n_train)}
    with pytest.raises(ConfigError, match="strictly increasing"):
        removal_brittleness(setting, values, torch.tensor([5]), [4, 2], cache_dir=tmp_path)
