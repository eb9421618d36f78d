"""Exact unrolled attribution: metagradients against finite differences of retraining and
against plain autograd through the whole run; refused replays and recipes; the
conformance checks of tests/methods/test_conformance.py on a recorded run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datatrace import ConfigError, ModelError, NotFittedError, Task, make_attributor
from datatrace.methods import UnrolledAttributor
from datatrace.recording import CheckpointRecorder
from datatrace.replay import OptimizerSpec, ReplayStep, TrainingRecipe
from tests.models import classification_data, mlp

N, STEPS, BATCH = 10, 9, 4
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.9), weight_decay=0.1),
}


def batch_order(n: int = N, steps: int = STEPS, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:BATCH] for _ in range(steps)]


def lr_at(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)  # a decaying schedule: multiplies the base rate


def train(
    optimizer: str,
    train_data,
    weights: torch.Tensor | None = None,
    recorder: CheckpointRecorder | None = None,
) -> nn.Module:
    """The reference loop: torch.optim on ``Σ w_i ℓ_i / |B|`` (w = 1: the plain mean)."""
    model = mlp().train()
    opt = OPTIMIZERS[optimizer](model.parameters())
    base = [g["lr"] for g in opt.param_groups]
    if recorder is not None:
        recorder.attach(model, opt)
    x, y = train_data
    for t, idx in enumerate(batch_order()):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_at(t)
        opt.zero_grad()
        losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        loss = losses.mean() if weights is None else (weights[idx] * losses).sum() / len(idx)
        loss.backward()
        opt.step()
        if recorder is not None:
            recorder.record_step(idx)
    return model.eval()


def recorded(optimizer: str, train_data) -> tuple[nn.Module, TrainingRecipe]:
    recorder = CheckpointRecorder()
    model = train(optimizer, train_data, recorder=recorder)
    return model, recorder.recipe(model)


@pytest.fixture(scope="module")
def data():
    return classification_data(n=N), classification_data(n=3, seed=7)


def query_loss(model: nn.Module, queries) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(queries[0]), queries[1], reduction="none")


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_metagradient_equals_finite_difference_of_retraining(optimizer, data):
    train_data, queries = data
    model, recipe = recorded(optimizer, train_data)
    scores = UnrolledAttributor(Task(model), recipe=recipe).fit(train_data).attribute(queries)
    h = 1e-4
    for i in (0, 3, 7):
        plus, minus = torch.ones(N, dtype=torch.float64), torch.ones(N, dtype=torch.float64)
        plus[i] += h
        minus[i] -= h
        fd = (
            query_loss(train(optimizer, train_data, plus), queries)
            - query_loss(train(optimizer, train_data, minus), queries)
        ) / (2 * h)
        # score = -∂(query loss)/∂w_i: positive when up-weighting i lowers the query loss
        torch.testing.assert_close(scores.values[:, i], -fd, rtol=1e-5, atol=1e-9)
        assert fd.abs().max() > 1e-4  # the example matters: the comparison is not 0 == 0


@pytest.mark.parametrize(("optimizer", "weight"), [("sgd-momentum", 0.5), ("adam", 0.25)])
def test_metagradient_at_another_weight_equals_finite_difference(optimizer, weight, data):
    # weight=w0: -∂(query loss)/∂w_i at w = w0 · 1, the run retrained with every weight w0
    train_data, queries = data
    model, recipe = recorded(optimizer, train_data)
    attr = UnrolledAttributor(Task(model), recipe=recipe, weight=weight)
    scores = attr.fit(train_data).attribute(queries).values
    h = 1e-4
    base = torch.full((N,), weight, dtype=torch.float64)
    centre = query_loss(train(optimizer, train_data, base), queries)
    assert (centre - query_loss(model, queries)).abs().max() > 1e-3  # another trajectory
    for i in (0, 3, 7):
        plus, minus = base.clone(), base.clone()
        plus[i] += h
        minus[i] -= h
        fd = (
            query_loss(train(optimizer, train_data, plus), queries)
            - query_loss(train(optimizer, train_data, minus), queries)
        ) / (2 * h)
        torch.testing.assert_close(scores[:, i], -fd, rtol=1e-5, atol=1e-9)
        assert fd.abs().max() > 1e-4
    at_one = UnrolledAttributor(Task(model), recipe=recipe).fit(train_data).attribute(queries)
    assert (scores - at_one.values).abs().max() > 1e-3  # a different derivative than at 1


def test_default_weight_is_the_recorded_run(data):
    train_data, queries = data
    model, recipe = recorded("sgd-momentum", train_data)
    default = UnrolledAttributor(Task(model), recipe=recipe).fit(train_data)
    explicit = UnrolledAttributor(Task(model), recipe=recipe, weight=1.0).fit(train_data)
    assert default.config.weight == 1.0
    assert torch.equal(default.attribute(queries).values, explicit.attribute(queries).values)


def test_a_bad_recipe_is_refused_at_any_weight(data):
    # the replay is checked at weight 1 against the recorded weights before the run at w0
    train_data, _ = data
    model, recipe = recorded("adam", train_data)
    steps = list(recipe.steps)
    steps[3] = ReplayStep(steps[3].indices, steps[3].learning_rate * 1.001)
    wrong = TrainingRecipe(
        recipe.initial_state, recipe.optimizer, steps, recipe.params, recipe.final_state
    )
    with pytest.raises(ModelError, match="does not reproduce the recipe's recorded final"):
        UnrolledAttributor(Task(model), recipe=wrong, weight=0.5).fit(train_data)


def unrolled_by_hand(optimizer: str, train_data, queries, weight: float = 1.0) -> torch.Tensor:
    """Plain autograd through the whole run: the update written out again, no checkpoints."""
    x, y = train_data
    model = mlp()
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    w = torch.full((N,), weight, dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[optimizer]([torch.zeros(1)]).param_groups[0]
    state: list[dict] = [{} for _ in params]
    for t, idx in enumerate(batch_order(), start=1):
        out = torch.func.functional_call(model, dict(zip(names, params)), (x[idx],))
        loss = (w[idx] * F.cross_entropy(out, y[idx], reduction="none")).sum() / len(idx)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        lr, wd = opt["lr"] * lr_at(t - 1), opt["weight_decay"]
        new = []
        for p, g, s in zip(params, grads, state):
            if "betas" in opt:  # Adam / AdamW
                b1, b2 = opt["betas"]
                if optimizer == "adamw":
                    p = p * (1 - lr * wd)
                else:
                    g = g + wd * p
                s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
                s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
                m_hat, v_hat = s["m"] / (1 - b1**t), s["v"] / (1 - b2**t)
                new.append(p - lr * m_hat / (v_hat.sqrt() + opt["eps"]))
            else:
                g = g + wd * p
                s["b"] = g if t == 1 else opt["momentum"] * s["b"] + g
                step = g + opt["momentum"] * s["b"] if opt["nesterov"] else s["b"]
                new.append(p - lr * step)
        params = new
    out = torch.func.functional_call(model, dict(zip(names, params)), (queries[0],))
    q = F.cross_entropy(out, queries[1], reduction="none")
    return -torch.stack([torch.autograd.grad(q[j], w, retain_graph=True)[0] for j in range(len(q))])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_equals_full_autograd_through_the_run_for_every_segment_length(optimizer, data):
    train_data, queries = data
    model, recipe = recorded(optimizer, train_data)
    reference = unrolled_by_hand(optimizer, train_data, queries)
    assert reference.abs().max() > 1e-3
    for segment_steps in (1, 2, 4, None, STEPS):  # STEPS: one segment, no recomputation
        for batching in ("vmap", "loop"):
            attr = UnrolledAttributor(
                Task(model),
                recipe=recipe,
                segment_steps=segment_steps,
                query_batching=batching,
                batch_size=2,
            )
            got = attr.fit(train_data).attribute(queries).values
            torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("optimizer", ["sgd-nesterov", "adamw"])
def test_another_weight_equals_full_autograd_for_every_segment_length(optimizer, data):
    train_data, queries = data
    model, recipe = recorded(optimizer, train_data)
    reference = unrolled_by_hand(optimizer, train_data, queries, weight=0.5)
    assert reference.abs().max() > 1e-3
    for segment_steps in (1, 4, STEPS):
        attr = UnrolledAttributor(
            Task(model), recipe=recipe, weight=0.5, segment_steps=segment_steps, batch_size=2
        )
        got = attr.fit(train_data).attribute(queries).values
        torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-13)


def test_margin_target_sign_and_unused_examples(data):
    train_data, queries = data
    model, recipe = recorded("sgd-momentum", train_data)
    used = {i for s in recipe.steps for i in s.indices}
    loss = UnrolledAttributor(Task(model), recipe=recipe).fit(train_data).attribute(queries)
    margin = UnrolledAttributor(Task(model, target="margin"), recipe=recipe).fit(train_data)
    values = margin.attribute(queries).values
    assert values.shape == loss.shape
    unused = sorted(set(range(N)) - used)
    if unused:  # an example no step trained on has no effect
        assert (loss.values[:, unused] == 0).all()
    # the margin and the loss are different targets: their metagradients differ
    assert not torch.allclose(values, loss.values)


# ----------------------------------------------------------------------------- refusals
def test_a_replay_that_does_not_reproduce_the_recorded_weights_is_refused(data):
    train_data, _ = data
    model, recipe = recorded("adam", train_data)
    steps = list(recipe.steps)
    steps[3] = ReplayStep(steps[3].indices, steps[3].learning_rate * 1.001)  # a wrong lr
    wrong = TrainingRecipe(
        recipe.initial_state, recipe.optimizer, steps, recipe.params, recipe.final_state
    )
    with pytest.raises(ModelError, match="does not reproduce the recipe's recorded final"):
        UnrolledAttributor(Task(model), recipe=wrong).fit(train_data)
    # a model other than the run's final one
    with pytest.raises(ModelError, match="does not reproduce the model being attributed"):
        UnrolledAttributor(Task(mlp(seed=3)), recipe=recipe).fit(train_data)
    # a loop the recorder did not see: gradient clipping changes the run
    recorder = CheckpointRecorder()
    clipped = mlp().train()
    opt = torch.optim.SGD(clipped.parameters(), lr=0.5)
    recorder.attach(clipped, opt)
    x, y = train_data
    for idx in batch_order():
        opt.zero_grad()
        F.cross_entropy(clipped(x[idx]), y[idx]).backward()
        nn.utils.clip_grad_norm_(clipped.parameters(), 0.1)
        opt.step()
        recorder.record_step(idx)
    attr = UnrolledAttributor(Task(clipped.eval()), recipe=recorder.recipe(clipped))
    with pytest.raises(ModelError, match="no gradient clipping"):
        attr.fit(train_data)
    # a tolerance accepts a rounding-level difference, not more
    UnrolledAttributor(Task(model), recipe=recipe, replay_tolerance=1e-12).fit(train_data)


def test_unsupported_recipes_are_refused_by_name(data):
    train_data, _ = data
    model = mlp().train()
    with pytest.raises(ConfigError, match="optimizer RMSprop cannot be replayed"):
        CheckpointRecorder().attach(model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ConfigError, match=r"Adam\(amsgrad=True\) cannot be replayed"):
        CheckpointRecorder().attach(model, torch.optim.Adam(model.parameters(), amsgrad=True))
    # gradient accumulation: two batches per optimizer step, recorded per batch
    recorder = CheckpointRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.attach(model, opt)
    x, y = train_data
    F.cross_entropy(model(x[:2]), y[:2]).backward()
    F.cross_entropy(model(x[2:4]), y[2:4]).backward()
    opt.step()
    recorder.record_step([0, 1])
    with pytest.raises(ConfigError, match="Gradient accumulation"):
        recorder.record_step([2, 3])
    # or two optimizer steps with one record
    opt.step()
    opt.step()
    with pytest.raises(ConfigError, match="follows 2 optimizer steps"):
        recorder.record_step([2, 3])
    # dropout in train mode, and augmentation, without recorded seeds
    dropout = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    recorder = CheckpointRecorder()
    opt = torch.optim.SGD(dropout.parameters(), lr=0.1)
    recorder.attach(dropout, opt)
    opt.step()
    recorder.record_step([0, 1])
    with pytest.raises(ConfigError, match="dropout in train mode but no recorded seed"):
        recorder.recipe(dropout)
    recorder = CheckpointRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.attach(model, opt, augment=lambda batch, gen: batch)
    opt.step()
    recorder.record_step([0, 1])
    with pytest.raises(ConfigError, match="data augmentation but no recorded seed"):
        recorder.recipe(model)
    # batch-norm statistics
    bn = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).double()
    with pytest.raises(ConfigError, match=r"BatchNorm1d.*running statistics"):
        CheckpointRecorder().attach(bn, torch.optim.SGD(bn.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="optimizer kind 'lbfgs' cannot be replayed"):
        OptimizerSpec("lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="eps must be a finite number > 0"):
        OptimizerSpec("adam", eps=0.0)


def test_seeded_dropout_and_augmentation_replay_exactly(data):
    train_data, queries = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()

    def augment(batch, gen):
        x, y = batch
        return x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype), y

    recorder = CheckpointRecorder()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    recorder.attach(model, opt, augment=augment)
    x, y = train_data
    for t, idx in enumerate(batch_order()):
        torch.manual_seed(100 + t)
        xb, yb = augment((x[idx], y[idx]), torch.Generator().manual_seed(100 + t))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        recorder.record_step(idx, seed=100 + t)
    recipe = recorder.recipe(model.eval())
    assert recipe.train_mode
    values = UnrolledAttributor(Task(model), recipe=recipe).fit(train_data).attribute(queries)
    assert torch.isfinite(values.values).all() and values.values.abs().max() > 0
    assert not model.training  # the replay put the model back in eval mode


def test_settings_are_validated_in_init(data):
    model, recipe = recorded("sgd-momentum", data[0])
    task = Task(model)
    with pytest.raises(ConfigError, match="needs its recipe"):
        UnrolledAttributor(task)
    with pytest.raises(ConfigError, match="segment_steps must be an int >= 1"):
        UnrolledAttributor(task, recipe=recipe, segment_steps=0)
    with pytest.raises(ConfigError, match="replay_tolerance must be"):
        UnrolledAttributor(task, recipe=recipe, replay_tolerance=-1.0)
    for bad in (-0.5, float("nan"), float("inf"), True, "half", None):
        with pytest.raises(ConfigError, match=r"weight must be a finite number >= 0.*got"):
            UnrolledAttributor(task, recipe=recipe, weight=bad)
    with pytest.raises(ConfigError, match="does not use projector"):
        UnrolledAttributor(task, recipe=recipe, projector="gaussian")
    with pytest.raises(ConfigError, match="Drop store="):
        UnrolledAttributor(task, recipe=recipe, store="somewhere")
    with pytest.raises(ConfigError, match="cannot attribute to groups"):
        UnrolledAttributor(task, recipe=recipe, groups=torch.arange(N))
    with pytest.raises(ConfigError, match="1 recipe\\(s\\) for 2 member"):
        UnrolledAttributor(task, recipe=recipe, members=[model.state_dict()] * 2).fit(data[0])


# ----------------------------------------------------------------------------- conformance
# tests/methods/test_conformance.py's checks, on a recorded run (the suite itself builds
# attributors from a bare Task, which has no run to replay).
def build(data, **extra) -> UnrolledAttributor:
    # plain SGD at a small rate: self-scores are then dominated by Σ_t η ||∇ℓ_i||² / |B| > 0
    # (with momentum 0.9 at rate 0.3 an example can hurt itself, exactly: not a bug)
    model, recipe = recorded("sgd", data[0])
    attr = make_attributor("unrolled", Task(model), recipe=recipe, **extra)
    assert isinstance(attr, UnrolledAttributor)
    return attr


def test_conformance_shape_ids_determinism_and_self_scores(data):
    train_data, queries = data
    s1 = build(data).fit(train_data).attribute(queries)
    s2 = build(data).fit(train_data).attribute(queries)
    assert s1.shape == (3, N) and s1.method == "unrolled"
    assert torch.equal(s1.unit_ids, torch.arange(N)) and torch.equal(s1.query_ids, torch.arange(3))
    assert torch.equal(s1.values, s2.values)
    attr = build(data).fit(train_data)
    self_scores = attr.self_attribute()
    diag = attr.attribute(train_data).values.diagonal()
    torch.testing.assert_close(diag, self_scores, rtol=1e-10, atol=1e-13)
    used = sorted({i for s in attr._recipes[0].steps for i in s.indices})
    assert (self_scores[used] > 0).all(), self_scores  # training on an example helps it


def test_conformance_batch_size_invariance_topk_and_not_fitted(data):
    train_data, queries = data
    a = build(data, batch_size=1).fit(train_data)
    b = build(data, batch_size=7).fit(train_data)
    torch.testing.assert_close(
        a.attribute(queries).values, b.attribute(queries).values, rtol=1e-10, atol=1e-13
    )
    top = a.topk(queries, 2)
    values = a.attribute(queries).values
    torch.testing.assert_close(top.proponent_values, values.topk(2, dim=1).values)
    with pytest.raises(NotFittedError):
        build(data).attribute(queries)


def test_conformance_one_member_equals_plain_method(data):
    train_data, queries = data
    model, recipe = recorded("adam", train_data)
    plain = UnrolledAttributor(Task(model), recipe=recipe).fit(train_data)
    other = UnrolledAttributor(Task(mlp(seed=4)), recipe=[recipe], members=[model.state_dict()])
    torch.testing.assert_close(
        other.fit(train_data).attribute(queries).values,
        plain.attribute(queries).values,
        rtol=1e-10,
        atol=1e-13,
    )


def test_checkpointing_keeps_every_kth_state_only(data):
    train_data, _ = data
    model, recipe = recorded("adam", train_data)  # 9 steps
    for segment_steps, kept in ((None, [0, 3, 6]), (2, [0, 2, 4, 6, 8]), (STEPS, [0])):
        attr = UnrolledAttributor(Task(model), recipe=recipe, segment_steps=segment_steps)
        saved = attr.fit(train_data)._contexts[0].fitted.saved
        assert sorted(saved) == kept  # ceil(sqrt(9)) = 3 by default: O(sqrt(T)) states
        assert all(len(s.slots["exp_avg"]) == 4 for s in saved.values())  # optimizer state too
