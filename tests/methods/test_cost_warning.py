"""A CostWarning with the estimate before an exact or iterative solver's expensive work."""

from __future__ import annotations

import warnings

import pytest
import torch

from datatrace import CostWarning, Task, make_attributor


def _data(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)


SCALE = {"if-lissa": {"solver_options": {"scale": 10.0}}}  # no power iteration in fit


def _task(d_in: int, d_out: int = 100) -> Task:
    torch.manual_seed(0)
    return Task(torch.nn.Linear(d_in, d_out).eval())


def _no_cost_warning(record) -> bool:
    return not [w for w in record if issubclass(w.category, CostWarning)]


def test_explicit_on_a_dense_curvature_warns_before_any_work():
    attr = make_attributor("if-explicit", _task(100), progress=False)  # P = 10,100
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostWarning)  # the warning is raised: nothing runs after
        with pytest.raises(CostWarning) as info:
            attr.fit(_data(4, 100))
    message = str(info.value)
    assert "if-explicit" in message and "10,100 parameters" in message
    assert "dense 10,100 x 10,100 curvature" in message and "GiB" in message
    assert "if-ekfac" in message  # the cheaper alternative
    assert attr._contexts == []  # no member was featurized or fitted


def test_explicit_on_a_small_model_is_silent():
    attr = make_attributor("if-explicit", _task(10, 10), progress=False, damping=0.1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        attr.fit(_data(16, 10)).attribute(_data(4, 10, seed=1))
    assert _no_cost_warning(rec)


def test_explicit_on_a_projected_fisher_is_silent():
    attr = make_attributor(
        "if-explicit", _task(100), curvature="fisher", projector="gaussian", proj_dim=64
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        attr.fit(_data(16, 100))
    assert _no_cost_warning(rec)


@pytest.mark.parametrize("method", ["if-cg", "if-lissa"])
def test_iterative_solvers_warn_over_many_queries_not_over_few(method):
    # P = 100,100 and n = 128: CG's 100 iterations x 128 examples x P = 1.3e9 per query
    attr = make_attributor(method, _task(1000), progress=False, **SCALE.get(method, {}))
    attr.fit(_data(128, 1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostWarning)
        with pytest.raises(CostWarning, match=r"each of 2,000 right-hand sides"):
            attr.attribute(_data(2000, 1000, seed=1))  # refused before featurizing queries
        with pytest.raises(CostWarning, match=r"each of 128 right-hand sides"):
            attr.self_attribute()  # every training example is a right-hand side
    assert attr._cost_warning(2) is None  # 2.6e9 (CG) and 2.6e10 (LiSSA): silent


def test_the_warning_names_the_callers_line():
    attr = make_attributor("if-explicit", _task(100), progress=False)
    # stop the expensive part: the dense curvature is built after the warning
    attr._fit_member = _stop  # type: ignore[method-assign]
    with pytest.warns(CostWarning) as rec, pytest.raises(RuntimeError, match="stop here"):
        attr.fit(_data(4, 100))
    assert [w.filename for w in rec if issubclass(w.category, CostWarning)] == [__file__]


def _stop(ctx):
    raise RuntimeError("stop here")
