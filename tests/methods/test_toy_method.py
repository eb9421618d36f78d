"""Adding a method touches one new file: a toy method defined only here passes the suites.

``ToyAttributor`` (loss-gradient dot products times a fixed scale, with its own state
dataclass) is registered through the public path (:func:`datatrace.methods.register_method`)
and run through the conformance checks of tests/methods (shape, sign, determinism,
batch-size invariance, not-fitted error, store resume, pickling), the group suite
(``groups=``) and the one-member ensemble checks (``members=``), with no edit to src/. A
toy that declares the train-feature forms it scores (``feature_forms``) gets the loop's
choice in its context.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from datatrace import METHODS, Checkpoint, ConfigError, Task, dropout_members, make_attributor
from datatrace.methods import (
    Attributor,
    FormChoice,
    MemberContext,
    MethodConfig,
    register_method,
    unregister_method,
)
from tests.ensemble import test_one_member as one_member
from tests.methods import test_conformance as conformance
from tests.methods import test_groups_conformance as group_suite
from tests.models import classification_data, mlp

TOY = "toy-scaled-dot"


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """Settings of the toy method.

    Attributes:
        scale: multiplies every score (> 0).
    """

    scale: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise ConfigError(f"scale must be a number > 0; got {self.scale!r}.")


@dataclass(frozen=True)
class ToyState:
    """What ``fit`` keeps of one member: the scale and the member's feature width."""

    scale: float
    width: int


class ToyAttributor(Attributor[ToyState]):
    """``scale * <g_q, g_i>``: the default loss-gradient features, a scaled query."""

    method_id = TOY
    Config = ToyConfig
    config: ToyConfig

    def _fit_member(self, ctx: MemberContext[ToyState]) -> ToyState:
        width = sum(p.numel() for p in ctx.task.tracked_params().values())
        return ToyState(float(self.config.scale), width)

    def _transform_queries(self, ctx: MemberContext[ToyState], q: torch.Tensor) -> torch.Tensor:
        assert q.shape[1] == ctx.fitted.width
        return ctx.fitted.scale * q


@pytest.fixture
def toy():
    register_method(TOY, ToyAttributor)
    try:
        yield TOY
    finally:
        unregister_method(TOY)
    assert TOY not in METHODS


@pytest.fixture(scope="module")
def data():
    return classification_data(n=12), classification_data(n=5, seed=7)


def test_registration_is_public_and_refuses_clashes(toy):
    assert METHODS[toy][0] is ToyAttributor
    with pytest.raises(ConfigError, match="is taken"):
        register_method("grad-dot", ToyAttributor)
    with pytest.raises(ConfigError, match="Attributor subclass"):
        register_method("not-a-method", dict)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown method"):
        unregister_method("no-such-method")


def test_toy_scores_are_scaled_grad_dot(toy, data):
    train, queries = data
    toy_scores = make_attributor(toy, Task(mlp()), scale=3.0).fit(train).attribute(queries)
    dot = make_attributor("grad-dot", Task(mlp())).fit(train).attribute(queries)
    assert toy_scores.method == toy
    torch.testing.assert_close(toy_scores.values, 3.0 * dot.values, rtol=1e-10, atol=1e-12)


CONFORMANCE = [
    conformance.test_shape_ids_and_determinism,
    conformance.test_sign_self_scores_positive_and_match_diagonal,
    conformance.test_batch_size_invariance,
    conformance.test_one_member_equals_plain_method,
    conformance.test_fitted_attributor_pickles_and_scores_the_same,
]


@pytest.mark.parametrize("check", CONFORMANCE, ids=lambda f: f.__name__)
def test_conformance_suite(check, toy, data, tmp_path):
    if check is conformance.test_fitted_attributor_pickles_and_scores_the_same:
        check(toy, data, tmp_path)
    else:
        check(toy, data)


def test_conformance_not_fitted_and_store(toy, data, tmp_path, monkeypatch):
    conformance.test_not_fitted(toy, data)
    conformance.test_store_resume_after_kill(toy, data, tmp_path / "resume", monkeypatch)
    conformance.test_stale_store_advice_overwrite_true_works(toy, data, tmp_path / "stale")


def test_group_suite(toy, data, monkeypatch):
    group_suite.test_singleton_groups_equal_per_sample_attribution(toy, data)
    group_suite.test_group_features_do_not_depend_on_batch_size(toy, data, monkeypatch)


def test_groups_sum_member_scores(toy, data):
    """The toy is linear in the train gradient: a group's score is its members' sum."""
    train, queries = data
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 3])
    plain = make_attributor(toy, Task(mlp())).fit(train).attribute(queries).values
    grouped = make_attributor(toy, Task(mlp()), groups=ids).fit(train).attribute(queries)
    expected = torch.zeros(5, 4, dtype=plain.dtype).index_add_(1, ids, plain)
    torch.testing.assert_close(grouped.values, expected, rtol=1e-10, atol=1e-12)


def test_ensembles(toy, data):
    """members=: the mean over members, and a dropout member equals its masked model."""
    train, queries = data
    models = [mlp(seed=4), mlp(seed=5)]
    members = [Checkpoint(m.state_dict()) for m in models]
    ensemble = make_attributor(toy, Task(mlp()), members=members).fit(train).attribute(queries)
    singles = [make_attributor(toy, Task(m)).fit(train).attribute(queries) for m in models]
    expected = (singles[0].values + singles[1].values) / 2
    torch.testing.assert_close(ensemble.values, expected, rtol=1e-10, atol=1e-12)
    small = classification_data(n=10), classification_data(n=3, seed=7)
    one_member.test_dropout_member_equals_masked_model(toy, small)
    masked = make_attributor(toy, Task(mlp()), members=dropout_members(2, rate=0.3, layers=["1"]))
    assert masked.fit(train).attribute(queries).shape == (5, 12)


@dataclass(frozen=True)
class FormState(ToyState):
    """The toy's state plus the train-feature form the loop handed it."""

    form: str
    modules: tuple[str, ...] | None


class FormToy(ToyAttributor):
    """The toy declaring that it prefers factored train features: it reads the loop's
    decision (``ctx.form``, ``ctx.layout``) instead of making it."""

    @classmethod
    def feature_forms(cls, config: MethodConfig) -> tuple[FormChoice, ...]:
        return ("factored", "flat")

    def _fit_member(self, ctx: MemberContext[ToyState]) -> ToyState:
        modules = None if ctx.layout is None else tuple(ctx.layout.modules)
        width = sum(p.numel() for p in ctx.task.tracked_params().values())
        if ctx.form == "projected":
            width = self.config.proj_dim
        return FormState(float(self.config.scale), width, ctx.form, modules)


@pytest.mark.parametrize(
    ("settings", "form"),
    [
        ({}, "factored"),
        ({"groups": torch.arange(12) % 3}, "flat"),  # group features are summed gradients
        ({"engine": "functional"}, "flat"),
        ({"projector": "gaussian", "proj_dim": 8}, "projected"),
    ],
    ids=["plain", "groups", "functional", "projector"],
)
def test_a_declared_feature_form_is_decided_by_the_loop(data, settings, form, monkeypatch):
    train, queries = data
    attr = FormToy(Task(mlp()), **settings).fit(train)
    state = attr._contexts[0].fitted
    assert isinstance(state, FormState) and state.form == form
    assert state.modules == (("0", "2") if form == "factored" else None)
    assert attr.attribute(queries).shape == (5, attr._n_units)
    # a toy that takes factored features only gets them, or a ConfigError naming why not
    monkeypatch.setattr(FormToy, "feature_forms", classmethod(lambda cls, config: ("factored",)))
    if form == "factored":
        assert FormToy(Task(mlp()), **settings).fit(train)._contexts[0].form == "factored"
    else:
        with pytest.raises(ConfigError, match="FormToy needs factored train features"):
            FormToy(Task(mlp()), **settings).fit(train)
