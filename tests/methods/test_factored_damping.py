"""K-FAC with factored damping and the relative (heuristic) damping factor."""

from __future__ import annotations

import pytest
import torch

from datatrace import ConfigError, Task, dropout_members, make_attributor
from datatrace.curvature import (
    HEURISTIC_DAMPING,
    factored_damping,
    fit_kfac,
)
from tests.models import classification_data, cnn, mlp, tiny_lm

RTOL = 1e-10


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[0], dtype=m.dtype)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("damping", [1e-2, "heuristic"])
def test_factored_inverse_is_the_product_of_the_damped_factor_inverses(case, damping):
    if case == "mlp":
        task, data = Task(mlp()), classification_data(n=16)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
        task, data = Task(cnn(), module_types="layers"), (x, torch.randint(0, 4, (12,)))
    curvature = fit_kfac(task, data, kind="kfac", fisher="empirical")
    inverse = curvature.inverse(damping, factored=True)
    v = torch.randn(
        4, curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    got = curvature.to_matrices(inverse.apply(v.T).T)
    for layer, m, out in zip(curvature.layers, curvature.to_matrices(v), got):
        lam = inverse.layer_damping[layer.module]
        d_g, d_a = factored_damping(layer, lam)
        assert d_g * d_a == pytest.approx(lam, rel=1e-12)
        # π balances the factors: each damped by the same multiple of its mean eigenvalue
        mean_g = float(layer.g_factor.diagonal().mean())
        mean_a = float(layer.a_factor.diagonal().mean())
        assert d_g / mean_g == pytest.approx(d_a / mean_a, rel=1e-12)
        g_inv = torch.linalg.inv(layer.g_factor + d_g * _eye_like(layer.g_factor))
        a_inv = torch.linalg.inv(layer.a_factor + d_a * _eye_like(layer.a_factor))
        torch.testing.assert_close(out, g_inv @ m @ a_inv, rtol=RTOL, atol=1e-12)
        k_g, k_a = inverse.kronecker[layer.module]
        torch.testing.assert_close(k_g, g_inv, rtol=RTOL, atol=1e-12)
        torch.testing.assert_close(k_a, a_inv, rtol=RTOL, atol=1e-12)
    # unsplit damping is another operator: the split adds δ_A G ⊗ I + δ_G I ⊗ A
    plain = curvature.to_matrices(curvature.inverse(damping).apply(v.T).T)
    assert not torch.allclose(plain[0], got[0], rtol=1e-3)


def test_heuristic_factored_damping_gives_each_factor_its_share():
    task, data = Task(mlp()), classification_data(n=16)
    curvature = fit_kfac(task, data, kind="kfac", fisher="empirical")
    inverse = curvature.inverse("heuristic", factored=True, relative_damping=0.04)
    for layer in curvature.layers:
        d_g, d_a = factored_damping(layer, inverse.layer_damping[layer.module])
        # λ = 0.04 x mean(λ_G λ_Aᵀ) splits into 0.2 x each factor's mean eigenvalue
        assert d_g == pytest.approx(0.2 * float(layer.g_factor.diagonal().mean()), rel=1e-10)
        assert d_a == pytest.approx(0.2 * float(layer.a_factor.diagonal().mean()), rel=1e-10)


def test_factored_damping_is_refused_for_ekfac_and_solvers():
    task, data = Task(mlp()), classification_data(n=16)
    ekfac = fit_kfac(task, data, kind="ekfac", fisher="empirical")
    with pytest.raises(ConfigError, match="kind='kfac' and no solver"):
        ekfac.inverse(1e-2, factored=True)
    with pytest.raises(ConfigError, match="factored_damping=True applies only with"):
        make_attributor("if-ekfac", task, factored_damping=True)
    with pytest.raises(ConfigError, match="factored_damping=True applies only with"):
        make_attributor("if-cg", task, curvature="kfac", factored_damping=True)
    with pytest.raises(ConfigError, match="factored_damping must be True or False"):
        make_attributor("if-kfac", task, factored_damping="yes")


@pytest.mark.parametrize("options", [{}, {"train_features": "recompute"}, {"batch_size": 3}])
def test_factor_queries_score_as_the_query_matrices(options):
    """One position per example: queries stay factors through the inverse and are scored by
    pairwise products; the flattened-gradient path scores the same."""
    task, train, queries = Task(mlp()), classification_data(n=20), classification_data(n=4, seed=7)
    fast = make_attributor("if-kfac", task, factored_damping=True, **options).fit(train)
    got = fast.attribute(queries).values
    assert fast._factor_queries == {0: True}  # the factor path ran
    dense = make_attributor("if-kfac", task, factored_damping=True, train_features="gradients")
    want = dense.fit(train).attribute(queries).values
    assert dense._factor_queries == {0: False}
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-14)
    # per-module scores split the same scores (through query matrices)
    parts = fast.attribute_per_module(queries)
    torch.testing.assert_close(sum(s.values for s in parts.values()), got, rtol=RTOL, atol=1e-14)
    # self-scores through the factors' paired products equal the flattened path's
    torch.testing.assert_close(fast.self_attribute(), dense.self_attribute(), rtol=RTOL, atol=1e-14)


def test_factor_queries_with_dropout_members_of_two_models():
    """The two-training recipe (docs/benchmarks.md): masks over two models, each member its
    own inverse and factor queries; the flattened-gradient path scores the same."""
    task, train, queries = Task(mlp()), classification_data(n=20), classification_data(n=4, seed=7)
    models = [mlp(seed=0).state_dict(), mlp(seed=1).state_dict()]
    members = dropout_members(3, rate=0.3, layers=["1"], models=models)
    options = {"factored_damping": True, "relative_damping": 0.01, "members": members}
    fast = make_attributor("if-kfac", task, **options).fit(train)
    got = fast.attribute(queries).values
    assert fast._factor_queries == {0: True, 1: True, 2: True}
    dense = make_attributor("if-kfac", task, train_features="gradients", **options)
    want = dense.fit(train).attribute(queries).values
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-14)
    # each member counts: not the plain model's scores
    plain = make_attributor("if-kfac", task, factored_damping=True, relative_damping=0.01)
    assert not torch.allclose(plain.fit(train).attribute(queries).values, got, rtol=1e-3)


def test_many_positions_fall_back_to_query_matrices():
    """A language model's queries (T^2 (I' + O) > O I') are scored through their matrices;
    the scores are those of the flattened-gradient path."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (8, 6), generator=g)
    train, queries = {"input_ids": ids}, {"input_ids": ids[:3]}
    task = Task(tiny_lm(), loss="lm", module_types="layers")
    fast = make_attributor("if-kfac", task, factored_damping=True, batch_size=4).fit(train)
    got = fast.attribute(queries).values
    assert fast._factor_queries == {0: False}
    dense = make_attributor("if-kfac", task, factored_damping=True, train_features="gradients")
    want = dense.fit(train).attribute(queries).values
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-14)
    # self-scores: pairwise products over positions t, s of each example's factors
    torch.testing.assert_close(fast.self_attribute(), dense.self_attribute(), rtol=RTOL, atol=1e-14)


def test_relative_damping_scales_the_heuristic():
    task, train, queries = Task(mlp()), classification_data(n=20), classification_data(n=3, seed=7)
    attr = make_attributor("if-kfac", task, relative_damping=0.01).fit(train)
    curvature = attr._contexts[0].fitted.solve().curvature
    per_layer = {lay.module: 0.01 * float(lay.eigenvalues.mean()) for lay in curvature.layers}
    explicit = make_attributor("if-kfac", task, damping=per_layer).fit(train)
    torch.testing.assert_close(
        attr.attribute(queries).values, explicit.attribute(queries).values, rtol=RTOL, atol=0
    )
    # the default stays out of stored configs (stores written before it still match)
    assert "relative_damping" not in make_attributor("if-kfac", task).config.to_json()
    assert attr.config.to_json()["relative_damping"] == 0.01
    assert make_attributor("if-kfac", task).config.relative_damping == HEURISTIC_DAMPING
    with pytest.raises(ConfigError, match=r"relative_damping=0\.01 applies only with"):
        make_attributor("if-kfac", task, relative_damping=0.01, damping=1e-3)
    with pytest.raises(ConfigError, match="must be a finite number >= 0; got -1"):
        make_attributor("if-kfac", task, relative_damping=-1)
