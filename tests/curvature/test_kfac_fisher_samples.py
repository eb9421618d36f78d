"""``fisher_samples=k``: the sampled true Fisher averaged over k labels per example."""

from __future__ import annotations

import pytest
import torch

from datatrace import ConfigError, Task, make_attributor
from datatrace.curvature import eigen_pass_seed, fit_ekfac_eigenvalues, fit_kfac
from datatrace.curvature.kfac_labels import _example_generator
from tests.models import classification_data, mlp

RTOL = 1e-10


def _drawn_labels(model, x, seed, k):
    """Label sets j = 0..k-1: the j-th uniform of each example's own stream, mapped through
    the predictive CDF (the label is the number of classes whose CDF is <= u)."""
    with torch.no_grad():
        cdf = torch.softmax(model(x).double(), -1).cumsum(-1)
    sets = torch.zeros(k, x.shape[0], dtype=torch.long)
    for i in range(x.shape[0]):
        u = torch.rand(k, 1, generator=_example_generator(seed, i), dtype=torch.float64)
        for j in range(k):
            sets[j, i] = int((cdf[i] <= u[j, 0]).sum())
    return sets


def test_k_samples_average_the_empirical_fisher_of_k_drawn_label_sets():
    model = mlp()
    task = Task(model)
    x, y = classification_data(n=12)
    k, seed = 3, 5
    sets = _drawn_labels(model, x, seed, k)
    curv = fit_kfac(task, (x, y), kind="ekfac", seed=seed, fisher_samples=k, batch_size=5)
    per_set = [fit_kfac(task, (x, s), kind="kfac", fisher="empirical") for s in sets]
    for j, layer in enumerate(curv.layers):
        a = per_set[0].layers[j].a_factor
        g = sum(c.layers[j].g_factor for c in per_set) / k
        torch.testing.assert_close(layer.a_factor, a, rtol=RTOL, atol=1e-14)
        torch.testing.assert_close(layer.g_factor, g, rtol=RTOL, atol=1e-14)
    # EK-FAC: the eigenvalues in the averaged basis average those of k label sets drawn
    # afresh (the eigenvalue pass's own seed), not the sets that estimated the factors
    fresh = _drawn_labels(model, x, eigen_pass_seed(seed), k)
    assert not all(torch.equal(a, b) for a, b in zip(sets, fresh))
    lams = [fit_ekfac_eigenvalues(task, (x, s), curv.layers, fisher="empirical") for s in fresh]
    for j, layer in enumerate(curv.layers):
        expected = sum(lam[j] for lam in lams) / k
        torch.testing.assert_close(layer.eigenvalues, expected, rtol=RTOL, atol=1e-14)
    # one sample is the default, and the first label set
    one = fit_kfac(task, (x, y), kind="kfac", seed=seed)
    first = fit_kfac(task, (x, sets[0]), kind="kfac", fisher="empirical")
    torch.testing.assert_close(one.layers[0].g_factor, first.layers[0].g_factor, rtol=RTOL, atol=0)


def test_fisher_samples_reach_the_methods_and_bad_values_are_refused():
    task = Task(mlp())
    train, queries = classification_data(n=10), classification_data(n=2, seed=4)
    true = {"damping": 1e-2, "fisher": "true"}
    s1 = make_attributor("if-ekfac", task, **true).fit(train).attribute(queries).values
    s4 = make_attributor("if-ekfac", task, **true, fisher_samples=4).fit(train)
    assert not torch.allclose(s1, s4.attribute(queries).values)
    with pytest.raises(ConfigError, match="fisher_samples must be an integer >= 1; got 0"):
        make_attributor("if-ekfac", task, fisher_samples=0)
    with pytest.raises(ConfigError, match="only fisher='true'"):
        make_attributor("logra", task, fisher="empirical", fisher_samples=2)
    with pytest.raises(ConfigError, match="applies only with curvature='kfac' or 'ekfac'"):
        make_attributor("if-cg", task, fisher="true", fisher_samples=2)
