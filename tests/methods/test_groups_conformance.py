"""Group attribution (``groups=``) over every registered method.

Singleton groups must reproduce per-example attribution exactly; a group's score is the sum
of its members' scores where the estimator is linear in the train gradient; group features
do not depend on how groups fall into batches; bad ``groups=`` fail clearly.
"""

import pytest
import torch
import torch.nn.functional as F

from datatrace import METHODS, Checkpoint, ConfigError, DataError, StoreError, Task
from datatrace.group import Grouping, RandomGrouper
from datatrace.methods import GradDotAttributor, TRAKAttributor, make_attributor
from datatrace.methods.gradsim import GradCosAttributor
from datatrace.task import margin
from tests.methods.test_conformance import build
from tests.models import classification_data, mlp

IDS = sorted(METHODS)
N = 12
# Exactness does not depend on the solver's accuracy: cheaper settings keep the suite fast.
FAST: dict[str, dict] = {"if-lissa": {"solver_options": {"depth": 20}}}


@pytest.fixture(scope="module")
def data():
    return classification_data(n=N), classification_data(n=5, seed=7)


def permuted_singletons() -> torch.Tensor:
    # ids 100..111 in a scrambled order: unit j is example perm^-1(j)
    return 100 + torch.randperm(N, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method_id", IDS)
def test_singleton_groups_equal_per_sample_attribution(method_id, data):
    train, queries = data
    if not METHODS[method_id][0].supports_groups:  # must refuse clearly instead
        with pytest.raises(ConfigError, match="cannot attribute to groups"):
            build(method_id, groups=permuted_singletons())
        return
    plain = build(method_id, **FAST.get(method_id, {})).fit(train)
    ids = permuted_singletons()
    grouped = build(method_id, groups=ids, **FAST.get(method_id, {})).fit(train)
    s = grouped.attribute(queries)
    assert s.shape == (5, N)
    assert torch.equal(s.unit_ids, torch.arange(100, 100 + N))
    order = ids - 100  # example i is unit order[i]
    ref = plain.attribute(queries).values
    torch.testing.assert_close(s.values[:, order], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        grouped.self_attribute()[order], plain.self_attribute(), rtol=1e-10, atol=1e-12
    )


# Methods that refuse groups are checked to refuse them clearly in the singleton test above.
GROUPED_IDS = [m for m in IDS if METHODS[m][0].supports_groups]


@pytest.mark.parametrize("method_id", GROUPED_IDS)
def test_group_features_do_not_depend_on_batch_size(method_id, data, monkeypatch):
    train, _ = data
    # Features only: curvature is per example and checked by the per-sample suite.
    monkeypatch.setattr(METHODS[method_id][0], "_fit_member", lambda self, ctx: None)
    # mean group size 3: batches of 3 and 9 examples; group 0 (6 members) spans two of 3
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 3])
    assert any(len(batches) > 1 for _, _, batches in Grouping.from_ids(ids).chunks(3))
    a = build(method_id, groups=ids, batch_size=1).fit(train)
    b = build(method_id, groups=ids, batch_size=3).fit(train)
    fa, fb = (x._all_train_features(x._contexts[0]) for x in (a, b))
    assert fa.shape[0] == 4
    torch.testing.assert_close(fa, fb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method_id", ["grad-cos", "trak"])
def test_group_scores_do_not_depend_on_batch_size(method_id, data):
    train, queries = data
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 3])
    a = build(method_id, groups=ids, batch_size=1).fit(train)
    b = build(method_id, groups=ids, batch_size=3).fit(train)
    sa, sb = a.attribute(queries), b.attribute(queries)
    assert sa.shape == (5, 4) and torch.equal(sa.unit_ids, torch.arange(4))
    torch.testing.assert_close(sa.values, sb.values, rtol=1e-10, atol=1e-12)
    assert a.self_attribute().shape == (4,)
    torch.testing.assert_close(a.self_attribute(), b.self_attribute(), rtol=1e-10, atol=1e-12)


def _trajectory_task() -> Task:
    ckpts = [
        Checkpoint(mlp(seed=s).state_dict(), step=10 * s, learning_rate=0.1 * s) for s in (1, 2)
    ]
    return Task(mlp(seed=2), checkpoints=ckpts)


@pytest.mark.parametrize(
    ("method_id", "options", "task_fn"),
    [
        ("grad-dot", {}, None),
        ("tracin", {}, _trajectory_task),
        ("if-explicit", {"damping": 1e-2}, None),
        ("if-explicit", {"damping": 1e-2, "curvature": "hessian"}, None),
        ("if-cg", {"damping": 1e-1}, None),
        ("grad-dot", {"projector": "sjlt", "proj_dim": 32}, None),
        ("rps", {"max_iter": 50}, None),
    ],
)
def test_group_score_is_the_sum_of_member_scores(method_id, options, task_fn, data):
    train, queries = data
    task = task_fn() if task_fn else Task(mlp())
    ids = torch.tensor([5, 2, 5, 9, 2, 2, 5, 9, 9, 5, 1, 5])
    grouping = Grouping.from_ids(ids)
    per = make_attributor(method_id, task, batch_size=5, **options).fit(train)
    grp = make_attributor(method_id, task, batch_size=5, groups=ids, **options).fit(train)
    s = grp.attribute(queries)
    assert s.unit_ids.tolist() == [1, 2, 5, 9]
    ref = grouping.sum_rows(per.attribute(queries).values.T).T
    torch.testing.assert_close(s.values, ref, rtol=1e-10, atol=1e-12)


def test_grad_dot_and_cos_groups_against_autograd_of_the_summed_loss(data):
    train, queries = data
    model = mlp()
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 2])
    params = list(model.parameters())

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    x, y = train
    G = torch.stack(
        [
            flat_grad(F.cross_entropy(model(x[ids == j]), y[ids == j], reduction="sum"))
            for j in range(3)
        ]
    )
    Q = torch.stack(
        [
            flat_grad(F.cross_entropy(model(queries[0][i : i + 1]), queries[1][i : i + 1]))
            for i in range(5)
        ]
    )
    dot = GradDotAttributor(Task(model), groups=ids, batch_size=4).fit(train).attribute(queries)
    torch.testing.assert_close(dot.values, Q @ G.T, rtol=1e-10, atol=1e-12)
    cos = GradCosAttributor(Task(model), groups=ids, batch_size=4).fit(train).attribute(queries)
    ref = F.normalize(Q, dim=1) @ F.normalize(G, dim=1).T
    torch.testing.assert_close(cos.values, ref, rtol=1e-10, atol=1e-12)


def test_trak_groups_against_a_dense_reference(data):
    train, queries = data
    model = mlp()
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 2])
    params = list(model.parameters())
    x, y = train

    def flat_grad(value):
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])

    # group feature: gradient of the members' summed -margin; Q: members' mean 1 - p
    phi = torch.stack([flat_grad(-margin(model(x[ids == j]), y[ids == j]).sum()) for j in range(3)])
    with torch.no_grad():
        q_ex = torch.sigmoid(-margin(model(x), y))
    q = torch.stack([q_ex[ids == j].mean() for j in range(3)])
    fq = torch.stack(
        [
            flat_grad(-margin(model(queries[0][i : i + 1]), queries[1][i : i + 1]).sum())
            for i in range(5)
        ]
    )
    lam = 1e-3
    kernel = phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=phi.dtype)
    ref = fq @ torch.linalg.solve(kernel, phi.T) * q
    attr = TRAKAttributor(
        Task(model, target="margin"), projector="none", damping=lam, groups=ids, batch_size=5
    )
    torch.testing.assert_close(
        attr.fit(train).attribute(queries).values, ref, rtol=1e-10, atol=1e-12
    )


def test_grouper_object_and_id_are_resolved_in_fit(data):
    train, queries = data
    attr = GradDotAttributor(Task(mlp()), groups=RandomGrouper(group_size=4, seed=0)).fit(train)
    assert attr.grouping is not None and attr.grouping.n_groups == 3
    assert attr.attribute(queries).shape == (5, 3)
    by_id = GradDotAttributor(Task(mlp()), groups="kmeans-input").fit(classification_data(n=40))
    assert by_id.grouping.method == "kmeans-input" and by_id.grouping.n_groups == 3  # size 16
    assert by_id.describe()["groups"]["n_groups"] == 3


def test_store_with_groups_resumes_and_refuses_another_grouping(data, tmp_path):
    train, queries = data
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 3])
    ref = build("grad-dot", groups=ids, batch_size=4).fit(train).attribute(queries).values
    first = build("grad-dot", groups=ids, batch_size=4, store=tmp_path / "s").fit(train)
    torch.testing.assert_close(first.attribute(queries).values, ref, rtol=1e-10, atol=1e-12)
    again = build("grad-dot", groups=ids, batch_size=4, store=tmp_path / "s").fit(train)
    torch.testing.assert_close(again.attribute(queries).values, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(StoreError, match="groups"):
        build("grad-dot", groups=ids % 2, batch_size=4, store=tmp_path / "s").fit(train)


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ([0, 1, 1], DataError, "3 group ids but the training set has 12"),
        ([0] * 11 + [-2], ConfigError, "negative"),
        ("given", ConfigError, "needs the ids"),
        ("source", DataError, "names a column"),
        ({"a": 1}, ConfigError, "Grouping, a grouper"),
        ([0.5] * 12, ConfigError, "integers"),
    ],
)
def test_bad_groups_fail_clearly(groups, error, match, data):
    train, _ = data
    with pytest.raises(error, match=match):
        GradDotAttributor(Task(mlp()), groups=groups).fit(train)


def test_more_groups_than_examples_and_empty_groups_fail(data):
    train, _ = data
    with pytest.raises(DataError, match="larger than the 12 training"):
        GradDotAttributor(Task(mlp()), groups=Grouping.from_ids(list(range(12)), n_groups=13))
    with pytest.raises(DataError, match="empty"):
        Grouping.from_ids([0] * 6 + [2] * 6, n_groups=3)
    with pytest.raises(DataError, match="exceeds the 12 training"):
        GradDotAttributor(Task(mlp()), groups=RandomGrouper(group_size=13)).fit(train)


def test_a_method_without_group_support_refuses_groups():
    class NoGroups(GradDotAttributor):
        supports_groups = False

    with pytest.raises(ConfigError, match="cannot attribute to groups"):
        NoGroups(Task(mlp()), groups=[0, 1])
