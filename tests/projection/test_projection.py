"""Random projections: exact block-wise identities, determinism, JL bounds and unbiasedness."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from datatrace.errors import ConfigError, NotFittedError
from datatrace.gradients import LayerFactors, PerSampleGrads, compute_per_sample_grads
from datatrace.projection import (
    FactoredProjector,
    GaussianProjector,
    IdentityProjector,
    Projector,
    RademacherProjector,
    SJLTProjector,
    make_projector,
)
from datatrace.task import Task

F64 = torch.float64
Case = Callable[[], tuple[Task, tuple[torch.Tensor, torch.Tensor]]]
N_SEEDS = 400


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tensors here are tiny: intra-op threads only add barrier waits on a busy 2-core runner.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _chunked(kind: str, k: int = 12, seed: int = 0, member: int = 0, **kw: int) -> Projector:
    return make_projector(kind, k, seed=seed, member=member, block_rows=7, **kw)


CHUNKED = [("gaussian", {}), ("rademacher", {}), ("sjlt", {}), ("sjlt", {"nnz": 3})]
CHUNKED_IDS = ["gaussian", "rademacher", "sjlt1", "sjlt3"]


def _mlp_case() -> tuple[Task, tuple[torch.Tensor, torch.Tensor]]:
    # LayerNorm is not hookable: the hook engine mixes factors and dense gradients.
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    model = model.to(F64).eval()
    return Task(model), (torch.randn(6, 5, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2]))


def _seq_case() -> tuple[Task, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64).eval()
    return Task(model, loss="mse"), (
        torch.randn(3, 5, 4, dtype=F64),
        torch.randn(3, 5, 2, dtype=F64),
    )


def _conv_case() -> tuple[Task, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    )
    return Task(model.to(F64).eval()), (torch.randn(3, 2, 5, 5, dtype=F64), torch.tensor([0, 3, 1]))


def _unit_pair(n: int, rho: float, seed: int = 1) -> torch.Tensor:
    """Rows x, y: unit vectors with <x, y> = rho."""
    gen = torch.Generator().manual_seed(seed)
    x, z = torch.randn(2, n, generator=gen, dtype=F64)
    x = x / x.norm()
    z = z - (z @ x) * x
    return torch.stack([x, rho * x + math.sqrt(1 - rho**2) * z / z.norm()])


def _jl_bound(eps: float, k: int) -> float:
    """P(|<Px,Py> - <x,y>| > eps) for unit x, y: the norm bound 2 exp(-(eps^2 - eps^3) k / 4)
    applied to x + y and x - y (polarisation, ||x+y||^2 + ||x-y||^2 = 4), union-bounded."""
    return 4 * math.exp(-(eps**2 - eps**3) * k / 4)


# ----------------------------------------------------------------------------- exact identities
@pytest.mark.parametrize(("kind", "kw"), CHUNKED, ids=CHUNKED_IDS)
def test_blockwise_projection_equals_whole(kind: str, kw: dict[str, int]) -> None:
    x = torch.randn(3, 50, dtype=F64)
    whole = _chunked(kind, **kw).project_flat(x)
    cuts = [0, 4, 5, 19, 33, 50]  # straddle the 7-row chunks
    proj = _chunked(kind, **kw)
    parts = sum(proj.project_flat(x[:, a:b], offset=a) for a, b in itertools.pairwise(cuts))
    assert isinstance(parts, torch.Tensor) and _close(parts, whole)
    # The matrix (read off the identity) is what multiplies x.
    mat = proj.project_flat(torch.eye(50, dtype=F64))
    assert _close(x @ mat, whole)
    for budget in (0, 1500):  # nothing cached; only the first chunks cached
        small = make_projector(kind, 12, block_rows=7, cache_bytes=budget, **kw)
        assert _close(small.project_flat(x), whole) and _close(small.project_flat(x), whole)
        assert small._cache.nbytes <= budget


def test_matrix_entries_have_the_documented_law() -> None:
    k, n = 12, 40
    rad = RademacherProjector(k, block_rows=9).project_flat(torch.eye(n, dtype=F64))
    assert _close(rad.abs(), torch.full_like(rad, 1 / math.sqrt(k)))
    sjlt = SJLTProjector(k, nnz=3, block_rows=9).project_flat(torch.eye(n, dtype=F64))
    for block in sjlt.split(k // 3, dim=1):  # exactly one +-1/sqrt(nnz) per coordinate and block
        assert torch.equal((block != 0).sum(1), torch.ones(n, dtype=torch.long))
        assert _close(block.abs().sum(1), torch.full((n,), 1 / math.sqrt(3), dtype=F64))
    gauss = GaussianProjector(k, block_rows=9).project_flat(torch.eye(400, dtype=F64))
    assert abs(gauss.var().item() * k - 1) < 0.1


@pytest.mark.parametrize("engine", ["hooks", "functional"])
@pytest.mark.parametrize(("kind", "kw"), CHUNKED, ids=CHUNKED_IDS)
def test_project_psg_equals_projecting_flat_gradients(
    engine: str, kind: str, kw: dict[str, int]
) -> None:
    task, batch = _mlp_case()
    psg = compute_per_sample_grads(task, batch, engine=engine)
    if engine == "hooks":
        assert psg.factors and psg.dense
    proj = _chunked(kind, **kw)
    got = proj.project(psg)
    assert got.shape == (6, 12) and got.dtype == F64
    assert _close(got, proj.project_flat(psg.flat()))


def test_dtype_follows_input() -> None:
    x = torch.randn(2, 30, dtype=F64)
    for proj in (GaussianProjector(8), RademacherProjector(8), SJLTProjector(8)):
        assert proj.project_flat(x.float()).dtype == torch.float32
    # sign matrices do not depend on the generation dtype
    rad = RademacherProjector(8)
    assert torch.allclose(
        rad.project_flat(x.float()).double(), rad.project_flat(x), rtol=1e-5, atol=1e-6
    )


def test_identity_projector() -> None:
    task, batch = _mlp_case()
    psg = compute_per_sample_grads(task, batch)
    proj = IdentityProjector()
    with pytest.raises(NotFittedError):
        _ = proj.proj_dim
    assert _close(proj.project(psg), psg.flat())
    assert proj.proj_dim == task.num_tracked == proj.output_dim(psg)
    flat = psg.flat()
    parts = proj.project_flat(flat[:, :10]) + proj.project_flat(flat[:, 10:], offset=10)
    assert _close(parts, flat)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "factored"])
def test_seed_and_member_determine_the_projection(kind: str) -> None:
    task, batch = _mlp_case()
    psg = compute_per_sample_grads(task, batch)

    def run(seed: int, member: int) -> torch.Tensor:
        return make_projector(kind, 16, seed=seed, member=member).project(psg)

    base = run(3, 1)
    assert torch.equal(base, run(3, 1))
    assert not torch.allclose(base, run(3, 2))
    assert not torch.allclose(base, run(4, 1))


# ----------------------------------------------------------------------------- JL and bias
def _inner_products(kind: str, k: int, xy: torch.Tensor, **kw: int) -> torch.Tensor:
    """(N_SEEDS, 3): <Px, Py>, <Px, Px>, <Py, Py> over independent seeds."""
    rows = []
    for seed in range(N_SEEDS):
        proj = make_projector(kind, k, seed=seed, block_rows=xy.shape[1], **kw)
        p = proj.project_flat(xy)
        rows.append(torch.stack([p[0] @ p[1], p[0] @ p[0], p[1] @ p[1]]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_inner_products_preserved_jl(kind: str) -> None:
    k, n, rho, eps = 200, 128, 0.6, 0.3
    xy = _unit_pair(n, rho)
    ips = _inner_products(kind, k, xy)
    true = torch.tensor([rho, 1.0, 1.0], dtype=F64)
    # Chebyshev for CountSketch: Var <= (|x|^2 |y|^2 + <x,y>^2) / k <= 2 / k.
    bound = _jl_bound(eps, k) if kind != "sjlt" else 2 / (k * eps**2)
    assert bound < 0.2
    fail_rate = ((ips - true).abs() > eps).double().mean(0)
    assert (fail_rate <= bound).all(), (fail_rate, bound)
    # Exact variance of <Px, Py>: (|x|^2|y|^2 + <x,y>^2 - c * sum_i x_i^2 y_i^2) / k with c = 0
    # for Gaussian entries and c = 2 for sign matrices and CountSketch.
    c = 0.0 if kind == "gaussian" else 2.0
    var = (1 + rho**2 - c * (xy[0] ** 2 * xy[1] ** 2).sum().item()) / k
    mean = ips[:, 0].mean().item()
    assert abs(mean - rho) < 5 * math.sqrt(var / N_SEEDS)  # unbiased, 5 standard errors
    assert 0.7 < ips[:, 0].var().item() / var < 1.3  # seeds really give independent matrices


def test_sjlt_nnz_unbiased() -> None:
    k, rho = 120, -0.4
    xy = _unit_pair(128, rho, seed=2)
    ips = _inner_products("sjlt", k, xy, nnz=4)
    var_bound = (1 + rho**2) / k  # block construction with k % nnz == 0: as for CountSketch
    assert abs(ips[:, 0].mean().item() - rho) < 5 * math.sqrt(var_bound / N_SEEDS)
    assert ips[:, 0].var().item() < 1.3 * var_bound


def test_factored_rank_one_jl_and_unbiased() -> None:
    # T = 1: G = g a^T, and <P G_x, P G_y> = u v with u = <P_g^T g_x, P_g^T g_y>,
    # v = <P_a^T a_x, P_a^T a_y>, u0 v0 the truth. If |u - u0| <= d and |v - v0| <= d then
    # |u v - u0 v0| <= |u - u0| |v| + |u0| |v - v0| <= d (1 + d) + d = 2d + d^2 (|u0|, |v0| <= 1),
    # so P(error > 2d + d^2) <= JL(d, k_out) + JL(d, k_in) by a union bound.
    k, d = 300, 0.25
    eps, bound = 2 * d + d**2, 2 * _jl_bound(d, k)
    assert bound < 0.25
    a, g = _unit_pair(10, 0.5, seed=3), _unit_pair(7, -0.7, seed=4)
    u0, v0 = (g[0] @ g[1]).item(), (a[0] @ a[1]).item()
    psg = PerSampleGrads(
        ["l.weight"],
        {"l.weight": (7, 10)},
        {},
        [LayerFactors("l", a[:, None], g[:, None], "l.weight", None, (7, 10))],
        2,
    )
    ips = []
    for seed in range(300):
        p = FactoredProjector(k, k, seed=seed).project(psg)
        ips.append(torch.stack([p[0] @ p[1], p[0] @ p[0], p[1] @ p[1]]))
    err = (torch.stack(ips) - torch.tensor([u0 * v0, 1.0, 1.0], dtype=F64)).abs()
    assert ((err > eps).double().mean(0) <= bound).all()
    # E[u v] = u0 v0 (P_a, P_g independent); Var = E[u^2] E[v^2] - (u0 v0)^2 with
    # E[u^2] = u0^2 + (1 + u0^2) / k for Gaussian P and unit vectors.
    var = (u0**2 + (1 + u0**2) / k) * (v0**2 + (1 + v0**2) / k) - (u0 * v0) ** 2
    mean = torch.stack(ips)[:, 0].mean().item()
    assert abs(mean - u0 * v0) < 5 * math.sqrt(var / 300)


# ----------------------------------------------------------------------------- factored, T > 1
@pytest.mark.parametrize("case", [_seq_case, _conv_case], ids=["sequence", "conv2d"])
def test_factored_equals_kronecker_projection_of_dense_gradient(case: Case) -> None:
    task, batch = case()
    psg = compute_per_sample_grads(task, batch, engine="hooks")
    assert all(f.a.shape[1] > 1 for f in psg.factors[:1])  # several positions t
    proj = FactoredProjector(3, 2, seed=5)
    with pytest.raises(NotFittedError):
        _ = proj.proj_dim
    expected = []
    for f in psg.factors:
        grad = f.matrix().reshape(psg.batch_size, -1)  # vec (row-major) of sum_t g_t a_t^T
        p_a, p_g = proj.layer_matrices(f.module, f.a.shape[2], f.g.shape[2], F64)
        expected.append(grad @ torch.kron(p_g, p_a))
    got = proj.project(psg)
    assert got.shape == (3, proj.output_dim(psg)) == (3, 2 * 6) and proj.proj_dim == 12
    assert _close(got, torch.cat(expected, 1))
    # Same features from the functional engine's dense gradients.
    dense = compute_per_sample_grads(task, batch, engine="functional")
    assert not dense.factors and _close(proj.project(dense), got)


def test_factored_mixed_dense_parameters_engine_invariant() -> None:
    task, batch = _mlp_case()
    proj = FactoredProjector(2, 3, seed=1)
    hooks = compute_per_sample_grads(task, batch, engine="hooks")
    functional = compute_per_sample_grads(task, batch, engine="functional")
    # two Linear layers + LayerNorm weight and bias, each proj_dim_in * proj_dim_out features
    assert proj.output_dim(hooks) == proj.output_dim(functional) == 4 * 6
    assert _close(proj.project(hooks), proj.project(functional))
    with pytest.raises(NotImplementedError):
        proj.project_flat(hooks.flat())


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GaussianProjector(0), "proj_dim must be an integer >= 1; got 0"),
        (lambda: RademacherProjector(-3), "got -3"),
        (lambda: GaussianProjector(2.5), "got 2.5"),
        (lambda: GaussianProjector(8, block_rows=0), "block_rows"),
        (lambda: SJLTProjector(8, nnz=0), "nnz must be an integer >= 1; got 0"),
        (lambda: SJLTProjector(8, nnz=9), r"nnz must be in \[1, proj_dim=8\]; got nnz=9"),
        (lambda: FactoredProjector(0, 4), "proj_dim_in"),
        (lambda: GaussianProjector(8, seed=-1), "seed"),
        (lambda: make_projector("pca", 8), "unknown projector kind 'pca'"),
        (lambda: make_projector("gaussian", 0), "got 0"),
        (lambda: make_projector("gaussian", 8, nnz=2), "takes no"),
        (lambda: make_projector("factored", 10), "perfect square"),
        (lambda: make_projector("factored", 12, proj_dim_in=3, proj_dim_out=3), "proj_dim_in=3"),
    ],
)
def test_bad_settings_raise_config_error(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_make_projector_builds_each_kind() -> None:
    assert isinstance(make_projector("none", None), IdentityProjector)
    sjlt = make_projector("sjlt", 32, seed=1, member=2, nnz=4)
    assert isinstance(sjlt, SJLTProjector) and (sjlt.nnz, sjlt.member) == (4, 2)
    fac = make_projector("factored", 16)
    assert isinstance(fac, FactoredProjector) and (fac.proj_dim_in, fac.proj_dim_out) == (4, 4)
    fac = make_projector("factored", None, proj_dim_in=3, proj_dim_out=2)
    assert isinstance(fac, FactoredProjector) and fac.dim_per_layer == 6


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_generate_on_cpu_and_device_agree_on_cpu_and_bad_value_is_refused(kind):
    x = torch.randn(3, 50, dtype=torch.float64)
    on_device = make_projector(kind, 16, seed=4, block_rows=7, generate_on="device")
    on_cpu = make_projector(kind, 16, seed=4, block_rows=7, generate_on="cpu")
    assert torch.equal(on_device.project_flat(x), on_cpu.project_flat(x))
    with pytest.raises(ConfigError, match="generate_on must be 'device' or 'cpu'; got 'gpu'"):
        make_projector(kind, 16, generate_on="gpu")
