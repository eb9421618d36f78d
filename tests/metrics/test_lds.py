"""Tests of the LDS, Spearman, paired bootstrap and leave-one-out agreement."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from datatrace.errors import ConfigError, DataError
from datatrace.metrics import (
    LDSResult,
    beats,
    lds,
    loo_correlation,
    not_worse,
    paired_bootstrap,
    spearman,
    spearman_batched,
)
from datatrace.scores import Scores

# --- Spearman -------------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        # Few distinct integers, so most draws have ties in both inputs.
        a = rng.integers(0, 5, n).astype(float)
        b = rng.integers(0, 4, n).astype(float)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        expected = spearmanr(a, b).statistic
        assert spearman(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
            expected, abs=1e-12
        )


def test_spearman_batched_matches_scipy_along_both_dims() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, (25, 7)).astype(float)
    b = a + rng.normal(0, 2, (25, 7)).round()
    cols = spearman_batched(torch.from_numpy(a), torch.from_numpy(b), dim=0)
    rows = spearman_batched(torch.from_numpy(a.T), torch.from_numpy(b.T), dim=1)
    expected = [spearmanr(a[:, k], b[:, k]).statistic for k in range(7)]
    assert cols.shape == (7,)
    np.testing.assert_allclose(cols.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rows.numpy(), expected, rtol=0, atol=1e-12)


def test_spearman_constant_input_is_nan() -> None:
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    out = spearman_batched(
        torch.tensor([[1.0, 1.0], [1.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    )
    assert math.isnan(out[0]) and out[1] == 1.0


def test_spearman_rejects_bad_shapes_and_nan() -> None:
    with pytest.raises(DataError, match=r"\(3,\) and \(4,\)"):
        spearman(torch.zeros(3), torch.zeros(4))
    with pytest.raises(DataError, match="at least 2"):
        spearman([1.0], [2.0])
    with pytest.raises(DataError, match="NaN"):
        spearman([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(DataError, match=r"\(3, 2\) and \(2, 3\)"):
        spearman_batched(torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="dim"):
        spearman_batched(torch.zeros(3, 2), torch.zeros(3, 2), dim=2)


# --- LDS ------------------------------------------------------------------------------------


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 3 training units, 4 subsets: {0}, {1}, {2}, {0, 1}.
    subsets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    scores = torch.tensor(
        [
            [1.0, 2.0, 4.0],  # predicted over subsets: [1, 2, 4, 3]
            [1.0, 2.0, 4.0],  # predicted: [1, 2, 4, 3]
            [0.0, 1.0, 3.0],  # predicted: [0, 1, 3, 1] (a tie)
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor(
        [
            # q0 same order as predicted -> rho = 1
            # q1 reversed order            -> rho = -1
            # q2 ranks [1, 2, 3, 4]; predicted ranks [1, 2.5, 4, 2.5] (tie averaged)
            [10.0, 4.0, 1.0],
            [20.0, 3.0, 2.0],
            [40.0, 1.0, 3.0],
            [30.0, 2.0, 4.0],
        ],
        dtype=torch.float64,
    )
    return scores, subsets, targets


def test_lds_hand_computed_example() -> None:
    scores, subsets, targets = _hand_case()
    result = lds(scores, subsets, targets)
    # q2 by hand: both rank vectors have mean 2.5.
    #   predicted ranks - 2.5 = [-1.5, 0, 1.5, 0];  actual ranks - 2.5 = [-1.5, -0.5, 0.5, 1.5]
    #   sum of products = 2.25 + 0 + 0.75 + 0 = 3.0
    #   sum of squares  = 4.5 and 5.0  ->  rho = 3 / sqrt(22.5) = sqrt(0.4) ≈ 0.63246
    q2 = 3.0 / math.sqrt(4.5 * 5.0)
    assert q2 == pytest.approx(math.sqrt(0.4))
    torch.testing.assert_close(
        result.per_query, torch.tensor([1.0, -1.0, q2], dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert result.mean == pytest.approx((1.0 - 1.0 + q2) / 3, abs=1e-12)
    assert result.n_excluded == 0 and result.n_used == 3


def test_lds_accepts_scores_object_and_excludes_constant_queries() -> None:
    scores, subsets, targets = _hand_case()
    targets = targets.clone()
    targets[:, 1] = 7.0  # q1 constant over subsets -> undefined, left out of the mean
    result = lds(Scores(scores), subsets, targets)
    assert math.isnan(result.per_query[1])
    assert result.n_excluded == 1 and result.n_used == 2
    assert result.mean == pytest.approx((1.0 + math.sqrt(0.4)) / 2, abs=1e-12)


def test_lds_of_exact_linear_model_is_one() -> None:
    gen = torch.Generator().manual_seed(3)
    n_query, n_train, m = 20, 30, 50
    scores = torch.randn(n_query, n_train, generator=gen, dtype=torch.float64)
    subsets = torch.rand(m, n_train, generator=gen) < 0.5
    linear = subsets.double() @ scores.T
    result = lds(scores, subsets, torch.exp(linear))  # any increasing map keeps ranks
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    # Sign convention: scores of the opposite sign are perfectly wrong.
    assert lds(-scores, subsets, linear).mean == pytest.approx(-1.0, abs=1e-12)


def test_lds_of_random_scores_is_near_zero() -> None:
    gen = torch.Generator().manual_seed(4)
    n_query, n_train, m = 1000, 40, 30
    scores = torch.randn(n_query, n_train, generator=gen)
    subsets = torch.rand(m, n_train, generator=gen) < 0.5
    targets = torch.randn(m, n_query, generator=gen)
    result = lds(scores, subsets, targets)
    # Per-query sd ≈ 1/sqrt(m-1) ≈ 0.19, so the mean of 1000 has sd ≈ 0.006.
    assert abs(result.mean) < 0.03
    low, high = result.bootstrap_ci()
    assert low < 0.0 < high


def test_bootstrap_interval_contains_mean_and_shrinks() -> None:
    gen = torch.Generator().manual_seed(5)
    small = LDSResult.from_per_query(0.3 + 0.2 * torch.randn(50, generator=gen))
    large = LDSResult.from_per_query(0.3 + 0.2 * torch.randn(2000, generator=gen))
    widths = []
    for r in (small, large):
        low, high = r.bootstrap_ci(n_boot=1000, level=0.95, seed=0)
        assert low < r.mean < high
        widths.append(high - low)
        # Normal theory: width ≈ 2 * 1.96 * sd / sqrt(n).
        sd = float(r.per_query.std())
        assert high - low == pytest.approx(2 * 1.96 * sd / math.sqrt(r.n_used), rel=0.2)
    assert widths[1] < widths[0] / 4  # sqrt(2000 / 50) ≈ 6.3
    assert small.bootstrap_ci(seed=1) == small.bootstrap_ci(seed=1)
    assert small.bootstrap_ci(level=0.5)[1] - small.bootstrap_ci(level=0.5)[0] < widths[0]


def test_bootstrap_rejects_bad_settings_and_all_nan() -> None:
    r = LDSResult.from_per_query(torch.tensor([0.1, 0.2]))
    with pytest.raises(ConfigError, match="level"):
        r.bootstrap_ci(level=1.5)
    with pytest.raises(ConfigError, match="n_boot"):
        r.bootstrap_ci(n_boot=0)
    empty = LDSResult.from_per_query(torch.tensor([float("nan")]))
    assert math.isnan(empty.mean)
    with pytest.raises(DataError, match="no query"):
        empty.bootstrap_ci()


def test_lds_rejects_bad_inputs_naming_shapes() -> None:
    scores, subsets, targets = _hand_case()
    with pytest.raises(DataError, match=r"n_train=3.*\(3, 3\).*\(4, 5\)"):
        lds(scores, torch.zeros(4, 5, dtype=torch.bool), targets)
    with pytest.raises(DataError, match=r"\(m=4, n_query=3\).*got \(3, 4\)"):
        lds(scores, subsets, targets.T)
    with pytest.raises(DataError, match=r"bool.*torch\.int64"):
        lds(scores, subsets.long(), targets)
    with pytest.raises(DataError, match=r"m >= 2.*\(1, 3\)"):
        lds(scores, subsets[:1], targets[:1])
    with pytest.raises(DataError, match=r"2-D.*\(3,\)"):
        lds(scores[0], subsets, targets)
    bad = targets.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(DataError, match="non-finite"):
        lds(scores, subsets, bad)


# --- paired comparison ----------------------------------------------------------------------


def test_paired_bootstrap_decides_better_identical_and_worse() -> None:
    gen = torch.Generator().manual_seed(6)
    b = 0.4 + 0.2 * torch.randn(300, generator=gen)
    a = b + 0.05 + 0.02 * torch.randn(300, generator=gen)  # clearly better, paired
    low, high = paired_bootstrap(a, b)
    assert 0.0 < low < 0.05 < high
    better = beats(a, b)
    assert better.holds and better.interval == (low, high)
    holds, (lo, hi) = not_worse(a, b)
    assert hi == high
    assert holds and lo == low

    same_beats, (s_low, s_high) = beats(b, b)
    assert not same_beats and s_low == s_high == pytest.approx(0.0, abs=1e-15)
    assert not_worse(b, b).holds  # upper end at 0 counts as not worse
    assert not beats(b, a).holds
    assert not not_worse(b, a).holds

    # Zero-mean paired differences: the interval straddles 0, so neither beats the other
    # and each is not worse than the other.
    c = b + 0.05 * torch.randn(300, generator=gen)
    tie_low, tie_high = paired_bootstrap(c, b)
    assert tie_low < 0.0 < tie_high
    assert not beats(c, b).holds and not beats(b, c).holds
    assert not_worse(c, b).holds and not_worse(b, c).holds


def test_paired_bootstrap_is_paired_and_drops_nan_pairs() -> None:
    gen = torch.Generator().manual_seed(7)
    # Huge spread across queries, constant advantage within each: only a paired test sees it.
    b = 10.0 * torch.randn(40, generator=gen)
    a = b + 0.01
    assert beats(a, b).holds
    a_nan = torch.cat([a, torch.tensor([float("nan")])])
    b_nan = torch.cat([b, torch.tensor([-100.0])])
    assert paired_bootstrap(a_nan, b_nan) == paired_bootstrap(a, b)
    ra, rb = LDSResult.from_per_query(a), LDSResult.from_per_query(b)
    assert paired_bootstrap(ra, rb) == paired_bootstrap(a, b)
    with pytest.raises(DataError, match=r"\(40,\) and \(41,\)"):
        paired_bootstrap(a, b_nan)


# --- leave-one-out agreement ----------------------------------------------------------------


def test_loo_correlation_slope_is_predicted_on_actual() -> None:
    actual = torch.tensor([-1.0, 0.5, 2.0, 3.0, 4.5], dtype=torch.float64)
    # predicted = 2 * actual: regressing predicted (y) on actual (x) gives slope 2
    # (the reverse regression would give 0.5).
    pearson, rho, slope = loo_correlation(2.0 * actual, actual)
    assert slope == pytest.approx(2.0, abs=1e-12)
    assert pearson == pytest.approx(1.0, abs=1e-12) and rho == pytest.approx(1.0, abs=1e-12)


def test_loo_correlation_matches_scipy_on_noisy_2d_input() -> None:
    rng = np.random.default_rng(8)
    actual = rng.normal(size=(12, 3))
    predicted = 0.7 * actual + rng.normal(scale=0.5, size=(12, 3))
    out = loo_correlation(torch.from_numpy(predicted), torch.from_numpy(actual))
    x, y = actual.ravel(), predicted.ravel()
    assert out.pearson == pytest.approx(pearsonr(x, y).statistic, abs=1e-12)
    assert out.spearman == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert out.slope == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-10)
    constant = loo_correlation([1.0, 2.0], [3.0, 3.0])
    assert math.isnan(constant.slope) and math.isnan(constant.pearson)
    with pytest.raises(DataError, match=r"\(12, 3\) and \(3, 12\)"):
        loo_correlation(torch.from_numpy(predicted), torch.from_numpy(actual.T))
