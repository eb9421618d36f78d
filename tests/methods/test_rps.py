"""Representer points through the store, like every other method (issue 17).

rps's per-train-set work is a refit of the last layer on the whole training set: its arrays
(weight, α, the final-layer inputs and label selectors) go through ``Store.cached`` and its
train features into the loop's shards, so a second fit reads both, a killed fit resumes and
a stale store is refused.
"""

from __future__ import annotations

import json

import pytest
import torch

from datatrace import Task, make_attributor
from datatrace.errors import StoreError
from datatrace.methods.rps import RepresenterAttributor
from datatrace.store import Store
from tests.models import classification_data, mlp

TRAIN, QUERIES = classification_data(n=12), classification_data(n=5, seed=7)
GROUPS = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 3])


def build(model_seed: int = 0, **extra) -> RepresenterAttributor:
    attr = make_attributor("rps", Task(mlp(seed=model_seed)), batch_size=4, **extra)
    assert isinstance(attr, RepresenterAttributor)
    return attr


def arrays(path) -> list[str]:
    return sorted(json.loads((path / "manifest.json").read_text())["arrays"])


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["examples", "groups"])
def test_store_holds_the_refit_and_the_features_and_scores_as_in_memory(tmp_path, groups):
    plain = build(groups=groups).fit(TRAIN)
    stored = build(groups=groups, store=tmp_path, shard_bytes=1).fit(TRAIN)
    names = arrays(tmp_path)
    assert [n.rsplit("-", 1)[1] for n in names] == ["alpha", "feats", "selectors", "weight"]
    assert all(n.startswith("rps-m0-") for n in names)
    # a shard per example; groups come in chunks of batch_size (4) groups: all 4 in one
    shards = 12 if groups is None else 1
    assert len(list(tmp_path.glob("shard-train-m0-*.npy"))) == shards
    for got, want in (
        (stored.attribute(QUERIES).values, plain.attribute(QUERIES).values),
        (stored.self_attribute(), plain.self_attribute()),
        (stored.refit_preactivations(QUERIES), plain.refit_preactivations(QUERIES)),
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_second_fit_reads_the_refit_and_every_shard(tmp_path, monkeypatch):
    first = build(store=tmp_path, shard_bytes=1).fit(TRAIN).attribute(QUERIES).values
    mtimes = {f.name: f.stat().st_mtime_ns for f in tmp_path.glob("*.npy")}

    def no_refit(self, ctx):
        raise AssertionError("refit although the store holds it")

    def no_features(self, ctx, offset, batch):
        raise AssertionError("featurized although the store holds every shard")

    monkeypatch.setattr(RepresenterAttributor, "_refit", no_refit)
    monkeypatch.setattr(RepresenterAttributor, "_batch_train_features", no_features)
    again = build(store=tmp_path, shard_bytes=1).fit(TRAIN).attribute(QUERIES).values
    assert torch.equal(again, first)
    assert {f.name: f.stat().st_mtime_ns for f in tmp_path.glob("*.npy")} == mtimes


def test_fit_killed_between_refit_arrays_refits_on_resume(tmp_path, monkeypatch):
    ref = build().fit(TRAIN).attribute(QUERIES).values
    write_array, written = Store.write_array, []

    def dying(self, name, tensor):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        write_array(self, name, tensor)
        written.append(name)

    monkeypatch.setattr(Store, "write_array", dying)
    with pytest.raises(KeyboardInterrupt):
        build(store=tmp_path).fit(TRAIN)
    assert len(arrays(tmp_path)) == 2 and not list(tmp_path.glob("shard-*.npy"))
    monkeypatch.setattr(Store, "write_array", write_array)
    refits = []
    refit = RepresenterAttributor._refit
    monkeypatch.setattr(
        RepresenterAttributor, "_refit", lambda self, ctx: refits.append(1) or refit(self, ctx)
    )
    resumed = build(store=tmp_path).fit(TRAIN).attribute(QUERIES).values
    assert refits == [1] and len(arrays(tmp_path)) == 4
    torch.testing.assert_close(resumed, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"model_seed": 3}, "fingerprints.member0"),
        ({"damping": 0.5}, "config.config.damping"),
        ({"layer": "0"}, "config.config.layer"),
    ],
    ids=["weights", "damping", "layer"],
)
def test_stale_store_is_refused_and_overwrite_refits(tmp_path, change, key):
    build(store=tmp_path).fit(TRAIN)
    with pytest.raises(StoreError, match="different job") as info:
        build(store=tmp_path, **change).fit(TRAIN)
    assert key in str(info.value)
    if "layer" in change:  # layer "0" is not the final layer: refused by the refit itself
        return
    fresh = build(**change).fit(TRAIN).attribute(QUERIES).values
    again = build(store=tmp_path, overwrite=True, **change).fit(TRAIN).attribute(QUERIES).values
    torch.testing.assert_close(again, fresh, rtol=1e-10, atol=1e-12)
