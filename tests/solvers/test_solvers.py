"""Inverse-curvature solvers against ``torch.linalg.solve`` on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datatrace.curvature import (
    DenseOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    layer_blocks,
)
from datatrace.errors import ConfigError, DataError, DatatraceError, NumericalError
from datatrace.solvers import (
    SOLVERS,
    ArnoldiSolver,
    CGSolver,
    DataInfSolver,
    ExplicitSolver,
    GramInverse,
    LiSSASolver,
    Solver,
    SpectralInverse,
    make_solver,
)
from datatrace.task import Task

N, DIM = 30, 43


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def case() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    task = Task(model, loss="cross_entropy")
    ggn = GGNOperator(task, (x, y))
    return {
        "task": task,
        "data": (x, y),
        "ggn": ggn,
        "ggn_dense": ggn.to_dense(),
        "hessian_dense": HessianOperator(task, (x, y)).to_dense(),
        "fisher": FisherOperator.from_task(task, (x, y)),
        "b": torch.randn(DIM, 3, generator=gen, dtype=torch.float64),
    }


def _solve(matrix: torch.Tensor, damping: float, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype), b)


@pytest.mark.parametrize(
    "solver",
    [ExplicitSolver(), CGSolver(max_iter=500, rtol=1e-13), ArnoldiSolver(rank=DIM)],
    ids=["explicit", "cg", "arnoldi"],
)
def test_exact_solvers_match_dense_solve(case, solver: Solver) -> None:
    damping = 1e-2  # the GGN has a 6-dim null space (softmax shift): damping makes it invertible
    inv = solver.prepare(DenseOperator(case["ggn_dense"]), damping)
    expected = _solve(case["ggn_dense"], damping, case["b"])
    assert _rel(inv.apply(case["b"]), expected) < 1e-8


@pytest.mark.parametrize(
    "solver", [ExplicitSolver(), ArnoldiSolver(rank=DIM)], ids=["explicit", "arnoldi"]
)
def test_eigen_solvers_handle_indefinite_hessian(case, solver: Solver) -> None:
    hess = case["hessian_dense"]
    damping = 0.05  # A + λI stays indefinite (min eigenvalue ≈ -0.62) but nonsingular
    assert torch.linalg.eigvalsh(hess).min() + damping < 0
    inv = solver.prepare(DenseOperator(hess), damping)
    assert _rel(inv.apply(case["b"]), _solve(hess, damping, case["b"])) < 1e-8


def test_cg_on_matrix_free_ggn(case) -> None:
    inv = CGSolver(max_iter=300, rtol=1e-12).prepare(case["ggn"], 0.1)
    expected = _solve(case["ggn_dense"], 0.1, case["b"])
    assert _rel(inv.apply(case["b"]), expected) < 1e-8
    info = inv.info  # type: ignore[attr-defined]
    assert info.converged and info.relative_residual < 1e-12 and info.iterations <= 300


def test_cg_rejects_indefinite_operator(case) -> None:
    with pytest.raises(NumericalError, match="non-positive curvature"):
        CGSolver(max_iter=500).prepare(DenseOperator(case["hessian_dense"]), 0.0).apply(case["b"])


def test_lissa_converges(case) -> None:
    # With λ = 0.1 the damped GGN has eigenvalues in [0.1, 0.81], so with the default scale
    # s = 1.1 * 0.81 the error contracts by (1 - 0.1 / 0.89) ≈ 0.89 per step: after 300
    # steps it is ~1e-15 of the start, far below the 1e-3 asked here.
    damping = 0.1
    inv = LiSSASolver(depth=300).prepare(DenseOperator(case["ggn_dense"]), damping)
    expected = _solve(case["ggn_dense"], damping, case["b"])
    assert _rel(inv.apply(case["b"]), expected) < 1e-3
    # Too shallow a recursion is visibly wrong: the test can fail.
    shallow = LiSSASolver(depth=3).prepare(DenseOperator(case["ggn_dense"]), damping)
    assert _rel(shallow.apply(case["b"]), expected) > 1e-2


def test_lissa_diverges_with_too_small_scale(case) -> None:
    with pytest.raises(NumericalError, match="diverged"):
        LiSSASolver(depth=2000, scale=0.05).prepare(DenseOperator(case["ggn_dense"]), 0.1).apply(
            case["b"]
        )


def test_arnoldi_low_rank_finds_top_eigenvalues(case) -> None:
    matrix = case["ggn_dense"]
    top = torch.linalg.eigvalsh(matrix).flip(0)[:5]
    inv = ArnoldiSolver(rank=5, n_iter=25).prepare(DenseOperator(matrix), 0.01)
    assert isinstance(inv, SpectralInverse)
    torch.testing.assert_close(inv.eigenvalues, top, rtol=1e-8, atol=0.0)
    # Eigenvectors are orthonormal and are eigenvectors of the matrix.
    u = inv.eigenvectors
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(matrix @ u, u * top, rtol=0, atol=1e-7)
    # Applying to a top eigenvector inverts exactly; applying to the complement gives 0.
    torch.testing.assert_close(inv.apply(u[:, 0]), u[:, 0] / (top[0] + 0.01), rtol=1e-7, atol=1e-9)
    assert float(inv.apply(case["b"][:, 0] - u @ (u.T @ case["b"][:, 0])).norm()) < 1e-6


def test_arnoldi_is_deterministic_and_restarts_on_invariant_subspace() -> None:
    # diag with repeated eigenvalues: the Krylov space of any start vector has dim 3 < 6.
    matrix = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0], dtype=torch.float64))
    b = torch.randn(6, 2, dtype=torch.float64)
    inv = ArnoldiSolver(rank=6, seed=3).prepare(DenseOperator(matrix), 0.5)
    torch.testing.assert_close(inv.apply(b), _solve(matrix, 0.5, b), rtol=1e-10, atol=1e-12)
    again = ArnoldiSolver(rank=6, seed=3).prepare(DenseOperator(matrix), 0.5)
    assert torch.equal(inv.apply(b), again.apply(b))


def _datainf_dense(g: torch.Tensor, damping: float, blocks: list[slice]) -> torch.Tensor:
    out = torch.zeros(g.shape[1], g.shape[1], dtype=g.dtype)
    for s in blocks:
        gb = g[:, s]
        eye = torch.eye(gb.shape[1], dtype=g.dtype)
        out[s, s] = torch.stack(
            [torch.linalg.inv(torch.outer(r, r) + damping * eye) for r in gb]
        ).mean(0)
    return out


@pytest.mark.parametrize("two_blocks", [False, True])
def test_datainf_equals_dense_mean_of_inverses(case, two_blocks: bool) -> None:
    g = case["fisher"].grads
    blocks = layer_blocks(case["task"]) if two_blocks else [slice(0, DIM)]
    op = FisherOperator(g, blocks=blocks if two_blocks else None)
    damping = 0.1
    inv = DataInfSolver().prepare(op, damping)
    expected = _datainf_dense(g, damping, blocks) @ case["b"]
    torch.testing.assert_close(inv.apply(case["b"]), expected, rtol=1e-10, atol=1e-12)
    # It is an approximation: not the inverse of the damped Fisher itself.
    assert _rel(inv.apply(case["b"]), _solve(op.to_dense(), damping, case["b"])) > 1e-3


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_multiple_right_hand_sides_equal_column_solves(case, name: str) -> None:
    settings = {
        "cg": {"max_iter": 500, "rtol": 1e-13},
        "lissa": {"depth": 300},
        "arnoldi": {"rank": 10},
    }
    op = case["fisher"] if name == "datainf" else DenseOperator(case["ggn_dense"])
    inv = make_solver(name, **settings.get(name, {})).prepare(op, 0.1)
    b = case["b"].clone()
    b[:, 1] = 0.0  # a zero column must come back as zero and not stall the others
    together = inv.apply(b)
    assert together.shape == b.shape
    columns = torch.stack([inv.apply(b[:, j]) for j in range(b.shape[1])], dim=1)
    torch.testing.assert_close(together, columns, rtol=1e-9, atol=1e-12)
    assert torch.equal(together[:, 1], torch.zeros(DIM, dtype=torch.float64))
    with pytest.raises(DataError, match="expects shape"):
        inv.apply(torch.zeros(DIM + 1, dtype=torch.float64))


def test_explicit_raises_on_singular_operator(case) -> None:
    with pytest.raises(NumericalError, match="singular"):
        ExplicitSolver().prepare(DenseOperator(case["ggn_dense"]), 0.0)


def test_datainf_refuses_other_operators(case) -> None:
    with pytest.raises(DatatraceError, match=r"FisherOperator.*got DenseOperator"):
        DataInfSolver().prepare(DenseOperator(case["ggn_dense"]), 0.1)
    with pytest.raises(ConfigError, match="damping > 0"):
        DataInfSolver().prepare(case["fisher"], 0.0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: CGSolver(max_iter=0), "max_iter must be an integer >= 1; got 0"),
        (lambda: CGSolver(rtol=-1.0), "rtol must be a finite number > 0; got -1.0"),
        (lambda: CGSolver(max_iter=True), "max_iter"),
        (lambda: LiSSASolver(depth=0), "depth must be an integer >= 1"),
        (lambda: LiSSASolver(scale=0.0), "scale must be a finite number > 0"),
        (lambda: LiSSASolver(repeats=0), "repeats"),
        (lambda: ArnoldiSolver(rank=0), "rank must be an integer >= 1"),
        (lambda: ArnoldiSolver(rank=5, n_iter=3), "n_iter must be an integer >= 5; got 3"),
        (lambda: make_solver("newton"), "unknown solver 'newton'.*'arnoldi', 'cg', 'datainf'"),
        (lambda: make_solver("cg", depth=3), "bad settings"),
    ],
)
def test_bad_settings_raise_config_error(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


def test_bad_prepare_arguments(case) -> None:
    op = DenseOperator(case["ggn_dense"])
    with pytest.raises(ConfigError, match="damping must be a finite number >= 0; got -1"):
        CGSolver().prepare(op, -1.0)
    with pytest.raises(ConfigError, match="rank=50 exceeds the operator's dim 43"):
        ArnoldiSolver(rank=50).prepare(op, 0.1)
    with pytest.raises(ConfigError, match="LinearOperator"):
        ExplicitSolver().prepare(case["ggn_dense"], 0.1)  # type: ignore[arg-type]


def test_registry_and_config_round_trip() -> None:
    assert set(SOLVERS) == {"explicit", "cg", "lissa", "arnoldi", "datainf"}
    for name, cls in SOLVERS.items():
        solver = make_solver(name)
        assert type(solver) is cls and solver.name == name
        assert make_solver(name, **solver.config()) == solver
    assert LiSSASolver(depth=7, scale=2.0).config() == {
        "depth": 7,
        "scale": 2.0,
        "repeats": 1,
        "power_iter": 20,
    }


def test_arnoldi_float32_drops_null_ritz_values_instead_of_calling_the_curvature_singular():
    # A rank-10 PSD matrix asked for 40 eigenpairs with tiny damping: in float32 the 30 null
    # Ritz values are rounding noise near -λ; they must be dropped, not inverted or refused.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 10, generator=gen, dtype=torch.float64)
    m = a @ a.T
    b = m[:, 0]
    ref = torch.linalg.solve(m + 1e-4 * torch.eye(200, dtype=torch.float64), b)
    inv = ArnoldiSolver(rank=40).prepare(DenseOperator(m.float()), damping=1e-4)
    assert inv.eigenvalues.shape == (10,)
    torch.testing.assert_close(inv.apply(b.float()).double(), ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("n", [7, 80], ids=["n<dim", "n>dim"])
@pytest.mark.parametrize("form", ["auto", "primal", "dual", "eigh"])
def test_explicit_fisher_forms_match_dense_solve(n: int, form: str) -> None:
    # Fisher (1/n) GᵀG of rank min(n, dim): every form equals a dense solve to 1e-10, so the
    # Woodbury (dual) path is exact, not an approximation.
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(n, 25, generator=gen, dtype=torch.float64)
    b = torch.randn(25, 4, generator=gen, dtype=torch.float64)
    damping = 1e-3
    inv = ExplicitSolver(form=form).prepare(FisherOperator(g), damping)  # type: ignore[arg-type]
    expected = _solve(g.T @ g / n, damping, b)
    assert _rel(inv.apply(b), expected) < 1e-10
    if form == "auto":
        assert isinstance(inv, GramInverse) and inv.form == ("dual" if n < 25 else "primal")
    if form == "eigh":
        assert isinstance(inv, SpectralInverse)


def test_gram_inverse_float32_rows_return_float32_close_to_float64() -> None:
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(30, 200, generator=gen, dtype=torch.float64)
    b = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    ref = _solve(g.T @ g, 0.5, b)
    # float32 products of G: the error bound of any float32 solve is cond x eps (≈ 9e-5 here)
    bound = float(torch.linalg.cond(g.T @ g + 0.5 * torch.eye(200, dtype=torch.float64)))
    bound *= torch.finfo(torch.float32).eps
    for form in ("primal", "dual"):
        out = GramInverse(g.float(), 0.5, form=form).apply(b.float())  # type: ignore[arg-type]
        assert out.dtype == torch.float32
        assert _rel(out.double(), ref) < bound


def test_gram_inverse_and_explicit_forms_refuse_bad_input(case) -> None:
    g = torch.randn(5, 8, dtype=torch.float64)
    with pytest.raises(ConfigError, match="damping"):
        GramInverse(g, 0.0)
    with pytest.raises(ConfigError, match="form"):
        GramInverse(g, 1.0, form="svd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\(n, dim\)"):
        GramInverse(g[0], 1.0)
    with pytest.raises(ConfigError, match="form"):
        ExplicitSolver(form="qr")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="FisherOperator and damping > 0"):
        ExplicitSolver(form="dual").prepare(DenseOperator(case["ggn_dense"]), 0.1)
    with pytest.raises(ConfigError, match="FisherOperator and damping > 0"):
        ExplicitSolver(form="primal").prepare(FisherOperator(g), 0.0)
    # a singular undamped Fisher still gets the eigendecomposition's clear error
    with pytest.raises(NumericalError, match="singular"):
        ExplicitSolver().prepare(FisherOperator(g), 0.0)


def test_gram_inverse_from_gram_factors_a_kernel_with_zero_damping_and_keeps_it() -> None:
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(12, 4, dtype=torch.float64, generator=gen)
    kernel = phi.T @ phi
    before = kernel.clone()
    b = torch.randn(4, 2, dtype=torch.float64, generator=gen)
    for damping in (0.0, 0.3):
        inv = GramInverse.from_gram(kernel, damping)
        expected = torch.linalg.solve(kernel + damping * torch.eye(4, dtype=b.dtype), b)
        torch.testing.assert_close(inv.apply(b), expected, rtol=1e-10, atol=1e-12)
        assert inv.form == "primal" and inv.factor.dtype == torch.float64
    assert torch.equal(kernel, before)  # factored on a copy
    with pytest.raises(NumericalError, match="not positive definite"):
        GramInverse.from_gram(-kernel, 0.0)
    with pytest.raises(ConfigError):
        GramInverse.from_gram(phi, 1.0)


def test_inverse_eigenvalues_and_dense_spectrum() -> None:
    from datatrace.solvers import DenseSpectrum, inverse_eigenvalues

    torch.testing.assert_close(
        inverse_eigenvalues(torch.tensor([[1.0, 3.0]], dtype=torch.float64), 1.0, "fc"),
        torch.tensor([[0.5, 0.25]], dtype=torch.float64),
    )
    with pytest.raises(NumericalError, match="'fc' is singular"):
        inverse_eigenvalues(torch.tensor([0.0, 3.0]), 0.0, "fc")
    m = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float32)
    spec = DenseSpectrum(m)
    v = torch.tensor([[1.0, 0.0]])
    got = spec.apply(v, lambda lam: 1.0 / (lam + 1.0))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.linalg.solve(m + torch.eye(2), v.T).T)
    torch.testing.assert_close(spec.inverse(1.0).apply(v.T.double()).T.float(), got)
