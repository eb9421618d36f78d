"""``curvature_examples``: K-FAC/EK-FAC fitted on a subset of the training examples."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import datatrace.curvature.kfac_fit as kfac_fit
from datatrace import ConfigError, Task, make_attributor
from datatrace.cli import parse_methods
from datatrace.curvature import KFACCurvature, curvature_subset, fit_kfac
from datatrace.errors import StoreError
from datatrace.methods.influence import InfluenceConfig
from tests.models import autograd_loop, classification_data, mlp

RTOL = 1e-10
N_TRAIN = 20


def _case():
    return Task(mlp()), classification_data(n=N_TRAIN), classification_data(n=3, seed=4)


def _curvature(attr):
    return attr._contexts[0].fitted.solve().curvature


def _fit(task, train, **kwargs):
    kwargs.setdefault("batch_size", 6)
    return make_attributor("if-ekfac", task, **kwargs).fit(train)


def _assert_same_curvature(a, b, exact: bool) -> None:
    for la, lb in zip(a.layers, b.layers):
        for f in KFACCurvature.FIELDS:
            x, y = getattr(la, f), getattr(lb, f)
            if exact:
                assert torch.equal(x, y), f
            else:
                torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-14)


def test_none_is_the_default_and_stays_out_of_the_stored_config():
    task, train, queries = _case()
    default = _fit(task, train)
    explicit = _fit(task, train, curvature_examples=None)
    assert torch.equal(default.attribute(queries).values, explicit.attribute(queries).values)
    # the curvature of every training example, as fit_kfac computes it
    whole = fit_kfac(task, train, kind="ekfac", fisher="empirical", batch_size=6)
    _assert_same_curvature(_curvature(default), whole, exact=True)
    # stores written before the setting existed keep matching the default config
    assert "curvature_examples" not in default.config.to_json()
    assert _fit(task, train, curvature_examples=7).config.to_json()["curvature_examples"] == 7


@pytest.mark.parametrize("every", [N_TRAIN, 1.0])
@pytest.mark.parametrize("train_features", ["auto", "recompute"])
def test_every_example_is_bit_identical_to_none(every, train_features):
    task, train, queries = _case()
    kw = {"fisher": "true", "train_features": train_features}
    ref = _fit(task, train, **kw)
    full = _fit(task, train, curvature_examples=every, **kw)
    _assert_same_curvature(_curvature(full), _curvature(ref), exact=True)
    assert torch.equal(full.attribute(queries).values, ref.attribute(queries).values)
    assert torch.equal(full.self_attribute(), ref.self_attribute())


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("train_features", ["factored", "recompute"])
def test_subset_curvature_is_kfac_of_those_examples_and_scores_cover_all(
    kind, fisher, train_features
):
    task, train, queries = _case()
    m, seed = 7, 3
    attr = make_attributor(
        f"if-{kind}",
        task,
        curvature_examples=m,
        fisher=fisher,
        seed=seed,
        damping=1e-2,
        train_features=train_features,
        batch_size=4,
    ).fit(train)
    idx = curvature_subset(N_TRAIN, m, seed)
    assert idx is not None and idx.shape == (m,)
    subset = (train[0][idx], train[1][idx])
    expected = fit_kfac(task, subset, kind=kind, fisher=fisher, seed=seed, batch_size=4)
    _assert_same_curvature(_curvature(attr), expected, exact=False)
    whole = fit_kfac(task, train, kind=kind, fisher=fisher, seed=seed, batch_size=4)
    assert not torch.allclose(_curvature(attr).layers[0].a_factor, whole.layers[0].a_factor)

    # scores: every training example against the subset's inverse, over n_train
    def loss(model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    g_train = autograd_loop(task.model, loss, *train)
    g_query = autograd_loop(task.model, loss, *queries)
    inverse = expected.inverse(1e-2)
    # removing i raises the query loss by g_qᵀ (F + λ)⁻¹ g_i / n: training on it lowers it
    reference = (inverse.apply(g_query.T).T @ g_train.T) / N_TRAIN
    values = attr.attribute(queries).values
    assert values.shape == (3, N_TRAIN)
    torch.testing.assert_close(values, reference, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("eigen", [None, 0.2])
def test_the_curvature_passes_read_only_their_subsets(eigen, monkeypatch):
    task, train, _ = _case()
    seen: list[torch.Tensor] = []
    real = kfac_fit._capture

    def spy(task_, state, batch, *args, **kwargs):
        seen.append(batch[0])
        return real(task_, state, batch, *args, **kwargs)

    monkeypatch.setattr(kfac_fit, "_capture", spy)
    opts = {"eigenvalue_examples": eigen} if eigen is not None else {}
    _fit(task, train, curvature_examples=0.5, train_features="recompute", batch_size=4, **opts)
    curv = curvature_subset(N_TRAIN, 0.5, 0)
    eig = curv if eigen is None else curvature_subset(N_TRAIN, eigen, 0)
    assert curv is not None and eig is not None and len(curv) == 10
    assert len(eig) == (10 if eigen is None else 4)
    # covariance pass on the curvature subset, then the eigenvalue pass on its own
    assert torch.equal(torch.cat(seen), torch.cat([train[0][curv], train[0][eig]]))


def test_subset_is_seeded_nested_and_rounded():
    a = curvature_subset(100, 10, seed=0)
    b = curvature_subset(100, 30, seed=0)
    assert a is not None and b is not None
    assert torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    assert set(a.tolist()) <= set(b.tolist())  # nested as the count grows
    assert torch.equal(a, curvature_subset(100, 10, seed=0))  # deterministic
    assert not torch.equal(a, curvature_subset(100, 10, seed=1))
    assert not torch.equal(a, torch.arange(10))  # not the first examples
    assert torch.equal(curvature_subset(100, 0.1, seed=0), a)  # a fraction of n_train
    assert len(curvature_subset(10, 0.3, seed=0)) == 3  # 0.3 x 10 rounds to 3, not 4
    assert len(curvature_subset(10, 0.001, seed=0)) == 1  # at least one example
    assert curvature_subset(10, None, seed=0) is None


def test_datasets_and_loaders_subset_like_tensors():
    task, train, queries = _case()
    ref = _fit(task, train, curvature_examples=6).attribute(queries).values
    ds = TensorDataset(*train)
    for data in (ds, DataLoader(ds, batch_size=6)):
        values = _fit(task, data, curvature_examples=6).attribute(queries).values
        torch.testing.assert_close(values, ref, rtol=RTOL, atol=1e-14)


def test_members_draw_their_own_subsets():
    task, train, _ = _case()
    # two members with the same weights: only their subsets (seed + 7919 i) differ
    attr = _fit(task, train, curvature_examples=8, members=[task.model, copy.deepcopy(task.model)])
    a, b = (ctx.fitted.solve().curvature for ctx in attr._contexts)
    assert not torch.allclose(a.layers[0].a_factor, b.layers[0].a_factor)


def test_store_reuses_the_factors_of_the_same_subset_only(tmp_path, monkeypatch):
    import datatrace.methods.influence as influence

    task, train, queries = _case()
    calls = {"n": 0}
    real = influence.fit_kfac

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(influence, "fit_kfac", counting)
    store = tmp_path / "store"
    first = _fit(task, train, curvature_examples=8, store=store).attribute(queries).values
    again = _fit(task, train, curvature_examples=8, store=store).attribute(queries).values
    assert calls["n"] == 1  # the same subset: factors read back
    assert torch.equal(first, again)
    # another subset: the store refuses it (its config names the setting) rather than mixing
    with pytest.raises(StoreError, match="curvature_examples: stored 8, given 9"):
        _fit(task, train, curvature_examples=9, store=store)
    with pytest.raises(StoreError, match="curvature_examples"):
        _fit(task, train, store=store)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, "got 0"),
        (-3, "got -3"),
        (0.0, "got the float 0.0"),
        (1.5, "got the float 1.5"),
        (2.0, "pass the integer 2 for a count"),
        (math.nan, "got the float nan"),
        (True, "got True"),
        ("10", "got '10'"),
    ],
)
def test_bad_values_are_refused_naming_the_value(value, match):
    task = Task(mlp())
    with pytest.raises(ConfigError, match=match) as info:
        make_attributor("if-ekfac", task, curvature_examples=value)
    assert "curvature_examples must be None, an integer >= 1" in str(info.value)


def test_other_curvatures_and_too_many_examples_are_refused():
    task, train, _ = _case()
    with pytest.raises(
        ConfigError,
        match=r"curvature_examples=10 applies only with curvature='kfac' or 'ekfac'; got curvature='ggn'",
    ):
        make_attributor("if-cg", task, curvature_examples=10)
    attr = make_attributor("if-ekfac", task, curvature_examples=N_TRAIN + 1)
    with pytest.raises(ConfigError, match=f"curvature_examples=21 exceeds the {N_TRAIN} training"):
        attr.fit(train)


def test_cli_reads_counts_and_fractions():
    [(_, count)] = parse_methods("if-ekfac:curvature_examples=200")
    [(_, fraction)] = parse_methods("if-ekfac:curvature_examples=0.1")
    assert count == {"curvature_examples": 200} and isinstance(count["curvature_examples"], int)
    assert fraction == {"curvature_examples": 0.1}
    cfg = InfluenceConfig(curvature="ekfac", solver="explicit", curvature_examples=0.1)
    assert InfluenceConfig(**cfg.to_json()) == cfg


# ---------------------------------------------------------------- eigenvalue_examples
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_eigenvalue_subset_is_ekfac_of_the_curvature_subset_with_fewer_eigenvalue_examples(
    fisher,
):
    task, train, queries = _case()
    seed = 3
    attr = _fit(task, train, curvature_examples=12, eigenvalue_examples=5, fisher=fisher, seed=seed)
    curv_idx, eig_idx = curvature_subset(N_TRAIN, 12, seed), curvature_subset(N_TRAIN, 5, seed)
    assert curv_idx is not None and eig_idx is not None
    assert set(eig_idx.tolist()) < set(curv_idx.tolist())  # nested: the same permutation
    expected = fit_kfac(
        task,
        (train[0][curv_idx], train[1][curv_idx]),
        kind="ekfac",
        fisher=fisher,
        seed=seed,
        batch_size=6,
        eigenvalue_data=(train[0][eig_idx], train[1][eig_idx]),
    )
    _assert_same_curvature(_curvature(attr), expected, exact=False)
    # the factors are the curvature subset's, the eigenvalues not
    plain = _fit(task, train, curvature_examples=12, fisher=fisher, seed=seed)
    a, b = _curvature(attr).layers[0], _curvature(plain).layers[0]
    assert torch.equal(a.a_factor, b.a_factor) and torch.equal(a.q_g, b.q_g)
    assert not torch.allclose(a.eigenvalues, b.eigenvalues)
    assert attr.attribute(queries).values.shape == (3, N_TRAIN)


@pytest.mark.parametrize("eigen", [12, None])
def test_as_many_eigenvalue_examples_as_curvature_examples_is_bit_identical(eigen):
    task, train, queries = _case()
    ref = _fit(task, train, curvature_examples=12, train_features="recompute")
    same = _fit(task, train, curvature_examples=12, eigenvalue_examples=eigen)
    _assert_same_curvature(_curvature(same), _curvature(ref), exact=True)
    assert torch.equal(same.attribute(queries).values, ref.attribute(queries).values)
    assert ("eigenvalue_examples" in same.config.to_json()) == (eigen is not None)


def test_eigenvalue_examples_refusals_name_the_values():
    task, train, _ = _case()
    with pytest.raises(
        ConfigError, match=r"eigenvalue_examples=5 applies only with curvature='ekfac'"
    ):
        make_attributor("if-kfac", task, eigenvalue_examples=5)
    with pytest.raises(ConfigError, match="eigenvalue_examples must be None, an integer >= 1"):
        make_attributor("if-ekfac", task, eigenvalue_examples=0)
    with pytest.raises(
        ConfigError, match=r"eigenvalue_examples=0\.5 exceeds curvature_examples=0\.2"
    ):
        make_attributor("if-ekfac", task, curvature_examples=0.2, eigenvalue_examples=0.5)
    # a count against a fraction is compared once n_train is known
    attr = make_attributor("if-ekfac", task, curvature_examples=0.25, eigenvalue_examples=6)
    with pytest.raises(
        ConfigError, match=r"selects 6 of the 20 .* more than the 5 of curvature_examples=0.25"
    ):
        attr.fit(train)
    with pytest.raises(ConfigError, match="K-FAC does not run"):
        fit_kfac(task, train, kind="kfac", eigenvalue_data=train)


def test_store_keys_the_factors_by_the_eigenvalue_subset(tmp_path):
    task, train, queries = _case()
    store = tmp_path / "store"
    first = _fit(task, train, curvature_examples=10, eigenvalue_examples=4, store=store)
    again = _fit(task, train, curvature_examples=10, eigenvalue_examples=4, store=store)
    assert torch.equal(first.attribute(queries).values, again.attribute(queries).values)
    with pytest.raises(StoreError, match="eigenvalue_examples: stored 4, given 5"):
        _fit(task, train, curvature_examples=10, eigenvalue_examples=5, store=store)
