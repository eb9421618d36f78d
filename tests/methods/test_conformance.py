"""One conformance suite over every registered method (STYLE.md "Tests")."""

import json
import pickle

import pytest
import torch

from datatrace import METHODS, Checkpoint, NotFittedError, Task, make_attributor
from datatrace.errors import ConfigError, StoreError
from datatrace.methods.base import Attributor
from tests.models import classification_data, mlp

# Settings that make each method fast and exact enough on a tiny float64 model.
OPTIONS: dict[str, dict] = {
    "trak": {"proj_dim": 16},
    "influence": {"damping": 1e-2},
    "if-explicit": {"damping": 1e-2},
    "if-cg": {"damping": 1e-2},
    "if-lissa": {"damping": 0.5, "solver_options": {"depth": 300}},
    "if-arnoldi": {"damping": 1e-2, "solver_options": {"rank": 20}},
    "if-datainf": {"damping": 1e-2},
    "if-kfac": {"damping": 1e-2},
    "if-ekfac": {"damping": 1e-2},
    # no trajectory in this suite: one segment at the final weights with summed lr 10
    "source": {"horizon": 10.0},
    "logra": {"proj_dim_in": 4, "proj_dim_out": 3, "damping": 1e-2},
}
# A method that replays the recorded training run (``replays_training``: ``unrolled``) cannot
# be built from a bare Task, which has no run to replay: its own suite
# (tests/methods/test_unrolled.py) runs these checks on a recorded run.
IDS = sorted(m for m in METHODS if not METHODS[m][0].replays_training)
REPLAY_IDS = sorted(m for m in METHODS if METHODS[m][0].replays_training)


def build(method_id: str, task: Task | None = None, **extra) -> Attributor:
    task = task or Task(mlp(), target=METHODS[method_id][0].target_kind)
    return make_attributor(method_id, task, **{**OPTIONS.get(method_id, {}), **extra})


@pytest.fixture(scope="module")
def data():
    return classification_data(n=12), classification_data(n=5, seed=7)


def test_every_design_method_id_is_registered():
    expected = {
        "grad-dot",
        "grad-cos",
        "tracin",
        "if-explicit",
        "if-cg",
        "if-lissa",
        "if-arnoldi",
        "if-datainf",
        "if-kfac",
        "if-ekfac",
        "trak",
        "rps",
        "source",
        "logra",
    }
    assert expected <= set(METHODS)


@pytest.mark.parametrize("method_id", REPLAY_IDS)
def test_replaying_methods_refuse_a_task_without_a_run_and_have_their_own_suite(method_id):
    from pathlib import Path

    with pytest.raises(ConfigError, match="recipe="):
        build(method_id)
    assert (Path(__file__).parent / f"test_{method_id}.py").exists()


@pytest.mark.parametrize("method_id", IDS)
def test_shape_ids_and_determinism(method_id, data):
    train, queries = data
    s1 = build(method_id).fit(train).attribute(queries)
    s2 = build(method_id).fit(train).attribute(queries)
    assert s1.shape == (5, 12)
    assert torch.equal(s1.unit_ids, torch.arange(12)) and torch.equal(s1.query_ids, torch.arange(5))
    assert s1.method == method_id
    assert torch.isfinite(s1.values).all()
    assert torch.equal(s1.values, s2.values)


@pytest.mark.parametrize("method_id", IDS)
def test_sign_self_scores_positive_and_match_diagonal(method_id, data):
    train, _ = data
    attr = build(method_id).fit(train)
    diag = attr.attribute(train).values.diagonal()
    self_scores = attr.self_attribute()
    assert self_scores.shape == (12,)
    # A training example is a proponent of itself (positive definite curvature/kernels).
    assert (self_scores > 0).all(), self_scores
    torch.testing.assert_close(diag, self_scores, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("method_id", IDS)
def test_batch_size_invariance(method_id, data):
    train, queries = data
    a = build(method_id, batch_size=3).fit(train).attribute(queries).values
    b = build(method_id, batch_size=7).fit(train).attribute(queries).values
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method_id", IDS)
def test_not_fitted(method_id, data):
    with pytest.raises(NotFittedError):
        build(method_id).attribute(data[1])


@pytest.mark.parametrize("method_id", IDS)
def test_store_resume_after_kill(method_id, data, tmp_path, monkeypatch):
    train, queries = data
    ref = build(method_id, batch_size=4).fit(train).attribute(queries).values
    one = {"batch_size": 4, "shard_bytes": 1}  # a shard per example: batch 0 fills 4 of them
    attr = build(method_id, store=tmp_path / "store", **one)
    # the loop's per-batch featurization (rps's rows come from its refit, the others' from
    # _train_features): killed at the second batch
    original = type(attr)._batch_train_features
    calls = {"n": 0}

    def dying(self, ctx, offset, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, ctx, offset, batch)

    monkeypatch.setattr(type(attr), "_batch_train_features", dying)
    with pytest.raises(KeyboardInterrupt):
        attr.fit(train)
    calls["n"] = 10
    resumed = build(method_id, store=tmp_path / "store", **one).fit(train)
    # 3 batches of 4: the first one's shards survived the kill, so 2 are recomputed.
    assert calls["n"] == 12
    torch.testing.assert_close(resumed.attribute(queries).values, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method_id", IDS)
def test_stale_store_advice_overwrite_true_works(method_id, data, tmp_path):
    """The stale-store StoreError says "pass overwrite=True": doing exactly that works."""
    train, queries = data
    build(method_id, batch_size=4, store=tmp_path / "store").fit(train)

    def retrained(**extra):  # other weights: the store's model fingerprint no longer matches
        task = Task(mlp(seed=4), target=METHODS[method_id][0].target_kind)
        return build(method_id, task=task, batch_size=4, **extra)

    with pytest.raises(StoreError, match="pass overwrite=True"):
        retrained(store=tmp_path / "store").fit(train)
    fresh = retrained().fit(train).attribute(queries).values
    got = retrained(store=tmp_path / "store", overwrite=True).fit(train).attribute(queries).values
    torch.testing.assert_close(got, fresh, rtol=1e-10, atol=1e-12)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert "overwrite" not in json.dumps(manifest["config"])  # not a method setting
    # the store now holds the new job: reopened without overwrite=, it is accepted
    again = retrained(store=tmp_path / "store").fit(train).attribute(queries).values
    torch.testing.assert_close(again, fresh, rtol=1e-10, atol=1e-12)


def test_overwrite_needs_a_store_and_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="no store= was given"):
        build("grad-dot", overwrite=True)
    with pytest.raises(ConfigError, match="overwrite must be True or False"):
        build("grad-dot", store=tmp_path / "s", overwrite="yes")


@pytest.mark.parametrize("method_id", IDS)
def test_one_member_equals_plain_method(method_id, data):
    train, queries = data
    other = mlp(seed=4)
    plain = build(method_id, task=Task(other, target=METHODS[method_id][0].target_kind))
    via_members = build(method_id, members=[Checkpoint(other.state_dict())])
    a = plain.fit(train).attribute(queries).values
    b = via_members.fit(train).attribute(queries).values
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def per_example_cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, labels, reduction="none")


@pytest.mark.parametrize("method_id", IDS)
def test_fitted_attributor_pickles_and_scores_the_same(method_id, data, tmp_path):
    """A fitted attributor round-trips through pickle (e.g. to a worker process) unchanged;
    a user's own loss function travels with it when it is importable (not a lambda)."""
    train, queries = data
    attr = build(method_id).fit(train)
    clone = pickle.loads(pickle.dumps(attr))
    assert torch.equal(clone.attribute(queries).values, attr.attribute(queries).values)
    # a custom loss has no predictive distribution to sample labels from: Source's default
    # true Fisher is swapped for the empirical one
    extra = {"fisher": "empirical"} if method_id == "source" else {}
    custom = build(method_id, Task(mlp(), loss=per_example_cross_entropy), **extra).fit(train)
    again = pickle.loads(pickle.dumps(custom))
    assert torch.equal(again.attribute(queries).values, custom.attribute(queries).values)
