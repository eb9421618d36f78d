"""Groupings and groupers: validation, determinism, purity, k-means quality."""

import pytest
import torch
from torch import nn

from datatrace import ConfigError, DataError, ModelError, Task
from datatrace.group import (
    GROUPERS,
    ClassRandomGrouper,
    GivenGrouper,
    Grouping,
    KMeansGradGrouper,
    KMeansInputGrouper,
    KMeansReprGrouper,
    RandomGrouper,
    balanced_kmeans,
    kmeans,
    make_grouper,
    resolve_groups,
    take_examples,
)
from tests.models import classification_data, mlp


def blobs(n_per: int = 40, centres: int = 6, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = 8 * torch.randn(centres, d, generator=g, dtype=torch.float64)
    y = torch.arange(centres).repeat_interleave(n_per)
    x = mu[y] + torch.randn(len(y), d, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def within_group_variance(x: torch.Tensor, grouping: Grouping) -> float:
    means = grouping.mean_rows(x)
    return float(((x - means[grouping.labels]) ** 2).sum())


def test_grouper_ids_are_the_design_ids():
    assert set(GROUPERS) == {
        "random",
        "class-random",
        "kmeans-input",
        "kmeans-repr",
        "kmeans-grad",
        "given",
    }


def test_from_ids_relabels_non_contiguous_ids_and_keeps_them():
    g = Grouping.from_ids([7, 3, 7, 100, 3])
    assert g.ids.tolist() == [3, 7, 100]
    assert g.labels.tolist() == [1, 0, 1, 2, 0]
    assert g.sizes().tolist() == [2, 2, 1]
    x = torch.arange(5.0)[:, None]
    assert g.sum_rows(x).flatten().tolist() == [5.0, 2.0, 3.0]
    assert g.mean_rows(x).flatten().tolist() == [2.5, 1.0, 3.0]


@pytest.mark.parametrize(
    ("ids", "kw", "match"),
    [
        ([0, -1, 2], {}, "negative"),
        ([0.5, 1.0], {}, "integers"),
        ([[0, 1]], {}, "1-D"),
        ([0, 2, 2], {"n_groups": 3}, "empty"),
        ([0, 1, 1], {"n_groups": 4}, "larger than the 3 training"),
        ([0, 5], {"n_groups": 2}, "< n_groups=2"),
    ],
)
def test_bad_ids_are_refused(ids, kw, match):
    with pytest.raises(DataError, match=match):
        Grouping.from_ids(ids, **kw)


def test_hand_built_grouping_with_an_empty_group_is_refused():
    with pytest.raises(DataError, match="empty"):
        Grouping(torch.tensor([0, 0, 2]), torch.tensor([10, 11, 12]))


def test_resolve_refuses_ids_that_do_not_cover_the_train_set():
    train = classification_data(n=6)
    with pytest.raises(DataError, match="5 group ids but the training set has 6"):
        resolve_groups([0, 0, 1, 1, 2], train)


def test_chunks_cover_every_example_once_with_whole_groups():
    g = Grouping.from_ids(torch.tensor([4, 1, 1, 0, 4, 4, 4, 4, 2, 2, 0, 3]))
    seen, groups = [], []
    for lo, hi, batches in g.chunks(3):
        idx = torch.cat(batches)
        assert all(len(b) <= 3 for b in batches)
        assert set(g.labels[idx].tolist()) == set(range(lo, hi))  # whole groups only
        assert (g.sizes()[lo:hi].sum()) == len(idx)
        seen += idx.tolist()
        groups += list(range(lo, hi))
    assert sorted(seen) == list(range(12)) and groups == list(range(g.n_groups))


def test_chunks_forward_batches_hold_whole_groups_unless_a_group_is_too_large():
    # sizes: group 0: 2, 1: 2, 2: 2, 3: 1, 4: 5
    g = Grouping.from_ids(torch.tensor([4, 1, 1, 0, 4, 4, 4, 4, 2, 2, 0, 3]))
    chunks = list(g.chunks(8, forward_size=3))
    assert [(lo, hi) for lo, hi, _ in chunks] == [(0, 4), (4, 5)]
    first = [g.labels[b].tolist() for b in chunks[0][2]]
    assert first == [[0, 0], [1, 1], [2, 2, 3]]  # whole groups, at most 3 examples each
    second = [g.labels[b].tolist() for b in chunks[1][2]]
    assert second == [[4, 4, 4], [4, 4]]  # the 5-example group cut alone
    assert sorted(torch.cat([b for c in chunks for b in c[2]]).tolist()) == list(range(12))


def test_take_examples_handles_tensors_dicts_and_datasets():
    x, y = classification_data(n=5)
    idx = torch.tensor([3, 0])
    assert torch.equal(take_examples((x, y), idx)[0], x[idx])
    assert torch.equal(take_examples({"a": x, "labels": y}, idx)["labels"], y[idx])
    ds = torch.utils.data.TensorDataset(x, y)
    got = take_examples(torch.utils.data.DataLoader(ds, batch_size=2), idx)
    assert torch.equal(got[0], x[idx]) and torch.equal(got[1], y[idx])


def test_random_grouper_is_deterministic_balanced_and_timed():
    data = torch.zeros(50, 2)
    a = RandomGrouper(group_size=8, seed=1).group(data)
    b = RandomGrouper(group_size=8, seed=1).group(data)
    c = RandomGrouper(group_size=8, seed=2).group(data)
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)
    assert a.n_groups == 7 and set(a.sizes().tolist()) <= {7, 8}
    assert a.method == "random" and a.seconds > 0
    assert a.describe()["config"] == {"group_size": 8, "seed": 1}


def test_class_random_groups_are_pure_and_stratified():
    x, y = blobs(n_per=23, centres=3)
    task = Task(nn.Linear(5, 3).double().eval())
    g = ClassRandomGrouper(group_size=5, seed=0).group((x, y), task)
    for j in range(g.n_groups):
        assert len(set(y[g.labels == j].tolist())) == 1
    # every class gets ceil(23 / 5) = 5 groups of near-equal size
    classes = torch.stack([y[g.labels == j][0] for j in range(g.n_groups)])
    assert torch.bincount(classes).tolist() == [5, 5, 5]
    assert set(g.sizes().tolist()) <= {4, 5}
    again = ClassRandomGrouper(group_size=5, seed=0).group((x, y), task)
    assert torch.equal(g.labels, again.labels)


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, y = blobs(n_per=30, centres=4)
    labels = kmeans(x, 4, seed=0)
    # each cluster is exactly one blob
    pairs = set(zip(labels.tolist(), y.tolist()))
    assert len(pairs) == 4
    assert torch.equal(labels, kmeans(x, 4, seed=0))


def test_balanced_kmeans_caps_cluster_sizes_and_keeps_equal_blobs():
    x, y = blobs(n_per=30, centres=4)
    labels = balanced_kmeans(x, 4, seed=0)
    assert len(set(zip(labels.tolist(), y.tolist()))) == 4  # equal blobs: nothing moves
    # unequal data: one dense blob of 50 and a far one of 10, 6 clusters -> at most 10 each
    g = torch.Generator().manual_seed(0)
    skew = torch.cat([torch.randn(50, 2, generator=g), 20 + torch.randn(10, 2, generator=g)])
    plain = kmeans(skew, 6, seed=0).bincount()
    capped = balanced_kmeans(skew, 6, seed=0)
    assert int(capped.bincount().max()) <= 10 < int(plain.max())
    assert capped[50:].unique().numel() == 1  # the far blob stays one cluster
    assert torch.equal(capped, balanced_kmeans(skew, 6, seed=0))
    with pytest.raises(ConfigError, match="balanced must be True or False"):
        KMeansInputGrouper(balanced="yes")


def test_kmeans_refuses_more_clusters_than_points():
    with pytest.raises(ConfigError, match=r"\[1, 3\]"):
        kmeans(torch.randn(3, 2), 4)


def test_kmeans_input_beats_random_on_within_group_variance():
    x, y = blobs(n_per=40, centres=6)
    km = KMeansInputGrouper(group_size=10, seed=0).group((x, y))
    rnd = RandomGrouper(group_size=10, seed=0).group((x, y))
    assert km.n_groups == rnd.n_groups == 24
    assert within_group_variance(x, km) < 0.5 * within_group_variance(x, rnd)
    assert torch.equal(km.labels, KMeansInputGrouper(group_size=10, seed=0).group((x, y)).labels)


def test_kmeans_repr_clusters_the_last_linear_input():
    x, y = classification_data(n=30)
    model = mlp()
    task = Task(model)
    g = KMeansReprGrouper(group_size=5, seed=0, standardize=False, balanced=False)
    g = g.group((x, y), task)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
    assert torch.equal(g.labels, Grouping.from_ids(kmeans(h, 6, seed=0)).labels)
    balanced = KMeansReprGrouper(group_size=5, seed=0, standardize=False).group((x, y), task)
    assert torch.equal(balanced.labels, Grouping.from_ids(balanced_kmeans(h, 6, seed=0)).labels)
    with pytest.raises(ModelError, match="not a submodule"):
        KMeansReprGrouper(module="nope").group((x, y), task)


def test_kmeans_grad_beats_random_on_gradient_variance():
    x, y = blobs(n_per=20, centres=3, d=6)
    task = Task(mlp(d_in=6))
    km = KMeansGradGrouper(group_size=6, seed=0, proj_dim=9).group((x, y), task)
    rnd = RandomGrouper(group_size=6, seed=0).group((x, y))
    from datatrace.gradients import compute_per_sample_grads

    grads = compute_per_sample_grads(task, (x, y)).flat()
    grads = (grads - grads.mean(0)) / grads.std(0).clamp_min(1e-12)
    assert within_group_variance(grads, km) < within_group_variance(grads, rnd)
    assert km.seconds > 0 and km.config["proj_dim"] == 9


def test_given_grouper_from_column_and_callable():
    x, y = classification_data(n=6)
    src = torch.tensor([2, 2, 0, 1, 1, 0])
    by_column = GivenGrouper("source").group({"x": x, "labels": y, "source": src})
    by_callable = GivenGrouper(lambda batch: batch[1] % 2, batch_size=4).group((x, y))
    assert by_column.labels.tolist() == src.tolist()
    assert by_callable.labels.tolist() == torch.unique(y % 2, return_inverse=True)[1].tolist()
    with pytest.raises(DataError, match="names a column"):
        GivenGrouper("source").group((x, y))


def test_make_grouper_errors():
    with pytest.raises(ConfigError, match="unknown grouper"):
        make_grouper("kmeans")
    with pytest.raises(ConfigError, match="needs the ids"):
        make_grouper("given")
    with pytest.raises(ConfigError, match="group_size"):
        make_grouper("random", group_size=0)
    with pytest.raises(DataError, match="exceeds the 4 training"):
        RandomGrouper(group_size=5).group(torch.zeros(4, 2))


def test_random_groups_do_not_line_up_with_other_seed_zero_permutations():
    # Label flips and subset sampling draw torch.randperm(n) from manual_seed(seed); random
    # groups with the same seed must not reuse that permutation (the flipped examples would
    # then fill the first groups and every detector would look perfect).
    n, size = 1437, 16
    grouping = RandomGrouper(group_size=size, seed=0).group(torch.zeros(n, 1))
    naive = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    first_flips = naive[: n // 10]
    groups_hit = grouping.labels[first_flips].unique().numel()
    assert groups_hit > 50  # ~74 of 90 groups expected; the collision put them in 9
