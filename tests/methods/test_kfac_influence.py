"""K-FAC / EK-FAC influence: dense references, the factored training-score path, the store."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import datatrace.methods.influence as influence
from datatrace import ConfigError, ModelError, Task, make_attributor
from datatrace.curvature import fit_kfac
from datatrace.errors import NumericalError, StoreError
from tests.methods.test_scalable_path import LargestTensor
from tests.models import autograd_loop, classification_data, cnn, mlp, tiny_lm

RTOL = 1e-10


def _wide_cnn() -> nn.Module:
    # conv layers with few patches, so that their factors are smaller than their gradients
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(2, 12, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(12, 16, 3, stride=2),
            nn.Flatten(),
            nn.Linear(64, 3),
        )
        .double()
        .eval()
    )


def _lm_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, 4), generator=g)
    mask = torch.ones(n, 4, dtype=torch.long)
    mask[::3, -1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _images(n: int, shape: tuple[int, ...], classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.arange(n) % classes


CASES = {
    "mlp": lambda: (Task(mlp()), classification_data(n=11), classification_data(n=4, seed=7)),
    # conv layers with many patches store gradient matrices, the Linear head factors
    "cnn-dense": lambda: (
        Task(cnn(), module_types=(nn.Conv2d, nn.Linear)),
        _images(9, (1, 8, 8), 4, 1),
        _images(3, (1, 8, 8), 4, 2),
    ),
    "cnn-factored": lambda: (
        Task(_wide_cnn()),
        _images(9, (2, 5, 5), 3, 1),
        _images(3, (2, 5, 5), 3, 2),
    ),
    "lm-masked": lambda: (
        Task(tiny_lm(), loss="lm", module_types=(nn.Linear,)),
        _lm_data(7, 1),
        _lm_data(3, 2),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method_id", ["if-kfac", "if-ekfac"])
def test_factored_path_equals_materialised_gradients(case, method_id):
    task, train, queries = CASES[case]()
    opts = {"damping": 1e-2, "batch_size": 4}
    factored = make_attributor(method_id, task, train_features="factored", **opts).fit(train)
    dense = make_attributor(method_id, task, train_features="gradients", **opts).fit(train)
    a, b = factored.attribute(queries).values, dense.attribute(queries).values
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-13)
    torch.testing.assert_close(
        factored.self_attribute(), dense.self_attribute(), rtol=RTOL, atol=1e-13
    )
    # a row holds one position count per layer, then per layer the factors a, g (T (I' + O))
    # or, where that is larger (convs with many patches), the gradient matrix (O I')
    widths = {
        "mlp": 2 + (7 + 5) + (6 + 3),
        "cnn-dense": 3 + 3 * 10 + 2 * 27 + (51 + 4),
        "cnn-factored": 3 + 12 * 19 + 4 * (109 + 16) + (65 + 3),
        "lm-masked": 4 + 3 * 4 * (9 + 8) + 4 * (9 + 11),
    }
    assert factored._contexts[0].features[0].shape[1] == widths[case]


def _dense_reference(task, train, queries, damping, **fit_opts):
    """score = ∇f_qᵀ (F + λI)⁻¹ ∇L_i / n from autograd-loop gradients and a dense solve."""
    model = task.model

    def loss(m, x, y):
        return nn.functional.cross_entropy(m(x), y, reduction="sum")

    g_train = autograd_loop(model, loss, *train)
    g_query = autograd_loop(model, loss, *queries)
    curv = fit_kfac(task, train, **fit_opts)
    matrix = curv.matrix() + damping * torch.eye(curv.dim, dtype=torch.float64)
    pre = torch.linalg.solve(matrix, g_query.T).T / len(train[1])
    return curv, pre, g_train


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_scores_equal_dense_solve_with_autograd_gradients(kind, fisher):
    task, train, queries = CASES["mlp"]()
    attr = make_attributor(f"if-{kind}", task, damping=0.05, fisher=fisher, batch_size=5)
    values = attr.fit(train).attribute(queries).values
    _, pre, g_train = _dense_reference(task, train, queries, 0.05, kind=kind, fisher=fisher)
    # query objective = loss (the default target): a training example that lowers it scores +
    torch.testing.assert_close(values, pre @ g_train.T, rtol=1e-8, atol=1e-12)


def test_query_rank_is_the_truncated_svd_of_preconditioned_queries():
    task, train, queries = CASES["mlp"]()
    curv, pre, g_train = _dense_reference(
        task, train, queries, 1e-2, kind="ekfac", fisher="empirical"
    )
    exact = make_attributor("if-ekfac", task, damping=1e-2).fit(train).attribute(queries).values
    full = make_attributor("if-ekfac", task, damping=1e-2, query_rank=6).fit(train)
    torch.testing.assert_close(full.attribute(queries).values, exact, rtol=RTOL, atol=1e-13)
    rank1 = make_attributor("if-ekfac", task, damping=1e-2, query_rank=1).fit(train)
    mats = []
    for p in curv.to_matrices(pre):
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        mats.append(u[:, :, :1] * s[:, None, :1] @ vh[:, :1, :])
    ref = curv.from_matrices(mats) @ g_train.T
    got = rank1.attribute(queries).values
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(got, exact, rtol=1e-3)


def test_cg_on_the_kfac_operator_equals_its_closed_form_inverse():
    task, train, queries = CASES["mlp"]()
    closed = make_attributor("if-ekfac", task, damping=1e-2).fit(train).attribute(queries)
    cg = make_attributor(
        "if-ekfac", task, damping=1e-2, solver="cg", solver_options={"max_iter": 200}
    )
    torch.testing.assert_close(
        cg.fit(train).attribute(queries).values, closed.values, rtol=1e-7, atol=1e-10
    )


def test_heuristic_damping_equals_its_per_layer_values():
    task, train, queries = CASES["mlp"]()
    heur = make_attributor("if-ekfac", task, damping="heuristic").fit(train)
    values = fit_kfac(task, train, fisher="empirical").layer_damping("heuristic")
    explicit = make_attributor("if-ekfac", task, damping=values).fit(train)
    torch.testing.assert_close(
        heur.attribute(queries).values, explicit.attribute(queries).values, rtol=RTOL, atol=0
    )
    assert heur._contexts[0].fitted.inverse.layer_damping == pytest.approx(values)


def test_store_reuses_factors_for_the_same_data_only(tmp_path, monkeypatch):
    task, train, queries = CASES["mlp"]()
    calls = {"n": 0}
    real = influence.fit_kfac

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(influence, "fit_kfac", counting)
    ref = make_attributor("if-ekfac", task, damping=1e-2).fit(train).attribute(queries).values
    assert calls["n"] == 1
    store = tmp_path / "store"
    make_attributor("if-ekfac", task, damping=1e-2, store=store).fit(train)
    assert calls["n"] == 2
    again = make_attributor("if-ekfac", task, damping=1e-2, store=store).fit(train)
    assert calls["n"] == 2  # factors read back, not refitted
    torch.testing.assert_close(again.attribute(queries).values, ref, rtol=0, atol=0)
    other = (train[0] + 0.5, train[1])  # as many examples, other values
    make_attributor("if-ekfac", task, damping=1e-2, store=store).fit(other)
    assert calls["n"] == 3  # other training data: refitted
    with pytest.raises(StoreError, match="n_train"):  # fewer examples: refused, not mixed
        make_attributor("if-ekfac", task, damping=1e-2, store=store).fit(
            (train[0][:8], train[1][:8])
        )


def test_factored_attribution_never_forms_per_batch_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 96), nn.Linear(96, 10))
    task = Task(model.eval())
    n, batch = 512, 256
    train = (torch.randn(n, 48), torch.randint(0, 10, (n,)))
    queries = (train[0][:4], train[1][:4])
    attr = make_attributor("if-ekfac", task, damping="heuristic", batch_size=batch).fit(train)
    with LargestTensor() as probe:
        attr.attribute(queries)
    biggest_layer = 96 * 97
    assert probe.largest < batch * biggest_layer // 8, (probe.largest, probe.op)
    stored = sum(f.numel() for f in attr._contexts[0].features)
    assert stored < n * task.num_tracked // 30


def test_bad_settings():
    task = Task(mlp())
    with pytest.raises(ConfigError, match="curvature"):
        make_attributor("influence", task, curvature="kfc")
    with pytest.raises(ConfigError, match=r"-0\.5"):
        make_attributor("if-ekfac", task, damping=-0.5)
    with pytest.raises(ConfigError, match="solver='explicit'"):
        make_attributor("if-ekfac", task, damping="heuristic", solver="cg")
    with pytest.raises(ConfigError, match="curvature='kfac'"):
        make_attributor("if-cg", task, damping="heuristic")
    with pytest.raises(ConfigError, match="missing"):
        make_attributor("if-ekfac", task, damping={"0": 1.0})
    with pytest.raises(ConfigError, match="fisher"):
        make_attributor("if-ekfac", task, fisher="sampled")
    with pytest.raises(ConfigError, match="fisher='true' applies only with curvature"):
        make_attributor("if-cg", task, fisher="true")
    with pytest.raises(ConfigError, match="query_rank"):
        make_attributor("if-ekfac", task, query_rank=0)
    with pytest.raises(ConfigError, match="factored"):
        make_attributor("if-ekfac", task, query_rank=2, train_features="gradients")
    with pytest.raises(ConfigError, match="train_features"):
        make_attributor("if-ekfac", task, train_features="factors")
    with pytest.raises(ConfigError, match="factored"):
        make_attributor("if-ekfac", task, train_features="factored", engine="functional")
    with pytest.raises(ConfigError, match="projector"):
        make_attributor("if-ekfac", task, projector="gaussian", proj_dim=8)
    with pytest.raises(ConfigError, match="DataInf"):
        make_attributor("if-ekfac", task, solver="datainf", damping=1e-3)
    with pytest.raises(ModelError, match=r"4.weight.*module_types"):
        make_attributor("if-ekfac", Task(cnn()))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_float32_takes_a_tiny_damping_on_a_rank_deficient_layer(kind):
    """λ far below float32's resolution of the largest eigenvalue is not singular: the
    eigenvalues come from float64 sums; float32 scores follow float64's (here to 1e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(40, 6)
    x[:, 4:] = 0.0  # two dead inputs: the first layer's A factor has zero eigenvalues
    data, queries = (x, torch.randint(0, 3, (40,))), (x[:5], torch.randint(0, 3, (5,)))

    def scores(m: nn.Module, damping: float, dtype: torch.dtype) -> torch.Tensor:
        attr = make_attributor(f"if-{kind}", Task(m), damping=damping, fisher="empirical")
        cast = lambda b: (b[0].to(dtype), b[1])  # noqa: E731
        return attr.fit(cast(data)).attribute(cast(queries)).values.double()

    single = scores(model, 1e-8, torch.float32)
    double = scores(copy.deepcopy(model).double(), 1e-8, torch.float64)
    assert bool(single.isfinite().all())
    torch.testing.assert_close(single, double, rtol=1e-3, atol=1e-3 * float(double.abs().max()))
    with pytest.raises(NumericalError, match="singular with damping 0"):
        scores(model, 0.0, torch.float32)
