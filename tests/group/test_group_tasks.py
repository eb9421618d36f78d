"""Group pruning and noisy-label identification: hand-computed values, references, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from datatrace import ConfigError, DataError, Task
from datatrace.bench.group_tasks import (
    group_inspection_curve,
    group_pruning_curve,
    group_values,
    prune_groups,
    random_example_pruning_curve,
    random_group_inspection_curve,
    sum_per_group,
)
from datatrace.group import Grouping
from datatrace.methods import make_attributor
from datatrace.metrics import mislabel_detection
from datatrace.scores import Scores
from tests.models import autograd_loop, classification_data, mlp

GROUPS = [0, 0, 1, 1, 2, 2]  # six examples, three groups of two
FLIPPED = torch.tensor([False, True, True, True, False, False])


# ---------------------------------------------------------------------------- pruning


def test_group_values_are_column_sums_of_validation_scores():
    v = torch.tensor([[1.0, -2.0, 0.25], [0.5, 1.0, -0.75]], dtype=torch.float64)
    assert group_values(v).tolist() == [1.5, -1.0, -0.5]
    s = Scores(values=v, unit_ids=torch.tensor([7, 8, 9]))
    assert group_values(s).tolist() == [1.5, -1.0, -0.5]


@pytest.mark.parametrize(
    ("values", "groups", "fraction", "expected"),
    [
        ([0.5, -1.0, 2.0], GROUPS, 1.0, [0, 1, 2, 3, 4, 5]),
        # target 3: dropping group 1 leaves 4, dropping group 0 next would leave 2 < 3
        ([0.5, -1.0, 2.0], GROUPS, 0.5, [0, 1, 4, 5]),
        # target round(2.04) = 2: groups 1 then 0 go, 2 examples remain
        ([0.5, -1.0, 2.0], GROUPS, 0.34, [4, 5]),
        # tie: the lower group index is dropped first
        ([1.0, 1.0, 2.0], GROUPS, 0.5, [2, 3, 4, 5]),
        # unequal sizes: group 0 (1 example) goes, group 1 (3) would leave 2 < 3
        ([0.0, 1.0, 2.0], [0, 1, 1, 1, 2, 2], 0.5, [1, 2, 3, 4, 5]),
        # at least one example is kept even for a tiny fraction (whole group 2 here)
        ([0.0, 1.0, 2.0], GROUPS, 0.01, [4, 5]),
        # non-contiguous ids are relabelled ascending (30 -> 0, 50 -> 1, 90 -> 2): id 50 goes
        ([2.0, -1.0, 0.5], [90, 30, 50, 90, 30, 50], 0.5, [0, 1, 3, 4]),
    ],
)
def test_prune_groups_hand_computed(values, groups, fraction, expected):
    assert prune_groups(values, groups, fraction).tolist() == expected


def test_prune_groups_accepts_a_grouping():
    g = Grouping.from_ids(GROUPS)
    assert prune_groups(torch.tensor([0.5, -1.0, 2.0]), g, 0.5).tolist() == [0, 1, 4, 5]


def ridge_accuracy_fns():
    """Real retraining: float64 ridge regression on one-hot labels, closed form."""
    x, y = classification_data(n=48, d_in=4, n_classes=3, seed=2)
    xt, yt = classification_data(n=30, d_in=4, n_classes=3, seed=5)

    def retrain(kept: torch.Tensor) -> torch.Tensor:
        a = x[kept]
        t = F.one_hot(y[kept], 3).to(torch.float64)
        return torch.linalg.solve(a.T @ a + 0.1 * torch.eye(4, dtype=torch.float64), a.T @ t)

    def evaluate(w: torch.Tensor) -> float:
        return float(((xt @ w).argmax(1) == yt).double().mean())

    return retrain, evaluate


def test_group_pruning_curve_retrains_on_prune_groups_sets():
    retrain, evaluate = ridge_accuracy_fns()
    ids = torch.arange(48) // 4  # 12 groups of 4
    values = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fractions = [1.0, 0.75, 0.5, 0.25]
    r = group_pruning_curve(values, ids, fractions, retrain, evaluate)
    assert r.n_kept.tolist() == [48, 36, 24, 12]
    for j, fr in enumerate(fractions):
        kept = prune_groups(values, ids, fr)
        assert torch.equal(r.kept[j], kept)
        assert r.accuracy[j] == evaluate(retrain(kept))
    # nested: a smaller fraction keeps a subset
    for big, small in itertools.pairwise(r.kept):
        assert set(small.tolist()) <= set(big.tolist())
    # the dropped groups are exactly the lowest-valued ones
    dropped = sorted(set(range(12)) - set((r.kept[2] // 4).tolist()))
    assert dropped == torch.sort(values).indices[:6].sort().values.tolist()


def test_random_example_pruning_removes_the_same_number_nested_and_seeded():
    retrain, evaluate = ridge_accuracy_fns()
    r = random_example_pruning_curve(48, [48, 30, 7], retrain, evaluate, seed=3)
    assert [len(k) for k in r.kept] == [48, 30, 7]
    assert r.fractions_kept.tolist() == [1.0, 30 / 48, 7 / 48]
    assert set(r.kept[2].tolist()) <= set(r.kept[1].tolist())
    assert r.accuracy[1] == evaluate(retrain(r.kept[1]))
    again = random_example_pruning_curve(48, [30], retrain, evaluate, seed=3)
    other = random_example_pruning_curve(48, [30], retrain, evaluate, seed=4)
    assert torch.equal(again.kept[0], r.kept[1])
    assert not torch.equal(other.kept[0], r.kept[1])


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True, "half"])
def test_fraction_kept_outside_range_is_refused(bad):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        prune_groups([0.5, -1.0, 2.0], GROUPS, bad)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        group_pruning_curve([0.5, -1.0, 2.0], GROUPS, [1.0, bad], lambda k: k, len)


def test_bad_pruning_input_is_refused():
    with pytest.raises(DataError, match=r"n_groups=3.*got \(2,\)"):
        prune_groups([0.5, -1.0], GROUPS, 0.5)
    with pytest.raises(DataError, match="non-finite"):
        prune_groups([0.5, float("inf"), 1.0], GROUPS, 0.5)
    with pytest.raises(ConfigError, match="at least one"):
        group_pruning_curve([0.5, -1.0, 2.0], GROUPS, [], lambda k: k, len)
    with pytest.raises(DataError, match="evaluate_fn must return a float"):
        group_pruning_curve([0.5, -1.0, 2.0], GROUPS, [1.0], lambda k: k, lambda m: "x")
    with pytest.raises(DataError, match=r"\(n_val, n_groups\)"):
        group_values(torch.ones(3))
    with pytest.raises(ConfigError, match=r"\[1, n_train=6\]"):
        random_example_pruning_curve(6, [7], lambda k: k, len)
    with pytest.raises(ConfigError, match=r"\[1, n_train=6\]"):
        random_example_pruning_curve(6, [0], lambda k: k, len)


# ---------------------------------------------------------------------------- noisy labels


def test_inspection_curve_hand_computed():
    # order: group 1 (2 flips), group 2 (0), group 0 (1) of 3 flips
    r = group_inspection_curve([1.0, 3.0, 2.0], GROUPS, FLIPPED)
    assert r.order.tolist() == [1, 2, 0]
    torch.testing.assert_close(
        r.fraction_inspected, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64)
    )
    torch.testing.assert_close(
        r.fraction_found, torch.tensor([0, 2 / 3, 2 / 3, 1], dtype=torch.float64)
    )
    # trapezoids: (1/3)(0 + 2/3)/2 + (1/3)(2/3 + 2/3)/2 + (1/3)(2/3 + 1)/2 = 11/18
    assert r.area == pytest.approx(11 / 18, rel=1e-12)
    assert r.found_at(1 / 6) == pytest.approx(1 / 3, rel=1e-12)
    assert r.n_flipped == 3


def test_inspection_curve_with_unequal_groups_weights_by_size():
    # group 0 = {0}, group 1 = {1, 2, 3}, group 2 = {4, 5}; inspect 1, 0, 2
    r = group_inspection_curve([2.0, 5.0, -1.0], [0, 1, 1, 1, 2, 2], FLIPPED)
    torch.testing.assert_close(
        r.fraction_inspected, torch.tensor([0, 3 / 6, 4 / 6, 1], dtype=torch.float64)
    )
    torch.testing.assert_close(r.fraction_found, torch.tensor([0, 1, 1, 1], dtype=torch.float64))
    assert r.area == pytest.approx(0.5 * 0.5 + 0.5, rel=1e-12)


def test_singleton_groups_match_mislabel_detection():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, generator=g, dtype=torch.float64)  # no ties
    flipped = torch.rand(40, generator=g) < 0.25
    r = group_inspection_curve(scores, torch.arange(40), flipped)
    ref = mislabel_detection(scores, flipped)
    torch.testing.assert_close(r.fraction_found, ref.fraction_found, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r.fraction_inspected, ref.fraction_inspected)


def test_random_inspection_is_a_seeded_permutation_with_area_near_half():
    ids = torch.arange(60) // 4
    flipped = torch.zeros(60, dtype=torch.bool)
    flipped[::5] = True
    a = random_group_inspection_curve(ids, flipped, seed=1)
    assert sorted(a.order.tolist()) == list(range(15))
    assert torch.equal(a.order, random_group_inspection_curve(ids, flipped, seed=1).order)
    # equal sizes: the expected curve over random orders is the diagonal (area 1/2)
    areas = torch.tensor([random_group_inspection_curve(ids, flipped, s).area for s in range(200)])
    assert abs(float(areas.mean()) - 0.5) < 0.03


def test_sum_per_group_hand_computed():
    assert sum_per_group([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], GROUPS).tolist() == [3.0, 12.0, 48.0]
    with pytest.raises(DataError, match=r"n_groups=6.*got \(5,\)"):
        sum_per_group([1.0] * 5, GROUPS)


def test_bad_inspection_input_is_refused():
    with pytest.raises(DataError, match=r"n_groups=3.*got \(4,\)"):
        group_inspection_curve([1.0, 2.0, 3.0, 4.0], GROUPS, FLIPPED)
    with pytest.raises(DataError, match="bool mask of shape"):
        group_inspection_curve([1.0, 2.0, 3.0], GROUPS, FLIPPED[:5])
    with pytest.raises(DataError, match="bool mask of shape"):
        group_inspection_curve([1.0, 2.0, 3.0], GROUPS, FLIPPED.long())
    with pytest.raises(DataError, match="no example"):
        group_inspection_curve([1.0, 2.0, 3.0], GROUPS, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(DataError, match="non-finite"):
        group_inspection_curve([1.0, float("nan"), 3.0], GROUPS, FLIPPED)


def test_grad_dot_group_self_influence_ranks_like_the_autograd_reference():
    """End to end: group self-influence of grad-dot is |sum of member gradients|^2."""
    model = mlp()
    x, y = classification_data(n=12)
    ids = torch.arange(12) % 4  # 4 groups of 3
    flipped = torch.zeros(12, dtype=torch.bool)
    flipped[[1, 6]] = True
    attr = make_attributor("grad-dot", Task(model), groups=ids).fit((x, y))
    got = attr.self_attribute()

    def loss(m, xb, yb):
        return F.cross_entropy(m(xb), yb, reduction="sum")

    per_example = autograd_loop(model, loss, x, y)
    ref = (Grouping.from_ids(ids).sum_rows(per_example) ** 2).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    a = group_inspection_curve(got, ids, flipped)
    b = group_inspection_curve(ref, ids, flipped)
    assert torch.equal(a.order, b.order)
    assert a.area == b.area


def test_fractions_kept_must_be_a_sequence():
    with pytest.raises(ConfigError, match="sequence of numbers"):
        group_pruning_curve([0.5, -1.0, 2.0], GROUPS, 0.5, lambda k: k, len)
