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


def test_loo_ground_truth_matches_retraining_and_is_cached(tmp_path, monkeypatch):
    from datatrace.bench.cache import LOOSpec, loo_ground_truth

    setting = Blobs()
    spec = LOOSpec(n_points=3, seed=1)
    calls = _count_calls(monkeypatch)
    loo = loo_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 4  # the full model and 3 leave-one-out models
    assert torch.equal(loo.indices, spec.indices(setting.n_train))
    assert loo.effects.shape == (3, setting.n_val + setting.n_test)
    # effects are full - without, recomputed here from direct retrainings
    full = setting.measure(setting.train(seed=0), "all").double()
    i = int(loo.indices[1])
    kept = [j for j in range(setting.n_train) if j != i]
    without = setting.measure(setting.train(kept, seed=0), "all").double()
    torch.testing.assert_close(loo.full, full)
    torch.testing.assert_close(loo.effects[1], full - without)

    again = loo_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 4 and torch.equal(again.effects, loo.effects)  # reused
    loo_ground_truth(Blobs(gap=4.0), spec, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 8  # a changed recipe invalidates it
    loo_ground_truth(setting, LOOSpec(n_points=3, seed=2), cache_dir=tmp_path, progress=False)
    assert calls["n"] == 12  # so does another sample


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_points": 1}, "n_points"), ({"n_points": 2.5}, "n_points"), ({"seed": -1}, "seed")],
)
def test_bad_loo_spec(kwargs, match):
    from datatrace.bench.cache import LOOSpec

    with pytest.raises(ConfigError, match=match):
        LOOSpec(**kwargs)
    assert LOOSpec(n_points=6).indices(5).tolist() == [0, 1, 2, 3, 4]  # at most every unit


def test_shipped_ground_truth_fills_a_fresh_cache(tmp_path, monkeypatch):
    import numpy as np

    import datatrace.bench.shipped as shipped
    from datatrace import DataError

    setting = Blobs()
    spec = GroundTruthSpec(m=3, seeds=2)
    built = lds_ground_truth(setting, spec, cache_dir=tmp_path / "a", progress=False)
    path = shipped.export_ground_truth(setting, spec, tmp_path / "ship", tmp_path / "a")
    assert path.name.startswith(f"test-blobs-{setting.recipe_hash()}-lds-")
    monkeypatch.setattr(shipped, "shipped_dir", lambda: tmp_path / "ship")
    calls = _count_calls(monkeypatch)
    fresh = lds_ground_truth(setting, spec, cache_dir=tmp_path / "b", progress=False)
    assert calls["n"] == 0 and torch.equal(fresh.per_seed, built.per_seed)
    # another recipe has another file name: it retrains
    lds_ground_truth(Blobs(gap=4.0), spec, cache_dir=tmp_path / "c", progress=False)
    assert calls["n"] == 6
    # an archive whose content does not match its name is refused
    with np.load(path) as archive:
        parts = dict(archive)
    parts["recipe_hash"] = np.array("0" * 16)
    np.savez_compressed(path, **parts)
    with pytest.raises(DataError, match="built for recipe 0000"):
        lds_ground_truth(setting, spec, cache_dir=tmp_path / "d", progress=False)


def test_verify_passes_on_real_and_fails_on_tampered_cache(tmp_path, capsys):
    from datatrace.bench.shipped import verify_ground_truth
    from datatrace.cli import main
    from datatrace.store import Store

    setting = Blobs()
    spec = GroundTruthSpec(m=3, seeds=2)
    lds_ground_truth(setting, spec, cache_dir=tmp_path, progress=False)
    ok = verify_ground_truth(setting, spec, cache_dir=tmp_path, n_subsets=2)
    assert ok.ok and ok.checked == [(0, 0), (1, 0)] and ok.max_abs_diff == 0.0
    argv = ["groundtruth", "--setting", "test-blobs", "--m", "3", "--seeds", "2"]
    argv += ["--cache", str(tmp_path), "--verify", "--verify-subsets", "2", "--quiet"]
    assert main(argv) == 0 and ": match" in capsys.readouterr().out

    store = Store(
        next(tmp_path.glob("test-blobs-*-lds-*")),
        config={"setting": setting.to_json(), "spec": spec.__dict__},
        fingerprints={"recipe": setting.recipe_hash()},
    )
    tampered = store.read_shard("seed0", 1, mmap=False).clone()
    tampered[2] += 1e-2
    store.write_shard("seed0", 1, tampered)
    bad = verify_ground_truth(setting, spec, cache_dir=tmp_path, n_subsets=2)
    assert not bad.ok and bad.max_abs_diff == pytest.approx(1e-2, rel=1e-6)
    assert main(argv) == 1 and "MISMATCH" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="n_subsets"):
        verify_ground_truth(setting, spec, cache_dir=tmp_path, n_subsets=4)


def test_shipped_default_ground_truth_is_current_and_verifies(tmp_path):
    from datatrace.bench.settings import get_setting
    from datatrace.bench.shipped import DEFAULT_SETTING, shipped_file, verify_ground_truth

    setting = get_setting(DEFAULT_SETTING)
    spec = GroundTruthSpec()  # the defaults of `datatrace bench`
    assert shipped_file(setting, spec) is not None, (
        "the shipped ground truth does not match the digits-mlp recipe hash; regenerate it "
        "with `python -m datatrace.bench.shipped`"
    )
    result = verify_ground_truth(setting, spec, cache_dir=tmp_path, n_subsets=1)
    assert result.ok, result  # within the stated tolerance (bitwise equal on the build machine)
