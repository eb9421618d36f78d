"""Curvature operators against dense float64 references built with ``torch.func``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from datatrace.curvature import (
    DenseOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    layer_blocks,
)
from datatrace.errors import ConfigError, DataError
from datatrace.task import Task

N, D_IN, HIDDEN, C = 30, 4, 5, 3
RTOL, ATOL = 1e-10, 1e-13


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double().eval()


@pytest.fixture
def case() -> tuple[Task, tuple[torch.Tensor, torch.Tensor]]:
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return Task(model, loss="cross_entropy"), (x, y)


def _flat_fn(task: Task, fn):  # type: ignore[no-untyped-def]
    """``fn(model_output_under(theta))`` as a function of the flat tracked-parameter vector."""
    params = task.tracked_params()
    shapes = [p.shape for p in params.values()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def of_theta(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes])
        state = {n: c.reshape(s) for n, c, s in zip(params, chunks, shapes)}
        return fn(lambda x: functional_call(task.model, state, (x,)))

    return of_theta, theta0


def test_hessian_operator_equals_dense_hessian(case) -> None:
    task, (x, y) = case
    loss, theta0 = _flat_fn(task, lambda f: nn.functional.cross_entropy(f(x), y))
    expected = hessian(loss)(theta0)
    for batch_size in (7, 64):  # accumulation over uneven batches must not change the mean
        op = HessianOperator(task, (x, y), batch_size=batch_size)
        assert op.dim == theta0.numel() == 43
        torch.testing.assert_close(op.to_dense(chunk_size=10), expected, rtol=RTOL, atol=ATOL)
    # The MLP's Hessian is indefinite here, unlike the GGN below.
    assert torch.linalg.eigvalsh(expected).min() < 0


def test_ggn_operator_equals_dense_jt_hz_j(case) -> None:
    task, (x, y) = case
    outputs, theta0 = _flat_fn(task, lambda f: f(x))
    jac = jacrev(outputs)(theta0)  # (N, C, dim)
    p = torch.softmax(outputs(theta0), dim=1)
    hz = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # cross-entropy Hessian in logits
    expected = torch.einsum("ncd,nce,nef->df", jac, hz, jac) / N
    op = GGNOperator(task, (x, y), batch_size=8)
    dense = op.to_dense()
    torch.testing.assert_close(dense, expected, rtol=RTOL, atol=ATOL)
    assert torch.linalg.eigvalsh(dense).min() > -1e-12  # PSD, unlike the Hessian


def test_ggn_of_cross_entropy_is_true_fisher(case) -> None:
    # E_{y ~ p(.|x)} g_y g_yᵀ summed over classes with weights p_c, averaged over examples.
    task, (x, y) = case
    p = torch.softmax(task.model(x), dim=1).detach()
    fisher = torch.zeros(43, 43, dtype=torch.float64)
    for c in range(C):
        g = FisherOperator.from_task(task, (x, torch.full_like(y, c))).grads
        fisher += (g * p[:, c : c + 1]).T @ g / N
    torch.testing.assert_close(GGNOperator(task, (x, y)).to_dense(), fisher, rtol=RTOL, atol=ATOL)


def test_ggn_equals_hessian_for_linear_model_with_mse() -> None:
    torch.manual_seed(0)
    model = nn.Linear(D_IN, C).double().eval()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    y = torch.randn(N, C, dtype=torch.float64)
    task = Task(model, loss="mse")
    ggn = GGNOperator(task, (x, y), batch_size=7).to_dense()
    hess = HessianOperator(task, (x, y), batch_size=7).to_dense()
    loss, theta0 = _flat_fn(task, lambda f: 0.5 * ((f(x) - y) ** 2).sum(1).mean())
    torch.testing.assert_close(ggn, hess, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hess, hessian(loss)(theta0), rtol=RTOL, atol=ATOL)


def test_fisher_operator_equals_gram_of_rows() -> None:
    g = torch.randn(N, 7, dtype=torch.float64)
    op = FisherOperator(g)
    v = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(op.to_dense(), g.T @ g / N, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(op.matvec(v), g.T @ g @ v / N, rtol=RTOL, atol=ATOL)
    # The generic identity-product path agrees with the shortcut.
    torch.testing.assert_close(LinearOperator.to_dense(op), g.T @ g / N, rtol=RTOL, atol=ATOL)


def test_fisher_from_task_matches_autograd_loop(case) -> None:
    task, (x, y) = case
    op = FisherOperator.from_task(task, (x, y), batch_size=8, blocks=layer_blocks(task))
    rows = []
    for i in range(N):
        loss = nn.functional.cross_entropy(task.model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(task.tracked_params().values()))
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    g = torch.stack(rows)
    torch.testing.assert_close(op.grads, g, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(op.to_dense(), g.T @ g / N, rtol=RTOL, atol=ATOL)
    assert op.blocks == [slice(0, 25), slice(25, 43)]


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_matvec_shapes_and_columns(case, kind: str) -> None:
    task, data = case
    op = (HessianOperator if kind == "hessian" else GGNOperator)(task, data, batch_size=16)
    v = torch.randn(op.dim, 4, dtype=torch.float64)
    out = op.matvec(v)
    assert out.shape == (op.dim, 4)
    cols = torch.stack([op.matvec(v[:, j]) for j in range(4)], dim=1)
    torch.testing.assert_close(out, cols, rtol=RTOL, atol=ATOL)
    assert op.matvec(v[:, 0]).shape == (op.dim,)
    with pytest.raises(DataError, match=r"\(43,\) or \(43, k\)"):
        op.matvec(torch.randn(42, dtype=torch.float64))


def test_operator_reads_the_given_state(case) -> None:
    task, data = case
    state = {k: v + 0.1 for k, v in task.state().items()}
    moved = HessianOperator(task, data, state=state).to_dense()
    here = HessianOperator(task, data).to_dense()
    assert not torch.allclose(moved, here)
    with torch.no_grad():
        for name, p in task.model.named_parameters():
            p.copy_(state[name])
    torch.testing.assert_close(HessianOperator(task, data).to_dense(), moved, rtol=RTOL, atol=ATOL)


def test_dense_operator_and_bad_inputs() -> None:
    m = torch.randn(5, 5, dtype=torch.float64)
    op = DenseOperator(m, blocks=[slice(0, 2), slice(2, 5)])
    v = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), m @ v, rtol=RTOL, atol=ATOL)
    with pytest.raises(ConfigError, match="square"):
        DenseOperator(torch.randn(3, 4))
    with pytest.raises(ConfigError, match="partitioning"):
        DenseOperator(m, blocks=[slice(0, 2), slice(3, 5)])
    with pytest.raises(ConfigError, match="cover"):
        FisherOperator(torch.randn(4, 5), blocks=[slice(0, 2)])
    with pytest.raises(ConfigError, match="batch_size"):
        HessianOperator(Task(_mlp()), (torch.randn(2, D_IN), torch.tensor([0, 1])), batch_size=0)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "dense", "kernel", "callable"])
def test_every_operator_inverse_and_solve_equal_linalg_solve(case, kind: str) -> None:
    from datatrace.curvature import CallableOperator, KernelOperator
    from datatrace.solvers import CGSolver

    task, data = case
    fisher = FisherOperator.from_task(task, data)
    ops: dict[str, LinearOperator] = {
        "hessian": HessianOperator(task, data),
        "ggn": GGNOperator(task, data),
        "fisher": fisher,
        "dense": DenseOperator(fisher.to_dense()),
        "kernel": KernelOperator(fisher.grads.T @ fisher.grads),
        "callable": CallableOperator(fisher.matvec, fisher.dim, fisher.dtype, torch.device("cpu")),
    }
    op, damping = ops[kind], 0.5
    b = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.solve(op.to_dense() + damping * torch.eye(op.dim, dtype=b.dtype), b)
    torch.testing.assert_close(op.inverse(damping).apply(b), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.solve(b[:, 0], damping), expected[:, 0], rtol=1e-8, atol=1e-10)
    if kind in ("ggn", "fisher", "kernel"):  # PSD: CG through the same method
        got = op.inverse(damping, CGSolver(max_iter=500, rtol=1e-12)).apply(b)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
