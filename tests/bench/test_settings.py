"""Tests of the benchmark settings and their registry, every setting at its small size.

Each registered setting must train to its stated accuracy (loss, for the language model),
deterministically, on exactly the training examples it is given, and work end to end with
an attributor through ``make_task``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from datatrace import GradDotAttributor, Task, TracInAttributor
from datatrace.bench.settings import (
    DigitsCNN,
    DigitsLR,
    DigitsMLP,
    PydocCharLM,
    Setting,
    get_setting,
    list_settings,
    register_setting,
)
from datatrace.bench.settings import registry as settings_registry
from datatrace.errors import ConfigError, DataError, ModelError
from tests.bench.blobs import BlobsBase

BUILTIN = [
    "breast-cancer-mlp",
    "digits-cnn",
    "digits-lr",
    "digits-mlp",
    "digits-mlp-dropout",
    "pydoc-charlm",
]
# Held-out accuracy each small setting must reach (stated in the settings' docstrings).
MIN_ACCURACY = {
    "breast-cancer-mlp": 0.9,
    "digits-cnn": 0.85,
    "digits-lr": 0.9,
    "digits-mlp": 0.85,
    "digits-mlp-dropout": 0.9,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    # oversubscribed threads make these trainings many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[Setting, nn.Module]]:
    """Every built-in setting at its small size, trained once with seed 0."""
    out = {}
    for name in BUILTIN:
        setting = get_setting(name, size="small")
        out[name] = (setting, setting.train(seed=0))
    return out


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings registered by a test disappear after it."""
    monkeypatch.setattr(settings_registry, "_REGISTRY", dict(settings_registry._REGISTRY))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- training: accuracy, determinism, subsets ------------------------------------------------


@pytest.mark.parametrize("name", sorted(MIN_ACCURACY))
def test_classifier_reaches_stated_accuracy(trained, name: str) -> None:
    setting, model = trained[name]
    result = setting.evaluate(model)
    assert result.n == setting.n_val + setting.n_test
    assert result.accuracy > MIN_ACCURACY[name]
    # The target is TRAK's margin, higher is better: negative wherever the prediction is wrong.
    x, y = setting.data.queries("all")
    with torch.no_grad():
        logits = model(x)
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    margins = setting.measure(model, "all")
    torch.testing.assert_close(margins, logits.gather(1, y[:, None]).squeeze(1) - others)
    wrong = logits.argmax(1) != y
    assert wrong.any() and (margins[wrong] < 0).all() and (margins[~wrong] > 0).float().mean() > 0.8


def test_charlm_beats_the_unigram_baseline(trained) -> None:
    setting, model = trained["pydoc-charlm"]
    counts = Counter(setting.data.train["input_ids"].flatten().tolist())
    total = sum(counts.values())
    unigram = -sum(c / total * math.log(c / total) for c in counts.values())
    result = setting.evaluate(model)
    assert result.n == (setting.n_val + setting.n_test) * (setting.chunk_len - 1)
    assert result.loss < unigram - 0.3  # about 2.6 against 3.25 nats per character
    # The target is the summed log-likelihood: its mean per token is minus the loss.
    log_lik = setting.measure(model, "all")
    assert log_lik.shape == (setting.n_val + setting.n_test,) and (log_lik < 0).all()
    assert float(log_lik.sum()) / result.n == pytest.approx(-result.loss, rel=1e-5)


@pytest.mark.parametrize("name", BUILTIN)
def test_training_is_deterministic_in_the_seed(trained, name: str) -> None:
    setting, model = trained[name]
    assert not model.training and not any(m.training for m in model.modules())
    again = get_setting(name, size="small").train(seed=0)  # a fresh instance, fresh data
    assert _same_weights(model, again)
    other = setting.train(seed=1)
    if name == "digits-lr":  # strictly convex: the optimum does not depend on the seed
        assert all(
            torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), other.parameters())
        )
    else:
        assert not _same_weights(model, other)


@pytest.mark.parametrize("name", BUILTIN)
def test_training_on_a_subset_reads_only_those_examples(name: str) -> None:
    setting = get_setting(name, size="small")
    n = setting.n_train
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:48]
    before = setting.train(subset, seed=3)
    # Scramble every training example outside the subset: training must not notice.
    outside = torch.ones(n, dtype=torch.bool)
    outside[subset] = False
    train = setting.data.train
    tensors = list(train.values()) if isinstance(train, dict) else list(train)
    for t in tensors:
        t[outside] = t[outside].flip(0).roll(1, dims=-1)
    after = setting.train(subset, seed=3)
    assert _same_weights(before, after)
    # Order does not matter, a boolean mask means the same subset, and the full set differs.
    mask = ~outside
    assert _same_weights(before, setting.train(subset.flip(0), seed=3))
    assert _same_weights(before, setting.train(mask, seed=3))


@pytest.mark.parametrize("name", ["digits-lr", "digits-mlp"])
def test_a_model_trained_without_a_class_never_predicts_it(name: str) -> None:
    setting = get_setting(name, size="small")
    y = setting.data.train[1]
    full = setting.train(seed=0)
    without = setting.train(torch.nonzero(y != 1).squeeze(1), seed=0)
    xq, _ = setting.data.queries("all")
    with torch.no_grad():
        assert (full(xq).argmax(1) == 1).any()
        assert not (without(xq).argmax(1) == 1).any()


def test_bad_indices_are_refused() -> None:
    setting = DigitsLR(size="small")
    with pytest.raises(DataError, match=r"\[0, n_train=300\)"):
        setting.train([0, 300])
    with pytest.raises(DataError, match="1-D tensor of ints"):
        setting.train(torch.tensor([0.5, 1.0]))
    with pytest.raises(DataError, match="no training example"):
        setting.train(torch.tensor([], dtype=torch.long))
    with pytest.raises(DataError, match=r"shape \(300,\)"):
        setting.train(torch.ones(10, dtype=torch.bool))


@pytest.mark.parametrize("name", ["digits-mlp", "pydoc-charlm"])
def test_trajectory_ends_at_the_trained_model(trained, name: str) -> None:
    setting, model = trained[name]
    final, trajectory = setting.replace(checkpoints=3).train_trajectory(seed=0)
    assert _same_weights(final, model)  # recording does not change training
    assert len(trajectory) == 3
    steps = [c.step for c in trajectory]
    assert steps == sorted(set(steps)) and steps[-1] == setting.epochs * math.ceil(
        setting.n_train / setting.batch_size
    )
    assert all(c.learning_rate > 0 for c in trajectory)
    last = trajectory[-1].load()
    assert all(torch.equal(last[k], v) for k, v in final.state_dict().items())
    if name == "pydoc-charlm":  # cosine decay: the rate falls along the run
        assert trajectory[0].learning_rate > trajectory[-1].learning_rate
        assert trajectory[0].optimizer == "adamw"
    else:  # the trajectory feeds TracIn through make_task
        task = setting.make_task(final, checkpoints=trajectory)
        scores = TracInAttributor(task).fit(setting.data.train).attribute(setting.data.val_queries)
        assert scores.values.shape == (setting.n_val, setting.n_train)


def test_digits_lr_converges_to_the_stationary_point(trained) -> None:
    setting, model = trained["digits-lr"]
    x, y = setting.data.train
    params = list(model.parameters())
    objective = nn.functional.cross_entropy(model(x), y) + 0.5 * setting.weight_decay * sum(
        (p**2).sum() for p in params
    )
    grads = torch.autograd.grad(objective, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    assert model.weight.dtype == torch.float64
    _, trajectory = setting.train_trajectory()
    assert len(trajectory) == 1 and trajectory[0].optimizer == "lbfgs"


# --- attribution end to end ------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_make_task_runs_an_attributor(trained, name: str) -> None:
    setting, model = trained[name]
    task = setting.make_task(model)
    assert (task.loss_name, task.target.name) == (setting.loss, setting.target)
    queries = setting.data.test_queries
    scores = (
        GradDotAttributor(task, projector="sjlt", proj_dim=64)
        .fit(setting.data.train)
        .attribute(queries)
    )
    assert scores.values.shape == (setting.n_test, setting.n_train)
    assert torch.isfinite(scores.values).all() and scores.values.abs().sum() > 0


def test_charlm_task_takes_dict_batches_with_or_without_labels(trained) -> None:
    setting, model = trained["pydoc-charlm"]
    queries = setting.data.val_queries
    task = Task(model, loss="lm", target="log_prob")
    attributor = GradDotAttributor(task).fit(setting.data.train)
    with_labels = attributor.attribute(queries).values
    ids_only = attributor.attribute({"input_ids": queries["input_ids"]}).values
    torch.testing.assert_close(with_labels, ids_only)


def test_measure_refuses_a_model_in_train_mode(trained) -> None:
    setting, model = trained["digits-mlp"]
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    torch.testing.assert_close(setting.measure(model), setting.measure(model))  # no dropout
    fresh = setting.build_model(seed=0)  # train mode, as built
    with pytest.raises(ModelError, match="train mode"):
        setting.measure(fresh)


# --- the models and data ---------------------------------------------------------------------


def test_digits_cnn_sees_images() -> None:
    setting = DigitsCNN(size="small")
    x, _ = setting.data.train
    assert x.shape == (setting.n_train, 1, 8, 8)
    assert any(isinstance(m, nn.Conv2d) for m in setting.build_model().modules())


def test_charlm_is_causal_with_linear_attention_projections() -> None:
    setting = PydocCharLM(size="small")
    model = setting.build_model(seed=0).eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"q", "k", "v", "o"} <= linear
    ids = setting.data.train["input_ids"][:4]
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % len(setting.vocab)
    with torch.no_grad():
        logits = model(ids)
        assert torch.equal(logits[:, :20], model(changed)[:, :20])  # no look-ahead
        assert not torch.equal(logits[:, 20:], model(changed)[:, 20:])
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)), logits)
    text = setting.decode(ids[0])
    assert len(text) == setting.chunk_len and torch.equal(setting.encode(text), ids[0])
    with pytest.raises(DataError, match="not in the pydoc vocabulary"):
        setting.encode("\x00")


def test_queries_are_held_out() -> None:
    setting = PydocCharLM(size="small")
    train = {tuple(r) for r in setting.data.train["input_ids"].tolist()}
    held = setting.data.queries("all")["input_ids"].tolist()
    assert len(held) == setting.n_val + setting.n_test
    assert not any(tuple(r) in train for r in held)
    digits = DigitsLR(size="small")
    xs = {tuple(r) for r in digits.data.train[0].tolist()}
    xq = digits.data.queries("all")[0].tolist()
    assert sum(tuple(r) in xs for r in xq) <= 2  # digits holds a few exact duplicate images


# --- identity: JSON, hash, replace -----------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_json_round_trip_and_recipe_hash(name: str) -> None:
    setting = get_setting(name, size="small")
    restored = Setting.from_json(json.loads(json.dumps(setting.to_json())))
    assert restored == setting and type(restored) is type(setting)
    assert type(setting).from_json(setting.to_json()) == setting
    # Pickled settings (for worker processes) travel as their fields, without built data.
    _ = setting.data
    state = setting.__getstate__()
    assert set(state) == {f.name for f in dataclasses.fields(setting)}
    assert pickle.loads(pickle.dumps(setting)) == setting
    key = setting.recipe_hash()
    assert len(key) == 16 and restored.recipe_hash() == key
    # Fields outside the recipe leave the hash alone; recipe fields and the data change it.
    assert setting.replace(description="x", checkpoints=2).recipe_hash() == key
    change = {"weight_decay": 1e-2} if name == "digits-lr" else {"epochs": 3}
    assert setting.replace(**change).recipe_hash() != key
    assert setting.replace(n_test=setting.n_test - 1).recipe_hash() != key
    assert setting.replace(split_seed=1).recipe_hash() != key


def test_recipe_hash_follows_every_recipe_field() -> None:
    base = DigitsLR(size="small")
    key = base.recipe_hash()
    for change in ({"weight_decay": 1e-2}, {"max_iter": 50}, {"dtype": "float32"}):
        assert base.replace(**change).recipe_hash() != key, change
    mlp = DigitsMLP(size="small")
    for change in ({"dropout": 0.2}, {"hidden": (32,)}, {"lr": 1e-3}, {"batch_size": 32}):
        assert mlp.replace(**change).recipe_hash() != mlp.recipe_hash(), change


def test_size_presets_and_replace() -> None:
    full = get_setting("digits-mlp")
    assert (full.size, full.n_train, full.epochs) == ("full", 1437, 30)
    small = full.replace(size="small")
    assert small == get_setting("digits-mlp", size="small")
    assert (small.n_train, small.epochs) == (300, 20)
    # An explicit value survives a change of size; one left at the preset follows it.
    custom = get_setting("digits-mlp", epochs=7).replace(size="small")
    assert (custom.n_train, custom.epochs) == (300, 7)
    assert small.replace(size="full") == full


# --- registry and validation -----------------------------------------------------------------


def test_registry_lists_the_builtin_settings() -> None:
    assert set(BUILTIN) <= set(list_settings())
    assert list_settings() == sorted(list_settings())
    for name in BUILTIN:
        setting = get_setting(name)
        assert setting.name == name and setting.size == "full" and setting.description


def test_unknown_names_and_fields_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'digits-svm'.*'digits-lr'"):
        get_setting("digits-svm")
    with pytest.raises(ConfigError, match=r"no field\(s\) \['epoch'\].*'epochs'"):
        get_setting("digits-mlp", epoch=3)
    with pytest.raises(ConfigError, match="valid fields"):
        Setting.from_json({"name": "digits-lr", "momentum": 0.9})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DigitsMLP(size="huge"), "size must be one of"),
        (lambda: DigitsMLP(dropout=1.0), "dropout must be a probability"),
        (lambda: DigitsMLP(n_train=5000), "at most 1437"),
        (lambda: DigitsLR(n_val=200, n_test=200), "at most 360"),
        (lambda: DigitsLR(weight_decay=0.0), "weight_decay must be a finite number > 0"),
        (lambda: DigitsCNN(channels=(8,)), "channels must be two ints"),
        (lambda: DigitsMLP(epochs=-1), "epochs must be an integer >= 1"),
        (lambda: DigitsMLP(dtype="float16"), "dtype must be"),
        (lambda: PydocCharLM(d_model=30, n_heads=4), "multiple of n_heads"),
        (lambda: get_setting("breast-cancer-mlp", lr=float("nan")), "lr must be a finite"),
    ],
)
def test_invalid_fields_fail_at_construction(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_charlm_refuses_more_chunks_than_the_corpus_has() -> None:
    setting = PydocCharLM(size="small", chunk_len=4096, n_train=200)
    with pytest.raises(ConfigError, match="corpus has only"):
        _ = setting.data


@dataclass(frozen=True, kw_only=True)
class _Blobs(BlobsBase):
    """Two Gaussian blobs in 2-D, ``gap`` apart."""

    name: str = "test-settings-blobs"


def test_a_user_setting_registers_and_round_trips(registry) -> None:
    assert register_setting(_Blobs) is _Blobs
    assert "test-settings-blobs" in list_settings()
    blobs = get_setting("test-settings-blobs", gap=6.0)
    assert isinstance(blobs, _Blobs) and blobs.gap == 6.0
    assert blobs.evaluate(blobs.train(seed=0)).accuracy > 0.9
    assert Setting.from_json(blobs.to_json()) == blobs
    register_setting(_Blobs)  # registering the same class again is harmless
    # A prepared instance and a factory function register under their own names.
    register_setting(_Blobs(name="test-settings-blobs-close", gap=0.5))
    assert get_setting("test-settings-blobs-close", epochs=3) == _Blobs(
        name="test-settings-blobs-close", gap=0.5, epochs=3
    )
    register_setting(lambda **kw: _Blobs(**{"name": "test-settings-blobs-fn", **kw}))
    assert get_setting("test-settings-blobs-fn", gap=2.0).gap == 2.0
    with pytest.raises(ConfigError, match="already registered"):  # another function
        register_setting(lambda **kw: _Blobs(**{"name": "test-settings-blobs-fn", **kw}))


def test_registering_a_taken_name_needs_overwrite(registry) -> None:
    clash = _Blobs(name="digits-lr")
    with pytest.raises(ConfigError, match="'digits-lr' is already registered"):
        register_setting(clash)
    register_setting(clash, overwrite=True)
    assert get_setting("digits-lr") == clash
    with pytest.raises(ConfigError, match="Setting subclass, instance or factory"):
        register_setting(42)
    with pytest.raises(ConfigError, match="must return a Setting"):
        register_setting(lambda: "digits")
