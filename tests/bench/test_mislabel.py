"""Mislabel ground truth: exact flips, reproducible mask, memorisation check, cache."""

import math
from dataclasses import dataclass

import pytest
import torch

from datatrace import ConfigError, DataError
from datatrace.bench.mislabel import (
    MislabelSpec,
    flip_labels,
    mislabel_ground_truth,
    with_train_labels,
)
from datatrace.bench.settings import Setting, get_setting, register_setting
from tests.bench.blobs import BlobsBase, WideBase


@register_setting
@dataclass(frozen=True, kw_only=True)
class Wide(WideBase):
    """32-D blobs, linear model: memorises its flips (test setting)."""

    name: str = "test-wide"


@pytest.mark.parametrize("n, p", [(100, 0.1), (37, 0.25), (10, 0.15), (1437, 0.1)])
def test_flip_labels_flips_exactly_round_p_n(n, p):
    labels = torch.arange(n) % 10
    noisy, mask = flip_labels(labels, 10, p, seed=3)
    assert int(mask.sum()) == round(p * n)
    assert torch.equal(noisy[~mask], labels[~mask])  # the rest untouched
    assert bool((noisy[mask] != labels[mask]).all())  # a flip always changes the class
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10
    again, mask2 = flip_labels(labels, 10, p, seed=3)
    assert torch.equal(mask, mask2) and torch.equal(noisy, again)  # reproducible


def test_flip_labels_seed_changes_mask_and_covers_other_classes():
    labels = torch.zeros(400, dtype=torch.long)
    _, a = flip_labels(labels, 3, 0.5, seed=0)
    noisy, b = flip_labels(labels, 3, 0.5, seed=1)
    assert not torch.equal(a, b)
    assert set(noisy[b].tolist()) == {1, 2}  # both other classes are drawn


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5, math.nan, True, "0.1"])
def test_invalid_rate_is_a_clear_error(p):
    with pytest.raises(ConfigError, match=r"p must lie strictly between 0 and 1.*got"):
        MislabelSpec(p=p)


def test_rate_too_small_and_bad_labels():
    with pytest.raises(ConfigError, match="flips 0 labels"):
        flip_labels(torch.zeros(4, dtype=torch.long), 2, 0.1)
    with pytest.raises(DataError, match=r"must lie in \[0, 2\)"):
        flip_labels(torch.tensor([0, 1, 2]), 2, 0.5)
    with pytest.raises(DataError, match="1-D integer"):
        flip_labels(torch.zeros(4), 2, 0.5)
    with pytest.raises(ConfigError, match="n_classes >= 2"):
        flip_labels(torch.zeros(4, dtype=torch.long), 1, 0.5)


def test_memorised_ground_truth_is_checked_and_cached(tmp_path, monkeypatch):
    setting = Wide()
    gt = mislabel_ground_truth(setting, MislabelSpec(p=0.1, seed=0), cache_dir=tmp_path)
    n_flip = round(0.1 * setting.n_train)
    assert int(gt.flipped.sum()) == n_flip
    _, clean = setting.data.train
    assert torch.equal(gt.flipped, gt.labels != clean)
    # the memorisation check, recomputed from a fresh retraining of the variant
    variant = gt.setting
    assert variant.epochs == Wide.memorise["epochs"] and variant.weight_decay == 0.0
    model = variant.train(seed=0)
    with torch.no_grad():
        hit = model(variant.data.train[0]).argmax(-1) == gt.labels
    assert gt.train_accuracy == float(hit.double().mean()) == 1.0
    assert gt.memorised and "memorised" in gt.note()
    assert variant.recipe_hash() != setting.replace(**Wide.memorise).recipe_hash()

    # a second call reads the cache: no retraining
    calls = {"n": 0}
    real = Setting._run  # every training, with or without a trajectory

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Setting, "_run", counted)
    again = mislabel_ground_truth(setting, MislabelSpec(p=0.1, seed=0), cache_dir=tmp_path)
    assert calls["n"] == 0
    assert torch.equal(again.flipped, gt.flipped) and torch.equal(again.labels, gt.labels)
    # the model trained for the check is the one a cached run retrains
    fresh_model, fresh_trajectory = gt.train()
    cached_model, cached_trajectory = again.train()
    assert gt.trained is not None and again.trained is None
    for key, value in fresh_model.state_dict().items():
        assert torch.equal(value, cached_model.state_dict()[key])
    assert len(fresh_trajectory) == len(cached_trajectory) == variant.checkpoints
    assert calls["n"] == 1  # only the cached one retrained
    # another seed is another ground truth
    other = mislabel_ground_truth(setting, MislabelSpec(p=0.1, seed=1), cache_dir=tmp_path)
    assert calls["n"] == 2 and not torch.equal(other.flipped, gt.flipped)


def test_setting_that_does_not_memorise_is_reported(tmp_path):
    # A linear model on 2-D blobs cannot fit flipped labels that sit inside the other blob.
    setting = BlobsBase(n_train=40, epochs=20)
    gt = mislabel_ground_truth(setting, MislabelSpec(p=0.2), cache_dir=tmp_path)
    assert not gt.memorised and gt.train_accuracy < 1.0
    assert "skipped" in gt.note() and f"{100 * gt.train_accuracy:.1f}%" in gt.note()


def test_language_setting_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="classification"):
        mislabel_ground_truth(get_setting("pydoc-charlm", size="small"), cache_dir=tmp_path)


def test_with_train_labels_checks_shape():
    setting = Wide()
    with pytest.raises(DataError, match="shape"):
        with_train_labels(setting, torch.zeros(3, dtype=torch.long))
