"""Source (approximate unrolled differentiation) against the quantities it approximates."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from datatrace import Checkpoint, ConfigError, DataError, InfluenceAttributor, Task
from datatrace.curvature import fit_kfac
from datatrace.methods.source import SourceAttributor, propagation, response
from tests.models import classification_data, mlp


# ----------------------------------------------------------------------------- helpers
def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _as_state(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[pos : pos + p.numel()].reshape(p.shape)
        pos += p.numel()
    return out


def _mse(model, flat, x, y):
    """Per-example 0.5 ||f(x) - y||² (the task's "mse" loss)."""
    out = functional_call(model, _as_state(model, flat), (x,))
    return 0.5 * ((out - y) ** 2).sum(1)


def _ce(model, flat, x, y):
    out = functional_call(model, _as_state(model, flat), (x,))
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def _grads(loss_fn, model, flat, x, y) -> torch.Tensor:
    """Per-example gradients by an autograd loop, ``(n, dim)``."""
    rows = []
    for i in range(len(y)):
        p = flat.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(loss_fn(model, p, x[i : i + 1], y[i : i + 1]).sum(), p)[0])
    return torch.stack(rows)


def _hessian(loss_fn, model, flat, x, y) -> torch.Tensor:
    """Dense Hessian of the mean loss over ``(x, y)``."""
    return torch.autograd.functional.hessian(lambda p: loss_fn(model, p, x, y).mean(), flat)


def _linear_regression(n=8, d_in=3, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    xq = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    yq = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out).double().eval()
    return model, (x, y), (xq, yq)


# ----------------------------------------------------------------------------- exact unroll
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ekfac"])
def test_equals_autograd_through_sgd_steps_on_a_quadratic(curvature):
    """Full-batch SGD on least squares: constant curvature, and with a checkpoint before
    every step the gradients are exact too, so Source (``unroll="sgd"``, ``anchor="start"``)
    is the derivative of the query loss after K steps w.r.t. each point's loss weight."""
    model, (x, y), (xq, yq) = _linear_regression()
    lrs = [0.3, 0.2, 0.25, 0.1, 0.15, 0.1]
    stage_a, stage_b = (
        tuple(range(0, 6)),
        tuple(range(3, 8)),
    )  # 0-2 pretrain only, 6-7 fine-tune only
    stages = [stage_a] * 3 + [stage_b] * 3
    theta0 = _flat(model)

    def run(weights: torch.Tensor) -> list[torch.Tensor]:
        thetas = [theta0]
        theta = theta0.clone().requires_grad_(True)
        for lr, stage in zip(lrs, stages):
            idx = torch.tensor(stage)
            objective = (weights[idx] * _mse(model, theta, x[idx], y[idx])).mean()
            theta = theta - lr * torch.autograd.grad(objective, theta, create_graph=True)[0]
            thetas.append(theta)
        return thetas

    def query_losses(weights: torch.Tensor) -> torch.Tensor:
        return _mse(model, run(weights)[-1], xq, yq)

    ones = torch.ones(len(y), dtype=torch.float64)
    truth = -torch.autograd.functional.jacobian(query_losses, ones)  # (n_query, n_train)
    thetas = [t.detach() for t in run(ones)]
    ckpts = [
        Checkpoint(_as_state(model, thetas[0]), step=0, learning_rate=lrs[0], train_indices=stage_a)
    ]
    ckpts += [
        Checkpoint(_as_state(model, thetas[k + 1]), step=k + 1, learning_rate=lr, train_indices=s)
        for k, (lr, s) in enumerate(zip(lrs, stages))
    ]
    final = nn.Linear(3, 2).double().eval()
    final.load_state_dict(_as_state(model, thetas[-1]))
    task = Task(final, loss="mse", checkpoints=ckpts)
    # fisher= is K-FAC's setting (refused with a dense curvature, which it would not change)
    fisher = {"fisher": "exact"} if curvature in ("kfac", "ekfac") else {}
    attr = SourceAttributor(
        task, curvature=curvature, unroll="sgd", anchor="start", batch_size=3, **fisher
    ).fit((x, y))
    scores = attr.attribute((xq, yq)).values
    torch.testing.assert_close(scores, truth, rtol=1e-10, atol=1e-13)
    assert [s["steps"] for s in attr.segment_summary()] == [(k, k + 1) for k in range(6)]
    # the pretraining-only points matter to the final model only through propagation
    assert truth[:, :3].abs().min() > 1e-4


# ----------------------------------------------------------------------------- the exp form
def _trajectory(model, x, y, lrs, stages, steps_per_ckpt=3):
    """Checkpoints of a small SGD run (cross-entropy), one per ``steps_per_ckpt`` steps."""
    theta = _flat(model)
    ckpts, states, step = [], [], 0
    for lr, stage in zip(lrs, stages):
        idx = torch.tensor(stage)
        for _ in range(steps_per_ckpt):
            p = theta.clone().requires_grad_(True)
            theta = theta - lr * torch.autograd.grad(_ce(model, p, x[idx], y[idx]).mean(), p)[0]
            step += 1
        states.append(theta.detach())
        ckpts.append(
            Checkpoint(
                _as_state(model, theta.detach()), step=step, learning_rate=lr, train_indices=stage
            )
        )
    return ckpts, states


@pytest.mark.parametrize("fast", [False, True])
def test_exp_form_equals_dense_matrix_functions_and_respects_stages(fast):
    """Two stages of two checkpoints each; the reference builds each segment's averaged
    Hessian and gradients densely and applies ``matrix_exp`` and a solve."""
    model = mlp(seed=3)
    x, y = classification_data(n=10, seed=5)
    xq, yq = classification_data(n=4, seed=9)
    stage_a, stage_b = tuple(range(0, 6)), tuple(range(4, 10))
    lrs, stages = [0.5, 0.4, 0.3, 0.2], [stage_a, stage_a, stage_b, stage_b]
    ckpts, states = _trajectory(model, x, y, lrs, stages)
    damping = 0.3
    final = mlp(seed=3)
    final.load_state_dict(_as_state(model, states[-1]))
    task = Task(final, checkpoints=ckpts)
    attr = SourceAttributor(task, curvature="hessian", damping=damping, segments=2, fast=fast)
    scores = attr.fit((x, y)).attribute((xq, yq)).values

    q = _grads(_ce, model, states[-1], xq, yq)
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    terms, v = [], q.T
    for seg in reversed([(0, stage_a), (2, stage_b)]):
        j, stage = seg
        idx = torch.tensor(stage)
        pair = [states[j], states[j + 1]]
        if fast:
            pair = [(pair[0] + pair[1]) / 2]
        h = sum(_hessian(_ce, model, s, x[idx], y[idx]) for s in pair) / len(pair) + damping * eye
        g = sum(_grads(_ce, model, s, x, y) for s in pair) / len(pair)
        lr_steps = 3 * (lrs[j] + lrs[j + 1])
        prop = torch.linalg.matrix_exp(-lr_steps * h)
        resp = torch.linalg.solve(h, eye - prop)  # (I - e^{-ηK H}) H^{-1}, symmetric
        mask = torch.zeros(len(y), dtype=torch.float64)
        mask[idx] = 1.0
        terms.append(((resp @ v).T @ g.T) * mask / len(stage))
        v = prop @ v
    pretrain_term, finetune_term = terms[1], terms[0]
    torch.testing.assert_close(scores, pretrain_term + finetune_term, rtol=1e-10, atol=1e-13)
    # points 0-3 were used in pretraining only: the fine-tuning segment adds nothing for them,
    # although their fine-tuning-time gradients are far from zero
    torch.testing.assert_close(scores[:, :4], pretrain_term[:, :4], rtol=1e-10, atol=1e-13)
    assert (finetune_term[:, :4] == 0).all() and (pretrain_term[:, 6:] == 0).all()
    assert _grads(_ce, model, states[-1], x[:4], y[:4]).norm() > 1e-2


def test_ekfac_averages_in_a_shared_basis_exactly_where_it_is_exact():
    """Least squares with the exact Fisher: EK-FAC is the Hessian at every checkpoint, so
    Source with EK-FAC segments of several checkpoints equals Source with the dense Hessian."""
    model, (x, y), (xq, yq) = _linear_regression(n=10)
    theta = _flat(model)
    ckpts = []
    for step in range(1, 7):
        p = theta.clone().requires_grad_(True)
        theta = (theta - 0.2 * torch.autograd.grad(_mse(model, p, x, y).mean(), p)[0]).detach()
        ckpts.append(Checkpoint(_as_state(model, theta), step=step, learning_rate=0.2))
    task = Task(model, loss="mse", checkpoints=ckpts)
    dense = SourceAttributor(task, curvature="hessian", segments=2).fit((x, y))
    ekfac = SourceAttributor(task, curvature="ekfac", fisher="exact", segments=2).fit((x, y))
    torch.testing.assert_close(
        ekfac.attribute((xq, yq)).values, dense.attribute((xq, yq)).values, rtol=1e-10, atol=1e-13
    )
    assert [s["checkpoints"] for s in dense.segment_summary()] == [3, 3]


# ----------------------------------------------------------------------------- limits
def test_one_segment_with_a_long_horizon_is_damped_influence():
    model = mlp()
    train, queries = classification_data(n=12), classification_data(n=5, seed=7)
    damping = 0.1
    # η T = 1e6: exp(-η T (σ + λ)) underflows to 0 and the response is 1 / (σ + λ)
    run = [Checkpoint(model.state_dict(), step=1000, learning_rate=1000.0)]
    source = SourceAttributor(Task(model, checkpoints=run), curvature="ggn", damping=damping)
    influence = InfluenceAttributor(
        Task(model), solver="explicit", curvature="ggn", damping=damping
    )
    a = source.fit(train).attribute(queries).values
    b = influence.fit(train).attribute(queries).values
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # the same with EK-FAC against its closed-form damped inverse
    task = Task(model)
    ekfac = SourceAttributor(task, damping=damping, horizon=1e6).fit(train)
    inv = fit_kfac(task, train).inverse(damping)
    qg = _grads(_ce, model, _flat(model), *queries)
    tg = _grads(_ce, model, _flat(model), *train)
    ref = inv.apply(qg.T).T @ tg.T / len(train[1])
    torch.testing.assert_close(ekfac.attribute(queries).values, ref, rtol=1e-10, atol=1e-13)
    # a short horizon is not influence: the response saturates at η T for small eigenvalues
    short = SourceAttributor(task, damping=damping, horizon=0.5).fit(train).attribute(queries)
    assert (short.values - ref).abs().max() > 0.1 * ref.abs().max()


def test_momentum_scales_the_learning_rate():
    model = mlp()
    train, queries = classification_data(n=12), classification_data(n=5, seed=7)
    slow = [Checkpoint(model.state_dict(), step=s, learning_rate=0.05) for s in (10, 20)]
    fast = [Checkpoint(model.state_dict(), step=s, learning_rate=0.2) for s in (10, 20)]
    a = SourceAttributor(Task(model, checkpoints=slow), momentum=0.75).fit(train)
    b = SourceAttributor(Task(model, checkpoints=fast)).fit(train)
    torch.testing.assert_close(
        a.attribute(queries).values, b.attribute(queries).values, rtol=1e-10, atol=1e-13
    )


def test_spectral_functions_against_explicit_sums():
    sigma = torch.tensor([-0.5, 0.0, 1e-9, 0.3, 2.0, 9.0, 30.0], dtype=torch.float64)
    schedule = [(0.1, 4), (0.25, 3)]
    p_ref = torch.ones_like(sigma)
    r_ref = torch.zeros_like(sigma)
    for lr, k in schedule:  # δ <- (1 - ησ) δ + η, starting from 0, is the response
        for _ in range(k):
            r_ref = (1 - lr * sigma) * r_ref + lr
            p_ref = (1 - lr * sigma) * p_ref
    torch.testing.assert_close(propagation(sigma, schedule, "sgd"), p_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(response(sigma, schedule, "sgd"), r_ref, rtol=1e-12, atol=0)
    total = 0.1 * 4 + 0.25 * 3
    exp_p = torch.exp(-sigma * total)
    torch.testing.assert_close(propagation(sigma, schedule), exp_p, rtol=1e-14, atol=0)
    assert response(sigma, schedule)[1] == total
    torch.testing.assert_close(
        response(sigma, schedule)[[0, 3, 4, 5, 6]],
        ((1 - exp_p) / sigma)[[0, 3, 4, 5, 6]],
        rtol=1e-14,
        atol=0,
    )
    # tiny σ: the naive (1 - e^{-σηK}) / σ loses digits; the limit is ηK (1 - σηK/2)
    torch.testing.assert_close(
        response(sigma, schedule)[2],
        torch.tensor(total * (1 - 0.5e-9 * total), dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )
    # many small steps: the discrete product tends to the exponential
    fine = [(1e-4, 11500)]
    torch.testing.assert_close(
        response(sigma, fine, "sgd"), response(sigma, fine), rtol=2e-3, atol=0
    )


# ----------------------------------------------------------------------------- checks
def test_bad_settings_and_trajectories_are_refused():
    model = mlp()
    train = classification_data(n=6)
    for bad in (
        {"curvature": "fisher"},
        {"damping": -1.0},
        {"segments": 0},
        {"anchor": "middle"},
        {"unroll": "adam"},
        {"momentum": 1.0},
        {"horizon": 0.0},
        {"projector": "sjlt"},
        {"fast": 1},
    ):
        with pytest.raises(ConfigError, match=repr(next(iter(bad.values())))):
            SourceAttributor(Task(model), **bad)
    with pytest.raises(ConfigError, match=r"needs the training trajectory.*horizon="):
        SourceAttributor(Task(model)).fit(train)
    backwards = [Checkpoint(model.state_dict(), step=s, learning_rate=0.1) for s in (5, 3)]
    with pytest.raises(ConfigError, match=r"increasing steps; member 0 has steps \[5, 3\]"):
        SourceAttributor(Task(model, checkpoints=backwards)).fit(train)
    two = [Checkpoint(model.state_dict(), step=s, learning_rate=0.1) for s in (5, 10)]
    with pytest.raises(ConfigError, match="segments=3 but member 0's trajectory has only 2"):
        SourceAttributor(Task(model, checkpoints=two), segments=3).fit(train)
    outside = [Checkpoint(model.state_dict(), step=5, learning_rate=0.1, train_indices=(0, 9))]
    with pytest.raises(DataError, match=r"reach 9 .* has 6 examples"):
        SourceAttributor(Task(model, checkpoints=outside)).fit(train)
    adam = [Checkpoint(model.state_dict(), step=5, learning_rate=0.1, optimizer="adam")]
    with pytest.warns(RuntimeWarning, match=r"optimizer \['adam'\]"):
        SourceAttributor(Task(model, checkpoints=adam), curvature="ggn").fit(train)


def test_segments_follow_steps_stages_and_anchor():
    model = mlp()
    train = classification_data(n=6)
    a, b = (0, 1, 2, 3), (2, 3, 4, 5)
    run = [
        Checkpoint(
            model.state_dict(), step=0, learning_rate=0.1, train_indices=a
        ),  # closes no step
        Checkpoint(model.state_dict(), step=4, learning_rate=0.1, train_indices=a),
        Checkpoint(model.state_dict(), step=8, learning_rate=0.2, train_indices=a),
        Checkpoint(model.state_dict(), step=10, learning_rate=0.05, train_indices=b),
        Checkpoint(model.state_dict(), step=16, learning_rate=0.05, train_indices=b),
    ]
    attr = SourceAttributor(Task(model, checkpoints=run), curvature="ggn", segments=1).fit(train)
    # one segment was asked for; the change of stage splits it
    summary = attr.segment_summary()
    assert [(s["steps"], s["checkpoints"], s["examples"]) for s in summary] == [
        ((0, 8), 2, 4),
        ((8, 16), 2, 4),
    ]
    assert summary[0]["lr_steps"] == pytest.approx(4 * 0.1 + 4 * 0.2)
    assert summary[1]["lr_steps"] == pytest.approx(8 * 0.05)


def test_datasets_and_loaders_give_the_same_scores_as_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp()
    x, y = classification_data(n=12)
    queries = classification_data(n=3, seed=7)
    run = [
        Checkpoint(model.state_dict(), step=4, learning_rate=0.1, train_indices=tuple(range(8))),
        Checkpoint(
            model.state_dict(), step=8, learning_rate=0.1, train_indices=tuple(range(4, 12))
        ),
    ]
    task = Task(model, checkpoints=run)
    ref = SourceAttributor(task, batch_size=5).fit((x, y))
    # with stage masks too, self-attribution is the diagonal of attributing the train set
    diag = ref.attribute((x, y)).values.diagonal()
    torch.testing.assert_close(ref.self_attribute(), diag, rtol=1e-10, atol=1e-13)
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)):
        attr = SourceAttributor(task, batch_size=5).fit(data)
        torch.testing.assert_close(
            attr.attribute(queries).values, ref.attribute(queries).values, rtol=1e-10, atol=1e-13
        )
        torch.testing.assert_close(
            attr.self_attribute(), ref.self_attribute(), rtol=1e-10, atol=1e-13
        )
