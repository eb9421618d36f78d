"""Tests of mislabel detection: AUROC, average precision and the fraction-found curve."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from datatrace.errors import DataError
from datatrace.metrics import MislabelResult, mislabel_detection


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
    )


# --- hand-computed values -------------------------------------------------------------------


def test_five_element_example_by_hand_and_sklearn() -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.2], dtype=torch.float64)
    flipped = torch.tensor([False, True, True, False, False])
    r = mislabel_detection(scores, flipped)
    # Flipped {0.4, 0.35}, clean {0.1, 0.8, 0.2}: each flipped score beats 0.1 and 0.2 but not
    # 0.8, so U = 2 + 2 = 4 of 2 * 3 = 6 pairs -> AUROC = 2/3.
    assert r.auroc == pytest.approx(2 / 3, abs=1e-12)
    # Inspection order 0.8 (clean), 0.4 (flipped), 0.35 (flipped), 0.2, 0.1:
    # recall steps at positions 2 and 3 with precision 1/2 and 2/3 ->
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12.
    assert r.auprc == pytest.approx(7 / 12, abs=1e-12)
    assert r.auroc == pytest.approx(roc_auc_score(flipped.numpy(), scores.numpy()), abs=1e-12)
    assert r.auprc == pytest.approx(
        average_precision_score(flipped.numpy(), scores.numpy()), abs=1e-12
    )
    # Found after inspecting 0..5 examples: 0, 0, 1, 2, 2, 2 of 2 flipped.
    _close(r.fraction_inspected, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    _close(r.fraction_found, [0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    # Half the set is 2.5 examples: halfway between 0.5 (2 inspected) and 1.0 (3 inspected).
    assert r.found_at(0.5) == pytest.approx(0.75, abs=1e-12)
    assert r.found_at(0.0) == 0.0 and r.found_at(1.0) == 1.0
    assert r.found_at(0.4) == pytest.approx(0.5, abs=1e-12)
    assert (r.n_flipped, r.n_train, r.base_rate) == (2, 5, 0.4)


def test_perfect_and_inverted_rankings() -> None:
    flipped = torch.tensor([True, True, False, False, False])
    perfect = mislabel_detection(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), flipped)
    assert perfect.auroc == 1.0 and perfect.auprc == 1.0
    # Perfect: each inspection finds a flip until both are found.
    _close(perfect.fraction_found, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0])

    inverted = mislabel_detection(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), flipped)
    assert inverted.auroc == 0.0
    # The flips come 4th and 5th: AP = 1/2 * 1/4 + 1/2 * 2/5 = 0.325.
    assert inverted.auprc == pytest.approx(0.325, abs=1e-12)
    _close(inverted.fraction_found, [0.0, 0.0, 0.0, 0.0, 0.5, 1.0])


def test_ties_by_hand_and_independent_of_input_order() -> None:
    scores = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    flipped = torch.tensor([False, True, False, False, True])
    r = mislabel_detection(scores, flipped)
    # Flipped {1, 0}, clean {2, 1, 1}. Flipped 1: loses to 2, ties twice (1/2 each) -> 1;
    # flipped 0 wins nothing -> U = 1 of 6 pairs. Via average ranks: 0 -> 1, the three 1s
    # -> (2 + 3 + 4) / 3 = 3, 2 -> 5; rank sum of flipped 3 + 1 = 4, minus 2 * 3 / 2 = 1.
    assert r.auroc == pytest.approx(1 / 6, abs=1e-12)
    # Thresholds 2, 1, 0 (a tie block is one threshold): recall 0, 1/2, 1 at 1, 4 and 5
    # inspected -> AP = 1/2 * 1/4 + 1/2 * 2/5 = 13/40.
    assert r.auprc == pytest.approx(13 / 40, abs=1e-12)
    assert r.auroc == pytest.approx(roc_auc_score(flipped.numpy(), scores.numpy()), abs=1e-12)
    assert r.auprc == pytest.approx(
        average_precision_score(flipped.numpy(), scores.numpy()), abs=1e-12
    )
    # The tie block of 3 holds 1 flip, so each of its inspections finds 1/3 flip:
    # found counts 0, 0, 1/3, 2/3, 1, 2 of 2.
    _close(r.fraction_found, [0.0, 0.0, 1 / 6, 1 / 3, 1 / 2, 1.0])

    for perm in ([4, 3, 2, 1, 0], [1, 3, 0, 4, 2], [2, 1, 3, 0, 4]):
        p = torch.tensor(perm)
        rp = mislabel_detection(scores[p], flipped[p])
        assert (rp.auroc, rp.auprc) == (r.auroc, r.auprc)
        torch.testing.assert_close(rp.fraction_found, r.fraction_found, rtol=0, atol=1e-15)


def test_all_tied_is_chance() -> None:
    r = mislabel_detection(torch.ones(4), torch.tensor([True, False, False, False]))
    # Every pair is a tie -> 1/2; one threshold with precision 1/4 -> AP = 1/4; the curve is
    # the diagonal.
    assert r.auroc == 0.5
    assert r.auprc == pytest.approx(0.25, abs=1e-12)
    _close(r.fraction_found, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_curve_is_expectation_over_random_tie_breaking() -> None:
    scores = torch.tensor([1.0, 3.0, 1.0, 3.0, 3.0, 0.0], dtype=torch.float64)
    flipped = torch.tensor([True, False, False, True, True, False])
    n = 6
    curves = []
    # Every order of the examples, then a stable sort by decreasing score: each tie block
    # appears in every internal order equally often.
    for perm in itertools.permutations(range(n)):
        p = torch.tensor(perm)
        ranked = p[torch.sort(scores[p], descending=True, stable=True).indices]
        found = torch.cumsum(flipped[ranked].double(), 0) / flipped.sum()
        curves.append(torch.cat([torch.zeros(1, dtype=torch.float64), found]))
    expected = torch.stack(curves).mean(0)
    r = mislabel_detection(scores, flipped)
    torch.testing.assert_close(r.fraction_found, expected, rtol=0, atol=1e-12)


def test_matches_sklearn_on_random_tied_scores() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 6, n).astype(float)
        flipped = rng.random(n) < 0.3
        if flipped.all() or not flipped.any():
            continue
        r = mislabel_detection(torch.from_numpy(scores), torch.from_numpy(flipped))
        assert r.auroc == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
        assert r.auprc == pytest.approx(average_precision_score(flipped, scores), abs=1e-12)
        assert r.fraction_found[-1] == 1.0
        assert bool((torch.diff(r.fraction_found) >= 0).all())


def test_accepts_numpy_and_lists_and_result_is_frozen() -> None:
    r = mislabel_detection([0.9, 0.1, 0.8, 0.3], np.array([True, False, False, True]))
    assert isinstance(r, MislabelResult)
    assert r.auroc == 0.75
    with pytest.raises(AttributeError):
        r.auroc = 1.0


# --- bad input ------------------------------------------------------------------------------


def test_rejects_bad_shapes_and_masks() -> None:
    with pytest.raises(DataError, match=r"1-D \(n_train,\).*\(2, 3\)"):
        mislabel_detection(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(DataError, match=r"n_train=3.*\(4,\)"):
        mislabel_detection(torch.zeros(3), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(DataError, match=r"bool mask.*torch.int64.*flipped.bool\(\)"):
        mislabel_detection(torch.zeros(3), torch.tensor([1, 0, 0]))
    with pytest.raises(DataError, match="real numbers"):
        mislabel_detection(torch.tensor([True, False]), torch.tensor([True, False]))


def test_needs_both_classes() -> None:
    with pytest.raises(DataError, match="0 flipped and 3 clean of 3"):
        mislabel_detection(torch.arange(3.0), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(DataError, match="3 flipped and 0 clean of 3"):
        mislabel_detection(torch.arange(3.0), torch.ones(3, dtype=torch.bool))
    with pytest.raises(DataError, match="0 flipped and 0 clean of 0"):
        mislabel_detection(torch.zeros(0), torch.zeros(0, dtype=torch.bool))


def test_non_finite_scores_name_the_count() -> None:
    scores = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    with pytest.raises(DataError, match=r"shape \(4,\).*contain 2 non-finite"):
        mislabel_detection(scores, torch.tensor([True, False, False, False]))


def test_found_at_rejects_out_of_range() -> None:
    r = mislabel_detection([1.0, 0.0], [True, False])
    with pytest.raises(DataError, match=r"\[0, 1\]; got 1.5"):
        r.found_at(1.5)
    with pytest.raises(DataError, match="got str"):
        r.found_at("half")


def test_no_sklearn_or_scipy_at_import_time() -> None:
    code = (
        "import sys, datatrace.metrics.mislabel, datatrace.metrics.removal\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
