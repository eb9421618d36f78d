"""Method-specific identities: TracIn, representer points, TRAK, gradient similarity."""

import torch

from datatrace import (
    Checkpoint,
    GradCosAttributor,
    GradDotAttributor,
    RepresenterAttributor,
    SourceAttributor,
    Task,
    TracInAttributor,
    TRAKAttributor,
)
from datatrace.gradients import compute_per_sample_grads
from datatrace.projection import make_projector
from tests.models import classification_data, cnn, mlp, tiny_lm


def test_grad_dot_and_cos_equal_dense_formulas():
    model = mlp()
    train, queries = classification_data(n=9), classification_data(n=4, seed=3)
    task = Task(model)
    g = compute_per_sample_grads(task, train).flat()
    gq = compute_per_sample_grads(task, queries, which="query").flat()
    dot = GradDotAttributor(task).fit(train).attribute(queries).values
    torch.testing.assert_close(dot, gq @ g.T, rtol=1e-10, atol=0)
    cos = GradCosAttributor(task).fit(train).attribute(queries).values
    expected = (gq / gq.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, expected, rtol=1e-10, atol=1e-14)


def test_tracin_one_checkpoint_equals_lr_times_grad_dot():
    model = mlp()
    train, queries = classification_data(n=9), classification_data(n=4, seed=3)
    lr = 0.37
    tracin = TracInAttributor(
        Task(model, checkpoints=[Checkpoint(model.state_dict(), step=5, learning_rate=lr)])
    )
    dot = GradDotAttributor(Task(model)).fit(train).attribute(queries).values
    torch.testing.assert_close(
        tracin.fit(train).attribute(queries).values, lr * dot, rtol=1e-10, atol=0
    )


def test_tracin_sums_over_checkpoints_with_learning_rates():
    a, b = mlp(seed=1), mlp(seed=2)
    train, queries = classification_data(n=9), classification_data(n=4, seed=3)
    ckpts = [
        Checkpoint(a.state_dict(), step=1, learning_rate=0.5),
        Checkpoint(b.state_dict(), step=2, learning_rate=0.1),
    ]
    got = TracInAttributor(Task(a, checkpoints=ckpts)).fit(train).attribute(queries).values
    expected = 0.5 * GradDotAttributor(Task(a)).fit(train).attribute(queries).values
    expected += 0.1 * GradDotAttributor(Task(b)).fit(train).attribute(queries).values
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_representer_values_sum_to_preactivations():
    model = mlp()
    train, queries = classification_data(n=30), classification_data(n=6, seed=3)
    rps = RepresenterAttributor(Task(model), damping=1e-2).fit(train)
    values = rps.attribute(queries).values
    pre = rps.refit_preactivations(queries)
    expected = pre.gather(1, queries[1].view(-1, 1)).squeeze(1)
    torch.testing.assert_close(values.sum(1), expected, rtol=1e-6, atol=1e-8)


def test_representer_values_sum_to_next_token_preactivations_for_lm():
    """LM: a query's scores sum to its refit next-token pre-activations, masked positions out."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (14, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:3, 4:] = 0  # padded tails: those positions must not count
    train = {"input_ids": ids[:10], "attention_mask": mask[:10]}
    queries = {"input_ids": ids[10:], "attention_mask": mask[10:]}
    rps = RepresenterAttributor(Task(tiny_lm(), loss="lm", target="log_prob"), damping=1e-2)
    values = rps.fit(train).attribute(queries).values
    pre = rps.refit_preactivations(queries)  # (4, 6, 11)
    nxt = pre[:, :-1].gather(2, queries["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    expected = (nxt * queries["attention_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(values.sum(1), expected, rtol=1e-6, atol=1e-8)
    # train self-scores use the same decomposition: a padded sequence drops its tail
    self_scores = rps.self_attribute()
    full = rps.attribute(train).values.diagonal()
    torch.testing.assert_close(self_scores, full, rtol=1e-8, atol=1e-10)


def test_representer_refuses_non_final_layer():
    import pytest

    from datatrace import ModelError

    with pytest.raises(ModelError, match=r"final nn\.Linear"):
        RepresenterAttributor(Task(mlp()), layer="0").fit(classification_data())


def test_trak_single_member_formula():
    """TRAK on one model equals the dense formula φ_q (Φ^TΦ + λI)^{-1} Φ^T diag(1 - p)."""
    model = mlp()
    train, queries = classification_data(n=20), classification_data(n=4, seed=3)
    task = Task(model, target="margin")
    trak = TRAKAttributor(task, proj_dim=12, damping=0.01).fit(train)
    proj = make_projector("rademacher", 12, seed=0, member=0)
    phi = proj.project(compute_per_sample_grads(task, train, which="margin"))
    phq = proj.project(compute_per_sample_grads(task, queries, which="query"))
    with torch.no_grad():
        p = model(train[0]).softmax(1).gather(1, train[1].view(-1, 1)).squeeze(1)
    k = phi.T @ phi + 0.01 * torch.eye(12, dtype=phi.dtype)
    expected = phq @ torch.linalg.solve(k, phi.T) * (1 - p)
    torch.testing.assert_close(trak.attribute(queries).values, expected, rtol=1e-8, atol=1e-12)


def test_trak_dual_kernel_equals_primal_and_dense_formula():
    """Fewer units than features: the Woodbury (dual) form gives the primal scores."""
    import pytest

    from datatrace import ConfigError
    from datatrace.group import make_grouper

    model = mlp()
    train, queries = classification_data(n=20), classification_data(n=4, seed=3)
    task = Task(model, target="margin")
    proj = make_projector("rademacher", 40, seed=0, member=0)
    phi = proj.project(compute_per_sample_grads(task, train, which="margin"))
    phq = proj.project(compute_per_sample_grads(task, queries, which="query"))
    with torch.no_grad():
        p = model(train[0]).softmax(1).gather(1, train[1].view(-1, 1)).squeeze(1)
    lam = 0.01 * float((phi * phi).sum()) / 40  # relative damping 0.01 x mean diagonal
    expected = phq @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(40, dtype=phi.dtype), phi.T)
    expected = expected * (1 - p)
    runs = {}
    for form in ("auto", "primal", "dual"):
        trak = TRAKAttributor(task, proj_dim=40, relative_damping=0.01, kernel_form=form)
        runs[form] = trak.fit(train)
        got = runs[form].attribute(queries).values
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert runs["auto"]._contexts[0].fitted.inverse.form == "dual"  # auto: dual (20 < 40)
    assert runs["primal"]._contexts[0].fitted.inverse.form == "primal"
    torch.testing.assert_close(
        runs["dual"].self_attribute(), runs["primal"].self_attribute(), rtol=1e-9, atol=1e-12
    )
    groups = make_grouper("random", group_size=4, seed=0)
    by_form = [
        TRAKAttributor(task, proj_dim=40, kernel_form=f, groups=groups)
        .fit(train)
        .attribute(queries)
        for f in ("primal", "dual")
    ]
    torch.testing.assert_close(by_form[0].values, by_form[1].values, rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="kernel_form"):
        TRAKAttributor(task, kernel_form="svd")
    with pytest.raises(ConfigError, match="damping > 0"):
        TRAKAttributor(task, kernel_form="dual", relative_damping=0.0)


def test_trak_q_comes_from_the_featurization_pass_unless_shards_are_reused(tmp_path, monkeypatch):
    from datatrace.group import make_grouper

    task = Task(mlp(), target="margin")
    train, queries = classification_data(n=20), classification_data(n=4, seed=3)
    calls = []
    real_q_pass = TRAKAttributor._q_pass

    def counting(self, ctx):
        calls.append(ctx.index)
        return real_q_pass(self, ctx)

    monkeypatch.setattr(TRAKAttributor, "_q_pass", counting)
    for groups in (None, make_grouper("random", group_size=3, seed=0)):
        calls.clear()
        trak = TRAKAttributor(task, proj_dim=16, batch_size=6, groups=groups).fit(train)
        assert calls == []  # Q was recorded while featurizing: no second forward pass
        ctx = trak._contexts[0]
        q_pass = real_q_pass(trak, ctx)
        expected = q_pass if groups is None else trak.grouping.mean_rows(q_pass)
        torch.testing.assert_close(ctx.fitted.q, expected, rtol=1e-12, atol=0)
    # a refit that reuses every stored shard has no margins: it runs the Q pass, same scores
    calls.clear()
    first = TRAKAttributor(task, proj_dim=16, batch_size=6, store=tmp_path / "s").fit(train)
    assert calls == []
    again = TRAKAttributor(task, proj_dim=16, batch_size=6, store=tmp_path / "s").fit(train)
    assert calls == [0]
    torch.testing.assert_close(
        again.attribute(queries).values, first.attribute(queries).values, rtol=1e-12, atol=0
    )


def test_trak_ensemble_averages_kernels_and_q_separately():
    models = [mlp(seed=s) for s in (1, 2, 3)]
    train, queries = classification_data(n=20), classification_data(n=4, seed=3)
    members = [Checkpoint(m.state_dict()) for m in models]
    ens = TRAKAttributor(
        Task(models[0], target="margin"), proj_dim=12, damping=0.01, members=members
    )
    got = ens.fit(train).attribute(queries).values
    kernel_scores, qs = [], []
    transformed = ens._transformed_queries(queries)
    for i, m in enumerate(models):
        # member i: its own model and projection seed; rebuild its kernel scores and 1 - p densely
        ctx = ens._contexts[i]
        kernel_scores.append(transformed[i] @ ens._all_train_features(ctx).T)
        with torch.no_grad():
            p = m(train[0]).softmax(1).gather(1, train[1].view(-1, 1)).squeeze(1)
        torch.testing.assert_close(ctx.fitted.q, 1 - p, rtol=1e-10, atol=1e-14)
        qs.append(1 - p)
    expected = torch.stack(kernel_scores).mean(0) * torch.stack(qs).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_trak_works_on_cnn_with_sjlt():
    model = cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    s = (
        TRAKAttributor(Task(model, target="margin"), projector="sjlt", proj_dim=32)
        .fit((x, y))
        .attribute((x, y))
    )
    assert s.shape == (16, 16)
    assert (s.values.diagonal() > 0).all()


def test_trak_singular_kernel_is_reported():
    import pytest

    from datatrace import NumericalError

    train = classification_data(n=10)
    with pytest.raises(NumericalError, match="not positive definite"):
        TRAKAttributor(Task(mlp(), target="margin"), proj_dim=40, relative_damping=0.0).fit(train)
    # with relative damping the same setting works
    TRAKAttributor(Task(mlp(), target="margin"), proj_dim=40, relative_damping=1e-3).fit(train)


def test_trak_default_runs_when_proj_dim_exceeds_train_size():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).eval()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    scores = (
        TRAKAttributor(Task(model, target="margin"), proj_dim=256).fit((x, y)).attribute((x, y))
    )
    assert torch.isfinite(scores.values).all()
    assert (scores.values.diagonal() > 0).all()


def test_trak_and_source_score_the_flat_or_projected_gradients_the_loop_decides():
    train = classification_data(n=8)
    trak = TRAKAttributor(Task(mlp(), target="margin"), proj_dim=8).fit(train)
    flat = TRAKAttributor(Task(mlp(), target="margin"), projector="none").fit(train)
    source = SourceAttributor(Task(mlp()), horizon=10.0).fit(train)
    assert [a._contexts[0].form for a in (trak, flat, source)] == ["projected", "flat", "flat"]
    assert [a._contexts[0].layout for a in (trak, flat, source)] == [None, None, None]
