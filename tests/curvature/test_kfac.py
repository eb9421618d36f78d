"""K-FAC / EK-FAC against the dense GGN and empirical Fisher, where theory says they agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datatrace.curvature import FisherOperator, GGNOperator, KFACCurvature, fit_kfac
from datatrace.errors import ConfigError, DataError, ModelError, NumericalError
from datatrace.solvers import CGSolver
from datatrace.store import Store
from datatrace.task import Task
from tests.models import classification_data, cnn, mlp, tiny_lm

RTOL, ATOL = 1e-10, 1e-12


def _blocks(curv: KFACCurvature, dense: torch.Tensor) -> list[torch.Tensor]:
    assert curv.blocks is not None
    return [dense[b, b] for b in curv.blocks]


def _lm_data(n: int = 6, t: int = 5, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, -2:] = 0  # right padding on every other sequence
    return {"input_ids": ids, "attention_mask": mask}


def _linear_tasks() -> list[tuple[Task, object]]:
    lm = Task(tiny_lm(), loss="lm", module_types=(nn.Linear,))
    conv = Task(cnn(), module_types=(nn.Conv2d, nn.Linear))
    g = torch.Generator().manual_seed(2)
    images = (torch.randn(7, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(7) % 4)
    return [(Task(mlp()), classification_data(n=9)), (conv, images), (lm, _lm_data())]


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_one_example_exact_expectation_equals_ggn_blocks(kind):
    # One example, one position: D = g aᵀ, so E_y[vec D vec Dᵀ] = E_y[g gᵀ] ⊗ a aᵀ exactly.
    task = Task(mlp())
    x, y = classification_data(n=1)
    curv = fit_kfac(task, (x, y), kind=kind, fisher="exact")
    ggn = GGNOperator(task, (x, y)).to_dense()
    for approx, exact in zip(_blocks(curv, curv.matrix()), _blocks(curv, ggn)):
        torch.testing.assert_close(approx, exact, rtol=RTOL, atol=ATOL)


def test_deep_linear_network_squared_error_equals_ggn_blocks():
    # Linear layers and mse: the output gradients J_lᵀ e_k do not depend on the example, so each
    # diagonal block of the GGN is exactly G ⊗ A for any number of examples (not the
    # off-diagonal blocks, which K-FAC drops).
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 2)).double().eval()
    )
    task = Task(model, loss="mse")
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(11, 4, generator=g, dtype=torch.float64),) * 1 + (
        torch.randn(11, 2, generator=g, dtype=torch.float64),
    )
    ggn = GGNOperator(task, data).to_dense()
    for kind in ("kfac", "ekfac"):
        curv = fit_kfac(task, data, kind=kind, fisher="exact", batch_size=4)
        for approx, exact in zip(_blocks(curv, curv.matrix()), _blocks(curv, ggn)):
            torch.testing.assert_close(approx, exact, rtol=RTOL, atol=ATOL)
    # ...while the full matrices differ (the network couples the layers).
    assert not torch.allclose(curv.matrix(), ggn, atol=1e-6)


def test_one_example_empirical_equals_empirical_fisher_blocks():
    task = Task(mlp())
    x, y = classification_data(n=1, seed=4)
    curv = fit_kfac(task, (x, y), kind="kfac", fisher="empirical")
    emp = FisherOperator.from_task(task, (x, y)).to_dense()
    for approx, exact in zip(_blocks(curv, curv.matrix()), _blocks(curv, emp)):
        torch.testing.assert_close(approx, exact, rtol=RTOL, atol=ATOL)


def test_ekfac_closer_to_ggn_than_kfac():
    task = Task(mlp())
    data = classification_data(n=20)
    ggn = GGNOperator(task, data).to_dense()
    errs = {}
    for kind in ("kfac", "ekfac"):
        curv = fit_kfac(task, data, kind=kind, fisher="exact")
        approx = _blocks(curv, curv.matrix())
        errs[kind] = [float((a - e).norm()) for a, e in zip(approx, _blocks(curv, ggn))]
    assert all(e < k for e, k in zip(errs["ekfac"], errs["kfac"])), errs


@pytest.mark.parametrize("case", [0, 1, 2], ids=["mlp", "conv", "lm-masked"])
def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_its_basis(case):
    # EK-FAC's defining property for every layer type (positions, patches, padding): in the
    # Kronecker eigenbasis its eigenvalues are the diagonal of the empirical Fisher block.
    task, data = _linear_tasks()[case]
    curv = fit_kfac(task, data, kind="ekfac", fisher="empirical", batch_size=4)
    emp = FisherOperator.from_task(task, data).to_dense()
    for layer, block in zip(curv.layers, _blocks(curv, emp)):
        o, i = layer.shape
        eye = torch.eye(o * i, dtype=torch.float64).reshape(o * i, o, i)
        basis = layer.unrotate(eye)  # the eigenvectors, as (O, I') gradient matrices
        flat = curv.from_matrices(
            [
                basis if lay is layer else torch.zeros(o * i, *lay.shape, dtype=torch.float64)
                for lay in curv.layers
            ]
        )
        assert curv.blocks is not None
        b = curv.blocks[curv.layers.index(layer)]
        u = flat[:, b]
        diag = ((u @ block) * u).sum(1).reshape(o, i)
        torch.testing.assert_close(layer.eigenvalues, diag, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [0, 1, 2], ids=["mlp", "conv", "lm-masked"])
@pytest.mark.parametrize("damping", [1e-3, "heuristic"])
def test_inverse_equals_dense_solve_of_own_matrix(case, damping):
    task, data = _linear_tasks()[case]
    curv = fit_kfac(task, data, kind="ekfac", batch_size=4)
    inv = curv.inverse(damping)
    lam = torch.cat(
        [
            torch.full((b.stop - b.start,), inv.layer_damping[m], dtype=torch.float64)
            for m, b in zip(curv.modules, curv.blocks or [])
        ]
    )
    v = torch.randn(curv.dim, 3, dtype=torch.float64)
    ref = torch.linalg.solve(curv.matrix() + torch.diag(lam), v)
    torch.testing.assert_close(inv.apply(v), ref, rtol=1e-8, atol=1e-10)
    # the operator is symmetric positive semi-definite, so CG on it reaches the same answer
    if damping != "heuristic" and case == 0:
        cg = CGSolver(max_iter=500, rtol=1e-12).prepare(curv, damping)
        torch.testing.assert_close(cg.apply(v), ref, rtol=1e-7, atol=1e-9)


def test_heuristic_damping_is_tenth_of_mean_eigenvalue_per_layer():
    curv = fit_kfac(Task(mlp()), classification_data(n=9))
    values = curv.layer_damping("heuristic")
    for layer in curv.layers:
        assert values[layer.module] == pytest.approx(0.1 * float(layer.eigenvalues.mean()))
    v = torch.randn(curv.dim, dtype=torch.float64)
    torch.testing.assert_close(curv.inverse("heuristic").apply(v), curv.inverse(values).apply(v))


def test_padding_is_ignored():
    # Tokens under attention_mask = 0 sit at the end of causal sequences: changing them
    # changes neither the loss nor, with the mask respected, the factors.
    task = Task(tiny_lm(), loss="lm", module_types=(nn.Linear,))
    data = _lm_data()
    other = dict(data)
    ids = data["input_ids"].clone()
    ids[data["attention_mask"] == 0] = (ids[data["attention_mask"] == 0] + 3) % 11
    other["input_ids"] = ids
    a = fit_kfac(task, data, kind="ekfac", fisher="true", batch_size=4)
    b = fit_kfac(task, other, kind="ekfac", fisher="true", batch_size=2)
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.a_factor, lb.a_factor, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(la.g_factor, lb.g_factor, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(la.eigenvalues, lb.eigenvalues, rtol=RTOL, atol=ATOL)


def test_true_fisher_samples_from_the_model():
    # Many copies of one example: each draws its own label, so G approaches the exact
    # expectation (Monte-Carlo error ~ 1/sqrt(n)); the training labels would not.
    task = Task(mlp())
    x, y = classification_data(n=1)
    n = 3000
    data = (x.expand(n, -1).clone(), y.expand(n).clone())
    exact = fit_kfac(task, (x, y), kind="kfac", fisher="exact")
    true = fit_kfac(task, data, kind="kfac", fisher="true", batch_size=1000)
    emp = fit_kfac(task, (x, y), kind="kfac", fisher="empirical")
    for le, lt, lm in zip(exact.layers, true.layers, emp.layers):
        err = float((lt.g_factor - le.g_factor).norm() / le.g_factor.norm())
        assert err < 0.1, err
        assert float((lm.g_factor - le.g_factor).norm() / le.g_factor.norm()) > 0.3
    again = fit_kfac(task, data, kind="kfac", fisher="true", batch_size=701)
    torch.testing.assert_close(again.layers[0].g_factor, true.layers[0].g_factor)
    other_seed = fit_kfac(task, data, kind="kfac", fisher="true", seed=1, batch_size=1000)
    assert not torch.equal(other_seed.layers[0].g_factor, true.layers[0].g_factor)


@pytest.mark.parametrize("loss", ["mse", "lm"])
def test_true_fisher_other_losses_are_deterministic(loss):
    if loss == "mse":
        task = Task(mlp(), loss="mse")
        data = (classification_data(n=8)[0], torch.randn(8, 3, dtype=torch.float64))
    else:
        task, data = Task(tiny_lm(), loss="lm", module_types=(nn.Linear,)), _lm_data()
    a = fit_kfac(task, data, fisher="true", batch_size=3)
    b = fit_kfac(task, data, fisher="true", batch_size=8)
    emp = fit_kfac(task, data, fisher="empirical")
    for la, lb, le in zip(a.layers, b.layers, emp.layers):
        torch.testing.assert_close(la.eigenvalues, lb.eigenvalues, rtol=1e-10, atol=1e-14)
        assert not torch.allclose(la.g_factor, le.g_factor)


def test_store_round_trip(tmp_path):
    task = Task(cnn(), module_types=(nn.Conv2d, nn.Linear))
    _, data, *_ = _linear_tasks()[1]
    curv = fit_kfac(task, data)
    store = Store(tmp_path, config={"kind": "ekfac"}, fingerprints={})
    for name, t in curv.to_arrays().items():
        store.write_array(name, t)
    arrays = {name: store.read_array(name) for name in curv.to_arrays()}
    back = KFACCurvature.from_arrays(task, arrays, kind="ekfac", fisher="true")
    torch.testing.assert_close(back.matrix(), curv.matrix(), rtol=0, atol=0)


def test_bad_input():
    task, data = Task(mlp()), classification_data(n=4)
    with pytest.raises(ConfigError, match="kind"):
        fit_kfac(task, data, kind="shampoo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fisher"):
        fit_kfac(task, data, fisher="sampled")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        fit_kfac(task, data, batch_size=0)
    curv = fit_kfac(task, data)
    with pytest.raises(ConfigError, match="-1"):
        curv.inverse(-1.0)
    with pytest.raises(ConfigError, match="heuristic"):
        curv.inverse("auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="missing"):
        curv.inverse({"0": 1.0})
    with pytest.raises(NumericalError, match="increase damping"):
        fit_kfac(task, classification_data(n=1)).inverse(0.0)
    with pytest.raises(ModelError, match=r"\['4.weight', '4.bias'\].*module_types"):
        fit_kfac(Task(cnn()), (torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])))
    with pytest.raises(ModelError, match=r"emb\.weight"):
        fit_kfac(Task(tiny_lm(), loss="lm"), _lm_data())
    with pytest.raises(ConfigError, match="fisher='empirical'"):
        fit_kfac(Task(mlp(), loss=lambda o, y: (o - 1).pow(2).sum(1)), data)
    with pytest.raises(DataError):
        fit_kfac(task, (torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0).long()))


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_spectral_equals_rotate_scale_unrotate(k):
    # the fused product reuses its buffers: with one matrix (k = 1) a reshape would alias
    # them, and a strided input must be read, not overwritten
    task, data = _linear_tasks()[0]
    curv = fit_kfac(task, data, kind="ekfac", batch_size=4)
    g = torch.Generator().manual_seed(k)
    for layer in curv.layers:
        o, i = layer.shape
        mats = torch.randn(o, k, i, generator=g, dtype=torch.float64).transpose(0, 1)
        before = mats.clone()
        mult = torch.rand(o, i, generator=g, dtype=torch.float64) + 0.5
        got = layer.spectral(mats, mult)
        assert got.is_contiguous() and got.shape == (k, o, i)
        torch.testing.assert_close(
            got, layer.unrotate(mult * layer.rotate(mats)), rtol=RTOL, atol=ATOL
        )
        assert torch.equal(mats, before)
