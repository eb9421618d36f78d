"""Per-module scores of influence and Source: they sum to the total, and with K-FAC/EK-FAC
(block-diagonal) each module's term is the method run on that module's parameters alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datatrace import ConfigError, DataError, Task, make_attributor
from datatrace.curvature import GGNOperator
from datatrace.methods.per_module import per_token_scores
from datatrace.methods.source import SourceAttributor
from datatrace.task import lm_loss
from tests.methods.test_kfac_influence import CASES
from tests.methods.test_source import _trajectory
from tests.models import autograd_loop, classification_data, mlp

RTOL = 1e-10


def _module_params(task: Task, module: str) -> list[str]:
    return [n for n in task.tracked_names if n.rsplit(".", 1)[0] == module]


def _check_split(per_module, total):
    summed = sum(s.values for s in per_module.values())
    torch.testing.assert_close(summed, total, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("case", ["mlp", "lm-masked"])
@pytest.mark.parametrize(
    ("method_id", "opts"),
    [
        ("if-ekfac", {"damping": "heuristic"}),
        ("if-ekfac", {"damping": 1e-2, "train_features": "gradients"}),
        ("if-kfac", {"damping": 1e-2, "query_rank": 2}),
    ],
)
def test_kfac_influence_per_module_is_the_influence_of_each_layer_alone(case, method_id, opts):
    task, train, queries = CASES[case]()
    attr = make_attributor(method_id, task, batch_size=4, **opts).fit(train)
    per_module = attr.attribute_per_module(queries)
    assert set(per_module) == {n.rsplit(".", 1)[0] for n in task.tracked_names}
    _check_split(per_module, attr.attribute(queries).values)
    for module, scores in per_module.items():
        alone = Task(task.model, loss=task.loss_name, params=_module_params(task, module))
        ref = make_attributor(method_id, alone, batch_size=4, **opts).fit(train)
        expected = ref.attribute(queries).values
        torch.testing.assert_close(scores.values, expected, rtol=RTOL, atol=1e-14)
        assert scores.values.abs().max() > 1e-8  # every layer contributes


def test_dense_ggn_influence_per_module_is_each_modules_share_of_the_inner_product():
    task = Task(mlp())
    train, queries = classification_data(n=10), classification_data(n=3, seed=4)
    attr = make_attributor("if-explicit", task, damping=1e-2).fit(train)
    per_module = attr.attribute_per_module(queries)

    def loss(m, x, y):
        return F.cross_entropy(m(x), y, reduction="sum")

    g_train = autograd_loop(task.model, loss, *train)
    g_query = autograd_loop(task.model, loss, *queries)
    h = GGNOperator(task, train).to_dense()
    pre = torch.linalg.solve(h + 1e-2 * torch.eye(h.shape[0]).double(), g_query.T).T / 10
    cols: dict[str, list[int]] = {}
    pos = 0
    for name, p in task.tracked_params().items():
        cols.setdefault(name.rsplit(".", 1)[0], []).extend(range(pos, pos + p.numel()))
        pos += p.numel()
    assert list(per_module) == list(cols) == ["0", "2"]
    for module, c in cols.items():
        expected = pre[:, c] @ g_train[:, c].T
        torch.testing.assert_close(per_module[module].values, expected, rtol=RTOL, atol=1e-14)
    _check_split(per_module, attr.attribute(queries).values)


def test_grouped_influence_per_module_sums_to_the_group_scores():
    task = Task(mlp())
    train, queries = classification_data(n=10), classification_data(n=3, seed=4)
    groups = torch.arange(10) % 4
    attr = make_attributor("if-ekfac", task, damping=1e-2, groups=groups).fit(train)
    per_module = attr.attribute_per_module(queries)
    total = attr.attribute(queries)
    _check_split(per_module, total.values)
    assert all(torch.equal(s.unit_ids, total.unit_ids) for s in per_module.values())


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_source_per_module_is_source_of_each_layer_alone(curvature):
    model = mlp(seed=3)
    x, y = classification_data(n=10, seed=5)
    xq, yq = classification_data(n=4, seed=9)
    stage_a, stage_b = tuple(range(0, 6)), tuple(range(4, 10))
    ckpts, _ = _trajectory(model, x, y, [0.5, 0.4, 0.3, 0.2], [stage_a, stage_a, stage_b, stage_b])
    model.load_state_dict(ckpts[-1].state)
    opts = {"curvature": curvature, "damping": 0.1, "segments": 2, "fisher": "empirical"}
    task = Task(model, checkpoints=ckpts)
    attr = SourceAttributor(task, **opts).fit((x, y))
    per_module = attr.attribute_per_module((xq, yq))
    assert list(per_module) == ["0", "2"]
    _check_split(per_module, attr.attribute((xq, yq)).values)
    for module, scores in per_module.items():
        alone = Task(model, checkpoints=ckpts, params=_module_params(task, module))
        expected = SourceAttributor(alone, **opts).fit((x, y)).attribute((xq, yq)).values
        torch.testing.assert_close(scores.values, expected, rtol=RTOL, atol=1e-14)


def test_per_module_refuses_projected_features():
    task = Task(mlp())
    train = classification_data(n=8)
    attr = make_attributor(
        "if-cg", task, curvature="fisher", projector="gaussian", proj_dim=6, damping=1e-2
    ).fit(train)
    with pytest.raises(ConfigError, match="projector='gaussian'"):
        attr.attribute_per_module(train)


def test_per_token_scores_are_the_scores_of_each_tokens_loss():
    task, train, queries = CASES["lm-masked"]()
    model = task.model
    params = task.tracked_params()
    gd = make_attributor("grad-dot", task).fit(train)
    per_token = per_token_scores(gd, queries)
    ids, mask = queries["input_ids"], queries["attention_mask"]
    n, t = ids.shape
    assert per_token.shape == (n, t, len(train["input_ids"]))

    def grad_of(value):
        grads = torch.autograd.grad(value, list(params.values()), retain_graph=True)
        return torch.cat([g.flatten() for g in grads])

    def seq_loss(i, data):
        logits = model(data["input_ids"][i : i + 1], data["attention_mask"][i : i + 1])
        return lm_loss(logits, data["input_ids"][i : i + 1], data["attention_mask"][i : i + 1])

    g_train = torch.stack(
        [grad_of(seq_loss(i, train).sum()) for i in range(len(train["input_ids"]))]
    )
    for i in range(n):
        logits = model(ids[i : i + 1], mask[i : i + 1])
        logp = torch.log_softmax(logits[0, :-1], -1)
        for pos in range(t):
            if pos == 0 or mask[i, pos] == 0:  # never predicted
                assert (per_token[i, pos] == 0).all()
                continue
            token_loss = -logp[pos - 1, ids[i, pos]]
            expected = grad_of(token_loss) @ g_train.T
            torch.testing.assert_close(per_token[i, pos], expected, rtol=RTOL, atol=1e-13)
    assert (mask == 0).any()  # the case has padding


@pytest.mark.parametrize("method_id", ["if-ekfac", "logra", "source"])
def test_per_token_scores_sum_to_the_scores(method_id):
    task, train, queries = CASES["lm-masked"]()
    opts = {
        "if-ekfac": {"damping": 1e-2},
        "logra": {"proj_dim_in": 3, "proj_dim_out": 4},
        "source": {"horizon": 10.0},
    }[method_id]
    attr = make_attributor(method_id, task, **opts).fit(train)
    per_token = attr.attribute_per_token(queries)
    torch.testing.assert_close(
        per_token.sum(1), attr.attribute(queries).values, rtol=RTOL, atol=1e-13
    )
    assert (per_token[:, 1:].abs().amax(-1) > 0).sum() > queries["input_ids"].shape[0]


def test_per_token_scores_refuse_non_lm_tasks_and_batches():
    gd = make_attributor("grad-dot", Task(mlp())).fit(classification_data(n=6))
    with pytest.raises(ConfigError, match="loss='lm'"):
        per_token_scores(gd, classification_data(n=2))
    task, train, queries = CASES["lm-masked"]()
    gd = make_attributor("grad-dot", task).fit(train)
    with pytest.raises(DataError, match="dict batch with 'input_ids'"):
        per_token_scores(gd, (queries["input_ids"],))
