"""Tests of the removal metrics: top proponents, brittleness and dataset pruning curves."""

from itertools import pairwise

import pytest
import torch

from datatrace.errors import ConfigError, DataError
from datatrace.metrics import (
    BrittlenessResult,
    PruningResult,
    brittleness_curve,
    pruning_curve,
    random_pruning_curve,
    top_proponents,
)
from datatrace.scores import Scores

# --- top proponents -------------------------------------------------------------------------


def test_top_proponents_by_hand_with_ties() -> None:
    values = torch.tensor([[0.5, -1.0, 2.0, 0.5], [-3.0, -1.0, -2.0, -1.0]])
    # Row 0: 2.0 (col 2), then the tie 0.5 at cols 0 and 3 (lower index first).
    # Row 1: all negative; -1.0 at cols 1 and 3, then -2.0 at col 2.
    assert top_proponents(values, 3).tolist() == [[2, 0, 3], [1, 3, 2]]
    assert top_proponents(values, 4).tolist() == [[2, 0, 3, 1], [1, 3, 2, 0]]


def test_top_proponents_returns_unit_ids_of_scores() -> None:
    s = Scores(torch.tensor([[0.5, -1.0, 2.0]]), unit_ids=torch.tensor([10, 11, 12]))
    assert top_proponents(s, 2).tolist() == [[12, 10]]


def test_top_proponents_rejects_bad_input() -> None:
    values = torch.zeros(2, 4)
    for k in (0, 5, True, 1.5):
        with pytest.raises(ConfigError, match=r"\[1, n_train=4\]"):
            top_proponents(values, k)
    with pytest.raises(DataError, match=r"2-D \(n_query, n_train\).*\(4,\)"):
        top_proponents(torch.zeros(4), 1)
    with pytest.raises(DataError, match=r"contain 1 non-finite"):
        top_proponents(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(DataError, match="got list"):
        top_proponents([[1.0, 2.0]], 1)


# --- brittleness ----------------------------------------------------------------------------

# A toy world with 6 training units: query q's prediction flips exactly when every unit of its
# support is removed. The "model" is the removed set.
SUPPORT = {0: {0, 1}, 1: {2, 3}, 2: {4}}
VALUES = torch.tensor(
    [
        [5.0, 4.0, 0.0, 0.0, 1.0, 0.0],  # ranking 0, 1, 4, 2, 3, 5
        [0.0, 0.0, 1.0, 3.0, 0.0, 2.0],  # ranking 3, 5, 2, 0, 1, 4
        [0.0, 0.0, 0.0, 0.0, -1.0, 0.0],  # ranking 0, 1, 2, 3, 5, 4 (its support is last)
    ],
    dtype=torch.float64,
)


def test_brittleness_curve_by_hand() -> None:
    calls: list[tuple[int, list[int]]] = []

    def retrain(query: int, removed: torch.Tensor) -> frozenset[int]:
        calls.append((query, removed.tolist()))
        return frozenset(removed.tolist())

    def flips(model: frozenset[int], query: int) -> bool:
        return SUPPORT[query] <= model

    r = brittleness_curve(VALUES, [1, 2, 3], retrain, flips)
    assert isinstance(r, BrittlenessResult)
    # k=1: removed {0}, {3}, {0}            -> no flip            -> 0
    # k=2: removed {0,1}, {3,5}, {0,1}      -> q0 flips           -> 1/3
    # k=3: removed {0,1,4}, {3,5,2}, {0,1,2} -> q0 and q1 flip     -> 2/3
    torch.testing.assert_close(
        r.fraction_flipped, torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64)
    )
    assert r.flipped.tolist() == [
        [False, False, False],
        [True, False, False],
        [True, True, False],
    ]
    assert r.ks.tolist() == [1, 2, 3] and r.query_ids.tolist() == [0, 1, 2]
    assert r.first_flip_k.tolist() == [2, 3, -1]
    # One retraining per (k, query), the removed units strongest first.
    assert calls == [
        (0, [0]),
        (1, [3]),
        (2, [0]),
        (0, [0, 1]),
        (1, [3, 5]),
        (2, [0, 1]),
        (0, [0, 1, 4]),
        (1, [3, 5, 2]),
        (2, [0, 1, 2]),
    ]


def test_brittleness_passes_ids_of_scores() -> None:
    # Rows 1 and 2 of VALUES, as query ids 7 and 9, with units renamed 100..105.
    s = Scores(VALUES[1:], unit_ids=torch.arange(100, 106), query_ids=torch.tensor([7, 9]))
    support = {7: {102, 103}, 9: {104}}
    r = brittleness_curve(
        s,
        torch.tensor([3, 6]),
        lambda q, removed: set(removed.tolist()),
        lambda model, q: torch.tensor(support[q] <= model),  # a 0-dim bool tensor is a bool
    )
    # k=3 removes {103, 105, 102} for query 7 (flips) and {100, 101, 102} for 9 (no flip);
    # k=6 removes everything -> both flip.
    assert r.flipped.tolist() == [[True, False], [True, True]]
    assert r.query_ids.tolist() == [7, 9]
    assert r.first_flip_k.tolist() == [3, 6]
    torch.testing.assert_close(r.fraction_flipped, torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_brittleness_rejects_bad_ks_and_flips() -> None:
    def retrain(q: int, removed: torch.Tensor) -> None:
        return None

    for ks, msg in (
        ([], "at least one"),
        ([2, 1], r"strictly increasing; got \[2, 1\]"),
        ([1, 7], r"\[1, n_train=6\]; got 7"),
        ([0], r"\[1, n_train=6\]; got 0"),
    ):
        with pytest.raises(ConfigError, match=msg):
            brittleness_curve(VALUES, ks, retrain, lambda m, q: False)
    with pytest.raises(DataError, match=r"must return a bool; got 1 for query 0 at k=1"):
        brittleness_curve(VALUES, [1], retrain, lambda m, q: 1)
    with pytest.raises(DataError, match=r"dtype torch.bool and shape \(2,\)"):
        brittleness_curve(VALUES, [1], retrain, lambda m, q: torch.tensor([True, False]))
    with pytest.raises(DataError, match=r"at least one query.*\(0, 6\)"):
        brittleness_curve(VALUES[:0], [1], retrain, lambda m, q: False)


# --- pruning --------------------------------------------------------------------------------

# Two validation queries over 5 units; column sums (unit values) are [2, -1, -0.5, 2, 0.25].
PRUNE_VALUES = torch.tensor(
    [[1.0, -2.0, 0.5, 3.0, 0.0], [1.0, 1.0, -1.0, -1.0, 0.25]], dtype=torch.float64
)
# Toy "accuracy": the share of a known per-unit weight that the kept units carry.
WEIGHTS = torch.tensor([0.3, 0.0, 0.1, 0.4, 0.2], dtype=torch.float64)


def test_pruning_curve_by_hand() -> None:
    kept_sets: list[list[int]] = []

    def retrain(kept: torch.Tensor) -> torch.Tensor:
        kept_sets.append(kept.tolist())
        return kept

    def evaluate(kept: torch.Tensor) -> float:
        return float(WEIGHTS[kept].sum())

    r = pruning_curve(PRUNE_VALUES, [0.0, 0.2, 0.4, 0.6, 0.8], retrain, evaluate)
    assert isinstance(r, PruningResult)
    # Ascending value: unit 1 (-1), 2 (-0.5), 4 (0.25), then the tie 0 and 3 (2.0; unit 0,
    # the lower index, goes first). Dropping 0, 1, 2, 3, 4 of them keeps:
    assert kept_sets == [[0, 1, 2, 3, 4], [0, 2, 3, 4], [0, 3, 4], [0, 3], [3]]
    # Accuracy = kept weight: 1.0, 1.0 (unit 1 weighs 0), 0.9, 0.7, 0.4.
    torch.testing.assert_close(
        r.accuracy, torch.tensor([1.0, 1.0, 0.9, 0.7, 0.4], dtype=torch.float64)
    )
    assert r.n_kept.tolist() == [5, 4, 3, 2, 1]
    torch.testing.assert_close(
        r.fractions, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    )
    torch.testing.assert_close(
        r.unit_values, torch.tensor([2.0, -1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    )


def test_pruning_curve_from_unit_values_and_scores_ids() -> None:
    def evaluate(kept: torch.Tensor) -> float:
        return float(len(kept))

    direct = pruning_curve(PRUNE_VALUES.sum(0), [0.4], lambda kept: kept, evaluate)
    seen: list[list[int]] = []
    s = Scores(PRUNE_VALUES, unit_ids=torch.arange(10, 15))
    pruning_curve(s, [0.4], lambda kept: seen.append(kept.tolist()), lambda m: 0.0)
    # Dropping units 1 and 2 keeps 0, 3, 4, reported as the Scores' ids.
    assert seen == [[10, 13, 14]]
    assert direct.accuracy.tolist() == [3.0]


def test_pruning_rounds_half_up() -> None:
    drops: list[int] = []

    def retrain(kept: torch.Tensor) -> int:
        return len(kept)

    for n, fraction, expected_kept in ((100, 0.29, 71), (3, 0.5, 1), (4, 0.5, 2), (10, 0.04, 10)):
        # 0.29 * 100 = 28.999999999999996 -> 29 dropped; 0.5 * 3 = 1.5 -> 2 dropped;
        # 0.04 * 10 = 0.4 -> none dropped.
        r = pruning_curve(torch.arange(float(n)), [fraction], retrain, float)
        drops.append(n - int(r.n_kept[0]))
        assert r.accuracy.tolist() == [float(expected_kept)]
    assert drops == [29, 2, 2, 0]


def test_random_pruning_curve_is_seeded_and_nested() -> None:
    kept_sets: list[set[int]] = []

    def retrain(kept: torch.Tensor) -> torch.Tensor:
        kept_sets.append(set(kept.tolist()))
        return kept

    fractions = [0.0, 0.25, 0.5, 0.75]
    r = random_pruning_curve(20, fractions, retrain, lambda kept: float(len(kept)), seed=3)
    # Kept counts 20 - round(20 p) = 20, 15, 10, 5; "accuracy" is the count here.
    assert r.n_kept.tolist() == [20, 15, 10, 5]
    assert r.accuracy.tolist() == [20.0, 15.0, 10.0, 5.0]
    assert all(b < a for a, b in pairwise(kept_sets))  # strictly nested
    # Same seed, same draw; it is exactly pruning_curve on the seeded uniform values.
    u = torch.rand(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    again: list[set[int]] = []
    pruning_curve(u, fractions, lambda kept: again.append(set(kept.tolist())), lambda m: 0.0)
    assert again == kept_sets
    torch.testing.assert_close(r.unit_values, u, rtol=0, atol=0)
    other = random_pruning_curve(20, [0.5], lambda kept: set(kept.tolist()), lambda m: 0.0, 4)
    assert not torch.equal(other.unit_values, r.unit_values)


def test_pruning_rejects_bad_input() -> None:
    def keep(kept: torch.Tensor) -> torch.Tensor:
        return kept

    def ok(model: torch.Tensor) -> float:
        return 1.0

    for fractions, msg in (
        ([], "at least one"),
        ([-0.1], r"\[0, 1\).*-0.1"),
        ([1.0], r"\[0, 1\).*1.0"),
        ([0.5, 0.2], r"strictly increasing; got \[0.5, 0.2\]"),
        (["a"], r"numbers in \[0, 1\); got 'a' \(str\)"),
        ([0.9], r"fraction 0.9 of 4 units drops 4 and keeps none"),
    ):
        with pytest.raises(ConfigError, match=msg):
            pruning_curve(torch.arange(4.0), fractions, keep, ok)
    with pytest.raises(DataError, match=r"got str at fraction 0.0"):
        pruning_curve(torch.arange(4.0), [0.0], keep, lambda m: "high")
    with pytest.raises(DataError, match=r"returned nan at fraction 0.5"):
        pruning_curve(
            torch.arange(4.0), [0.0, 0.5], keep, lambda m: len(m) if len(m) > 2 else float("nan")
        )
    with pytest.raises(DataError, match=r"\(n_query, n_train\).*\(2, 2, 2\)"):
        pruning_curve(torch.zeros(2, 2, 2), [0.0], keep, ok)
    with pytest.raises(DataError, match=r"contain 1 non-finite"):
        pruning_curve(torch.tensor([1.0, float("inf")]), [0.0], keep, ok)
    with pytest.raises(DataError, match=r"contain 2 non-finite"):
        pruning_curve(torch.full((1, 2), float("nan")), [0.0], keep, ok)
    with pytest.raises(ConfigError, match=r"n_units must be a positive int; got 0"):
        random_pruning_curve(0, [0.0], keep, ok)
