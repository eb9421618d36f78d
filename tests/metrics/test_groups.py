"""Metrics with ``groups=``: pruning and mislabel detection by hand, singletons, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from datatrace import ConfigError, DataError, Task
from datatrace.group import Grouping
from datatrace.methods import make_attributor
from datatrace.metrics import (
    mislabel_detection,
    pruning_curve,
    random_example_pruning_curve,
    random_pruning_curve,
)
from datatrace.scores import Scores
from tests.models import autograd_loop, classification_data, mlp

GROUPS = [0, 0, 1, 1, 2, 2]  # six examples, three groups of two
FLIPPED = torch.tensor([False, True, True, True, False, False])


# ---------------------------------------------------------------------------- pruning


def kept_after(values, groups, dropped):
    """The training indices ``pruning_curve`` retrains on at one fraction dropped."""
    v = values if isinstance(values, (torch.Tensor, Scores)) else torch.tensor(values)
    return pruning_curve(v, [dropped], lambda k: k, lambda m: 0.0, groups=groups).kept[0]


def test_group_values_are_column_sums_of_validation_scores():
    v = torch.tensor([[1.0, -2.0, 0.25], [0.5, 1.0, -0.75]], dtype=torch.float64)
    r = pruning_curve(v, [0.0], lambda k: k, lambda m: 0.0, groups=GROUPS)
    assert r.unit_values.tolist() == [1.5, -1.0, -0.5]
    s = Scores(values=v, unit_ids=torch.tensor([7, 8, 9]))
    r = pruning_curve(s, [0.5], lambda k: k, lambda m: 0.0, groups=[7, 7, 8, 8, 9, 9])
    assert r.unit_values.tolist() == [1.5, -1.0, -0.5]
    assert r.kept[0].tolist() == [0, 1, 4, 5]  # group 8 goes: training indices come back


@pytest.mark.parametrize(
    ("values", "groups", "dropped", "expected"),
    [
        ([0.5, -1.0, 2.0], GROUPS, 0.0, [0, 1, 2, 3, 4, 5]),
        # at most 3 dropped: group 1 goes (2), group 0 next would make 4
        ([0.5, -1.0, 2.0], GROUPS, 0.5, [0, 1, 4, 5]),
        # at most round(3.96) = 4 dropped: groups 1 then 0 go, 2 examples remain
        ([0.5, -1.0, 2.0], GROUPS, 0.66, [4, 5]),
        # tie: the lower group index is dropped first
        ([1.0, 1.0, 2.0], GROUPS, 0.5, [2, 3, 4, 5]),
        # unequal sizes: group 0 (1 example) goes, group 1 (3) would make 4 > 3
        ([0.0, 1.0, 2.0], [0, 1, 1, 1, 2, 2], 0.5, [1, 2, 3, 4, 5]),
        # non-contiguous ids are relabelled ascending (30 -> 0, 50 -> 1, 90 -> 2): id 50 goes
        ([2.0, -1.0, 0.5], [90, 30, 50, 90, 30, 50], 0.5, [0, 1, 3, 4]),
    ],
)
def test_group_pruning_hand_computed(values, groups, dropped, expected):
    assert kept_after(values, groups, dropped).tolist() == expected


def test_group_pruning_accepts_a_grouping():
    g = Grouping.from_ids(GROUPS)
    assert kept_after(torch.tensor([0.5, -1.0, 2.0]), g, 0.5).tolist() == [0, 1, 4, 5]


def test_singleton_groups_prune_exactly_like_examples():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 23, generator=g, dtype=torch.float64)
    values[:, 5] = values[:, 9]  # a tie
    fractions = [0.0, 0.29, 0.5, 0.9]
    seen: list[list[int]] = [[], []]

    def evaluate(kept: torch.Tensor) -> float:
        return float(kept.double().square().sum())

    ref = pruning_curve(values, fractions, lambda k: seen[0].append(k) or k, evaluate)
    ids = Grouping.from_ids(torch.arange(23))
    got = pruning_curve(values, fractions, lambda k: seen[1].append(k) or k, evaluate, groups=ids)
    for name in ("fractions", "n_kept", "accuracy", "unit_values"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert all(torch.equal(a, b) for a, b in zip(got.kept, ref.kept, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))


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


def test_group_pruning_curve_retrains_on_whole_groups():
    retrain, evaluate = ridge_accuracy_fns()
    ids = torch.arange(48) // 4  # 12 groups of 4
    values = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fractions = [0.0, 0.25, 0.5, 0.75]
    r = pruning_curve(values, fractions, retrain, evaluate, groups=ids)
    assert r.n_kept.tolist() == [48, 36, 24, 12]
    for j, fr in enumerate(fractions):
        kept = kept_after(values, ids, fr)
        assert torch.equal(r.kept[j], kept)
        assert r.accuracy[j] == evaluate(retrain(kept))
    # nested: a larger fraction dropped keeps a subset
    for big, small in itertools.pairwise(r.kept):
        assert set(small.tolist()) <= set(big.tolist())
    # the dropped groups are exactly the lowest-valued ones
    dropped = sorted(set(range(12)) - set((r.kept[2] // 4).tolist()))
    assert dropped == torch.sort(values).indices[:6].sort().values.tolist()


def test_random_example_pruning_removes_the_same_number_nested_and_seeded():
    retrain, evaluate = ridge_accuracy_fns()
    r = random_example_pruning_curve(48, [48, 30, 7], retrain, evaluate, seed=3)
    assert [len(k) for k in r.kept] == r.n_kept.tolist() == [48, 30, 7]
    assert r.fractions.tolist() == [0.0, 18 / 48, 41 / 48]
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r.kept[1], torch.sort(perm[:30]).values)
    assert set(r.kept[2].tolist()) <= set(r.kept[1].tolist())
    assert r.accuracy[1] == evaluate(retrain(r.kept[1]))
    again = random_example_pruning_curve(48, [30], retrain, evaluate, seed=3)
    other = random_example_pruning_curve(48, [30], retrain, evaluate, seed=4)
    assert torch.equal(again.kept[0], r.kept[1])
    assert not torch.equal(other.kept[0], r.kept[1])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), True, "half"])
def test_fraction_dropped_outside_range_is_refused(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        pruning_curve(torch.tensor([0.5, -1.0, 2.0]), [0.0, bad], len, len, groups=GROUPS)


def test_bad_pruning_input_is_refused():
    with pytest.raises(DataError, match=r"one value per group \(n_groups=3\); got 2"):
        kept_after([0.5, -1.0], GROUPS, 0.5)
    with pytest.raises(DataError, match="non-finite"):
        kept_after(torch.tensor([0.5, float("inf"), 1.0]), GROUPS, 0.5)
    with pytest.raises(DataError, match="non-negative integer group ids"):
        kept_after(torch.tensor([0.5, -1.0, 2.0]), [0.0, 0.0, 1.0, 1.0, 2.0, 2.0], 0.5)
    with pytest.raises(DataError, match="not the groups' ids"):
        s = Scores(values=torch.ones(1, 3, dtype=torch.float64), unit_ids=torch.tensor([1, 2, 3]))
        kept_after(s, GROUPS, 0.5)
    with pytest.raises(ConfigError, match="6 training examples drops 6 and keeps none"):
        kept_after(torch.tensor([0.0, 1.0, 2.0]), GROUPS, 0.99)
    with pytest.raises(ConfigError, match="at least one"):
        pruning_curve(torch.tensor([0.5, -1.0, 2.0]), [], lambda k: k, len, groups=GROUPS)
    with pytest.raises(DataError, match="evaluate_fn must return a float"):
        pruning_curve(torch.tensor([0.5, -1.0, 2.0]), [0.0], len, lambda m: "x", groups=GROUPS)
    with pytest.raises(ConfigError, match=r"\[1, n_train=6\]"):
        random_example_pruning_curve(6, [7], lambda k: k, len)
    with pytest.raises(ConfigError, match=r"\[1, n_train=6\]"):
        random_example_pruning_curve(6, [0], lambda k: k, len)
    with pytest.raises(ConfigError, match="positive int"):
        random_pruning_curve(0, [0.0], lambda k: k, len)


# ---------------------------------------------------------------------------- noisy labels


def test_inspection_curve_hand_computed():
    # order: group 1 (2 flips), group 2 (0), group 0 (1) of 3 flips
    r = mislabel_detection([1.0, 3.0, 2.0], FLIPPED, groups=GROUPS)
    torch.testing.assert_close(
        r.fraction_inspected, torch.arange(7, dtype=torch.float64) / 6, rtol=0, atol=0
    )
    torch.testing.assert_close(
        r.fraction_found[::2], torch.tensor([0, 2 / 3, 2 / 3, 1], dtype=torch.float64)
    )
    # trapezoids: (1/3)(0 + 2/3)/2 + (1/3)(2/3 + 2/3)/2 + (1/3)(2/3 + 1)/2 = 11/18
    assert r.area == pytest.approx(11 / 18, rel=1e-12)
    assert r.found_at(1 / 6) == pytest.approx(1 / 3, rel=1e-12)  # inside a group: linear
    assert r.n_flipped == 3
    # examples take their group's score: AUROC over (flipped, clean) example pairs
    assert r.auroc == pytest.approx(mislabel_detection([1.0, 1, 3, 3, 2, 2], FLIPPED).auroc)


def test_inspection_curve_with_unequal_groups_weights_by_size():
    # group 0 = {0}, group 1 = {1, 2, 3}, group 2 = {4, 5}; inspect 1, 0, 2
    r = mislabel_detection([2.0, 5.0, -1.0], FLIPPED, groups=[0, 1, 1, 1, 2, 2])
    torch.testing.assert_close(
        r.fraction_found, torch.tensor([0, 1 / 3, 2 / 3, 1, 1, 1, 1], dtype=torch.float64)
    )
    assert r.area == pytest.approx(0.5 * 0.5 + 0.5, rel=1e-12)


def test_singleton_groups_equal_mislabel_detection_exactly():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, generator=g, dtype=torch.float64)
    scores[7] = scores[3] = scores[11]  # ties count as in the per-example metric
    flipped = torch.rand(40, generator=g) < 0.25
    ref = mislabel_detection(scores, flipped)
    for groups in (torch.arange(40), Grouping.from_ids(torch.arange(40))):
        r = mislabel_detection(scores, flipped, groups=groups)
        assert (r.auroc, r.auprc, r.area) == (ref.auroc, ref.auprc, ref.area)
        assert torch.equal(r.fraction_found, ref.fraction_found)
        assert torch.equal(r.fraction_inspected, ref.fraction_inspected)


def test_random_group_order_has_area_near_half():
    ids = torch.arange(60) // 4
    flipped = torch.zeros(60, dtype=torch.bool)
    flipped[::5] = True

    def area(seed: int) -> float:
        u = torch.rand(15, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return mislabel_detection(u, flipped, groups=ids).area

    assert area(1) == area(1)
    # equal sizes: the expected curve over random orders is the diagonal (area 1/2)
    areas = torch.tensor([area(s) for s in range(200)])
    assert abs(float(areas.mean()) - 0.5) < 0.03


def test_bad_inspection_input_is_refused():
    with pytest.raises(DataError, match=r"one value per group \(n_groups=3\); got 4"):
        mislabel_detection([1.0, 2.0, 3.0, 4.0], FLIPPED, groups=GROUPS)
    with pytest.raises(DataError, match=r"shape \(n_train=6,\)"):
        mislabel_detection([1.0, 2.0, 3.0], FLIPPED[:5], groups=GROUPS)
    with pytest.raises(DataError, match="bool mask"):
        mislabel_detection([1.0, 2.0, 3.0], FLIPPED.long(), groups=GROUPS)
    with pytest.raises(DataError, match="0 flipped"):
        mislabel_detection([1.0, 2.0, 3.0], torch.zeros(6, dtype=torch.bool), groups=GROUPS)
    with pytest.raises(DataError, match="non-finite"):
        mislabel_detection([1.0, float("nan"), 3.0], FLIPPED, groups=GROUPS)


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
    a = mislabel_detection(got, flipped, groups=ids)
    b = mislabel_detection(ref, flipped, groups=ids)
    assert a.area == pytest.approx(b.area, rel=1e-12)
    assert a.auroc == b.auroc
