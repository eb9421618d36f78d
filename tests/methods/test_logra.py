"""LoGra: unprojected = grad-dot / n, if-kfac, if-ekfac; projected = dense float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datatrace import ConfigError, ModelError, Task, lora_members, make_attributor
from datatrace.curvature import fit_kfac
from datatrace.gradients.factored import ParamLayout
from datatrace.projection import FactoredProjector
from tests.methods.test_kfac_influence import CASES
from tests.models import autograd_loop, classification_data, cnn, mlp

RTOL = 1e-10


@pytest.mark.parametrize("case", ["mlp", "cnn-factored", "lm-masked"])
@pytest.mark.parametrize(
    ("precond", "reference", "damping"),
    [
        ("identity", "grad-dot", None),
        ("kfac", "if-kfac", 1e-2),
        ("ekfac", "if-ekfac", 1e-2),
        ("ekfac", "if-ekfac", "heuristic"),
    ],
)
def test_unprojected_logra_equals_the_method_it_preconditions_like(
    case, precond, reference, damping
):
    task, train, queries = CASES[case]()
    n = len(train[1]) if isinstance(train, tuple) else len(train["input_ids"])
    opts = {"batch_size": 4, "seed": 3}
    logra = make_attributor(
        "logra",
        task,
        proj_dim_in=None,
        proj_dim_out=None,
        preconditioner=precond,
        damping=damping if damping is not None else 0.0,
        **opts,
    ).fit(train)
    ref_opts = dict(opts) if damping is None else {**opts, "damping": damping}
    ref = make_attributor(reference, task, **ref_opts).fit(train)
    expected = ref.attribute(queries).values
    if reference == "grad-dot":
        expected = expected / n
    torch.testing.assert_close(logra.attribute(queries).values, expected, rtol=RTOL, atol=1e-14)
    self_expected = ref.self_attribute() / (n if reference == "grad-dot" else 1)
    torch.testing.assert_close(logra.self_attribute(), self_expected, rtol=RTOL, atol=1e-14)


def _dense_reference(task, train, queries, precond, damping, k_in, k_out, seed=0):
    """Scores from autograd-loop gradients projected densely, with a dense curvature solve."""
    model = task.model
    layout = ParamLayout(task)
    proj = FactoredProjector(k_in, k_out, seed=seed)
    mats = {
        s.module: proj.layer_matrices(s.module, s.in_width, s.out_features, torch.float64)
        for s in layout.slots
    }

    def loss(m, x, y):
        return F.cross_entropy(m(x), y, reduction="sum")

    def projected(xs, ys):
        per_layer = layout.to_matrices(autograd_loop(model, loss, xs, ys))
        return [
            mats[s.module][1].T @ d @ mats[s.module][0] for s, d in zip(layout.slots, per_layer)
        ]

    tr, qu = projected(*train), projected(*queries)
    n = len(train[1])
    kf = fit_kfac(task, train, kind="kfac", fisher="empirical")  # unprojected factors
    total, per_layer = 0.0, {}
    for slot, layer, dt, dq in zip(layout.slots, kf.layers, tr, qu):
        p_a, p_g = mats[slot.module]
        dtf, dqf = dt.reshape(n, -1), dq.reshape(dq.shape[0], -1)
        if precond == "identity":
            s = dqf @ dtf.T / n
        else:
            a_p, g_p = p_a.T @ layer.a_factor @ p_a, p_g.T @ layer.g_factor @ p_g
            f = torch.kron(g_p, a_p)  # row-major vec: (G ⊗ A)
            if precond == "ekfac":
                q = torch.kron(torch.linalg.eigh(g_p)[1], torch.linalg.eigh(a_p)[1])
                lam = ((dtf @ q) ** 2).mean(0)  # empirical Fisher: the loss gradients
                f = q @ torch.diag(lam) @ q.T
            s = dqf @ torch.linalg.solve(f + damping * torch.eye(f.shape[0]).double(), dtf.T) / n
        per_layer[slot.module] = s
        total = total + s
    return total, per_layer


@pytest.mark.parametrize("precond", ["identity", "kfac", "ekfac"])
def test_projected_logra_matches_dense_projection_and_solve(precond):
    task = Task(mlp(d_in=6, hidden=7))
    train, queries = classification_data(n=13), classification_data(n=4, seed=7)
    attr = make_attributor(
        "logra",
        task,
        proj_dim_in=4,
        proj_dim_out=3,
        preconditioner=precond,
        damping=1e-2,
        fisher="empirical",
        batch_size=5,
    ).fit(train)
    total, per_layer = _dense_reference(task, train, queries, precond, 1e-2, 4, 3)
    torch.testing.assert_close(attr.attribute(queries).values, total, rtol=RTOL, atol=1e-14)
    # the preconditioner is block-diagonal over layers: per-module scores are exact, sum to total
    per_module = attr.attribute_per_module(queries)
    assert list(per_module) == ["0", "2"]
    for name, s in per_module.items():
        torch.testing.assert_close(s.values, per_layer[name], rtol=RTOL, atol=1e-14)
    summed = sum(s.values for s in per_module.values())
    torch.testing.assert_close(summed, attr.attribute(queries).values, rtol=RTOL, atol=1e-14)


def test_features_have_projected_size_and_match_across_engines_and_store(tmp_path):
    task = Task(mlp(d_in=6, hidden=7))
    train, queries = classification_data(n=9), classification_data(n=3, seed=5)
    opts = {"proj_dim_in": 4, "proj_dim_out": 2, "preconditioner": "ekfac", "damping": 1e-2}
    hooks = make_attributor("logra", task, **opts, store=tmp_path / "s").fit(train)
    first = next(hooks._iter_train_features(hooks._contexts[0]))[1]
    assert first.shape[1] == 2 * (2 * 4)  # two layers of k_out x k_in, not 6*7 + 7*3 + 10
    functional = make_attributor("logra", task, **opts, engine="functional").fit(train)
    a = hooks.attribute(queries).values
    torch.testing.assert_close(functional.attribute(queries).values, a, rtol=RTOL, atol=1e-14)
    reloaded = make_attributor("logra", task, **opts, store=tmp_path / "s").fit(train)
    torch.testing.assert_close(reloaded.attribute(queries).values, a, rtol=RTOL, atol=1e-14)


def test_members_get_independent_projections():
    task = Task(mlp())
    train, queries = classification_data(n=8), classification_data(n=2, seed=5)
    opts = {"proj_dim_in": 3, "proj_dim_out": 2, "preconditioner": "identity"}
    one = make_attributor("logra", task, **opts).fit(train).attribute(queries).values
    other = make_attributor("logra", task, **opts, seed=1).fit(train).attribute(queries).values
    assert not torch.allclose(one, other)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proj_dim_in": 0}, "proj_dim_in must be an integer >= 1"),
        ({"proj_dim_out": 2.5}, "proj_dim_out must be an integer >= 1"),
        ({"preconditioner": "cg"}, "preconditioner must be one of"),
        ({"damping": "big"}, "damping must be"),
        ({"damping": -1.0}, "damping must be a finite number >= 0"),
        ({"damping": {"0": 1.0}}, "must name every K-FAC layer"),
        ({"fisher": "model"}, "fisher must be"),
        ({"projector": "gaussian"}, "LoGra projects each layer itself"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_attributor("logra", Task(mlp()), **kwargs)


def test_untracked_layer_kinds_are_refused():
    with pytest.raises(
        ModelError, match=r"covers the weights and biases of nn\.Linear, nn\.Conv2d"
    ):
        make_attributor("logra", Task(cnn()))
    # selecting the supported layers works
    task = Task(cnn(), module_types=(nn.Conv2d, nn.Linear))
    assert make_attributor("logra", task, proj_dim_in=2, proj_dim_out=2) is not None


def test_the_loop_decides_the_layer_projected_form():
    # LoGra's per-layer projections need its layers, not per-example factors: groups= and
    # the functional engine keep the form; a LoRA member's layout is its adapter layers
    train = classification_data(n=12)
    adapter = {
        "0.lora_A.weight": torch.randn(2, 6, dtype=torch.float64),
        "0.lora_B.weight": torch.randn(5, 2, dtype=torch.float64),
    }
    for settings, modules in [
        ({}, ["0", "2"]),
        ({"groups": torch.arange(12) % 3}, ["0", "2"]),
        ({"engine": "functional"}, ["0", "2"]),
        ({"members": lora_members([adapter])}, ["0.lora_A", "0.lora_B"]),
    ]:
        attr = make_attributor("logra", Task(mlp()), proj_dim_in=2, **settings).fit(train)
        ctx = attr._contexts[0]
        assert ctx.form == "layer-projected" and ctx.factor_layout().modules == modules
    # the refusal names LoGra and the alternative
    with pytest.raises(ModelError, match=r"LoGra needs layer-projected train features.*trak"):
        make_attributor("logra", Task(cnn()))
