"""Ground-truth cache: reuse, invalidation on a changed recipe, resume after a kill."""

from dataclasses import dataclass

import pytest
import torch

import datatrace.bench.cache as cache
from datatrace import ConfigError
from datatrace.bench.cache import GroundTruthSpec, lds_ground_truth
from datatrace.bench.settings import register_setting
from tests.bench.blobs import BlobsBase


@register_setting
@dataclass(frozen=True, kw_only=True)
class Blobs(BlobsBase):
    """Two Gaussian blobs in 2-D (test setting)."""

    name: str = "test-blobs"
    n_train: int = 24
    n_val: int = 4
    n_test: int = 6
    epochs: int = 5
    gap: float = 3.0


def _count_calls(monkeypatch):
    calls = {"n": 0}
    real = cache._retrain

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(cache, "_retrain", counted)
    return calls


def test_cache_reuses_and_resumes(tmp_path, monkeypatch):
    setting = Blobs()
    spec = GroundTruthSpec(m=4, seeds=2)
    calls = _count_calls(monkeypatch)
    first = lds_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 8 and first.targets.shape == (4, 10)
    second = lds_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 8  # reused: no retraining
    assert torch.equal(first.per_seed, second.per_seed)
    # targets equal a direct retraining
    subset = first.subsets[1].nonzero().squeeze(1)
    direct = setting.measure(setting.train(subset, seed=1 * 2 + 0), "all").double()
    torch.testing.assert_close(first.per_seed[1, 0], direct)

    # a changed recipe gets its own ground truth
    lds_ground_truth(Blobs(gap=4.0), spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 16

    # a killed generation resumes from the last complete subset
    real = cache._retrain
    state = {"n": 0}

    def dying(*args):
        state["n"] += 1
        if state["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache, "_retrain", dying)
    killed_spec = GroundTruthSpec(m=3, seeds=2)
    with pytest.raises(KeyboardInterrupt):
        lds_ground_truth(setting, killed_spec, cache_dir=tmp_path, progress=False)
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(
        cache, "_retrain", lambda *a: (calls.__setitem__("n", calls["n"] + 1), real(*a))[1]
    )
    resumed = lds_ground_truth(setting, killed_spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 3  # 6 jobs, 3 finished before the kill
    fresh = lds_ground_truth(setting, killed_spec, cache_dir=tmp_path / "fresh", progress=False)
    assert torch.equal(resumed.per_seed, fresh.per_seed)


def test_parallel_workers_match_serial(tmp_path):
    setting = Blobs()
    spec = GroundTruthSpec(m=3, seeds=1)
    serial = lds_ground_truth(setting, spec, cache_dir=tmp_path / "a", workers=1, progress=False)
    parallel = lds_ground_truth(setting, spec, cache_dir=tmp_path / "b", workers=2, progress=False)
    torch.testing.assert_close(serial.per_seed, parallel.per_seed, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"m": 1}, "m .* >= 2"), ({"alpha": 1.5}, "alpha"), ({"seeds": 0}, "seeds")],
)
def test_bad_protocol(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GroundTruthSpec(**kwargs)
