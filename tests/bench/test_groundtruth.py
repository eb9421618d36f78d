"""Tests of the retraining ground-truth generator on a toy model with a closed form.

The toy "model" is the mean of the training targets ``y[indices]`` (plus a seed-dependent
shift, to see seeds being used and averaged); a query ``z_q`` measures ``-(model - z_q)^2``,
so higher is better as ground truth requires.
"""

import math

import pytest
import torch

from datatrace.bench import (
    SubsetGroundTruth,
    leave_one_out,
    noise_ceiling,
    sample_subsets,
    subset_ground_truth,
)
from datatrace.errors import ConfigError, DataError

Y = torch.tensor([0.3, -1.2, 2.5, 0.8, 1.9, -0.4, 3.1, 0.0, -2.2, 1.1], dtype=torch.float64)
Z = torch.tensor([0.0, 1.0, -1.5, 2.0], dtype=torch.float64)  # the queries


def _train(indices: torch.Tensor, seed: int) -> torch.Tensor:
    assert indices.dtype == torch.long and indices.ndim == 1
    return Y[indices].mean() + 0.01 * seed


def _measure(model: torch.Tensor) -> torch.Tensor:
    return -((model - Z) ** 2)


# --- sample_subsets -------------------------------------------------------------------------


def test_sample_subsets_sizes_and_determinism() -> None:
    s = sample_subsets(n_train=25, m=40, alpha=0.3, seed=2)
    assert s.dtype == torch.bool and s.shape == (40, 25)
    assert (s.sum(dim=1) == round(0.3 * 25)).all()  # 8 units per subset
    assert torch.equal(s, sample_subsets(25, 40, 0.3, seed=2))
    assert not torch.equal(s, sample_subsets(25, 40, 0.3, seed=3))
    assert len({tuple(row.tolist()) for row in s}) > 30  # rows are drawn independently
    # Every unit is used about alpha of the time.
    freq = sample_subsets(20, 2000, 0.5, seed=0).double().mean(dim=0)
    assert (freq - 0.5).abs().max() < 0.05


def test_sample_subsets_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        sample_subsets(10, 5, alpha=1.0)
    with pytest.raises(ConfigError, match="m must be an integer >= 2; got 1"):
        sample_subsets(10, 1)
    with pytest.raises(ConfigError, match="0 units"):
        sample_subsets(3, 5, alpha=0.1)


# --- subset_ground_truth --------------------------------------------------------------------


def test_subset_ground_truth_equals_direct_computation() -> None:
    m, seeds = 6, 3
    gt = subset_ground_truth(_train, _measure, n_train=10, m=m, seeds=seeds, seed=1, progress=False)
    assert isinstance(gt, SubsetGroundTruth)
    assert torch.equal(gt.subsets, sample_subsets(10, m, 0.5, seed=1))
    assert gt.per_seed.shape == (m, seeds, 4) and gt.targets.shape == (m, 4)
    # Training seeds are distinct: seed * m * seeds + j * seeds + s.
    assert gt.train_seeds.unique().numel() == m * seeds and int(gt.train_seeds[0, 0]) == m * seeds
    for j in range(m):
        mean_j = Y[gt.subsets[j]].mean()
        direct = torch.stack([-((mean_j + 0.01 * int(t) - Z) ** 2) for t in gt.train_seeds[j]])
        torch.testing.assert_close(gt.per_seed[j], direct, rtol=1e-10, atol=0)
        torch.testing.assert_close(gt.targets[j], direct.mean(dim=0), rtol=1e-10, atol=0)
    again = subset_ground_truth(_train, _measure, 10, m, seeds=seeds, seed=1, progress=False)
    assert torch.equal(again.per_seed, gt.per_seed)


def test_subset_ground_truth_progress_bar_and_bad_measure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    subset_ground_truth(_train, _measure, 10, 2, progress=True)
    assert "subset retraining" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"1-D tensor \(n_query,\); got \(1, 4\)"):
        subset_ground_truth(_train, lambda mdl: _measure(mdl)[None], 10, 2, progress=False)
    with pytest.raises(ConfigError, match="seeds"):
        subset_ground_truth(_train, _measure, 10, 2, seeds=0, progress=False)


# --- leave_one_out --------------------------------------------------------------------------


def test_leave_one_out_equals_direct_computation() -> None:
    idx = [0, 3, 9]
    loo = leave_one_out(_train, _measure, n_train=10, indices=idx, seed=4, progress=False)
    full = -((Y.mean() + 0.04 - Z) ** 2)
    torch.testing.assert_close(loo.full, full, rtol=1e-10, atol=0)
    assert loo.effects.shape == (3, 4) and loo.indices.tolist() == idx
    for k, i in enumerate(idx):
        without = torch.cat([Y[:i], Y[i + 1 :]]).mean() + 0.04
        # Improvement orientation: positive = unit i helped the query.
        torch.testing.assert_close(loo.effects[k], full + (without - Z) ** 2, rtol=1e-10, atol=0)
    # Unit 8 (y = -2.2) pulls the mean towards query 2 (z = -1.5): it helps that query.
    assert leave_one_out(_train, _measure, 10, [8], progress=False).effects[0, 2] > 0


def test_leave_one_out_rejects_bad_indices() -> None:
    with pytest.raises(DataError, match=r"\[0, n_train=10\).*10 to 10"):
        leave_one_out(_train, _measure, 10, [10], progress=False)
    with pytest.raises(DataError, match=r"1-D.*\(1, 2\)"):
        leave_one_out(_train, _measure, 10, torch.tensor([[0, 1]]), progress=False)


# --- noise_ceiling --------------------------------------------------------------------------


def test_noise_ceiling_uses_disjoint_equal_halves() -> None:
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(30, 1, 5, generator=gen, dtype=torch.float64)
    # Seeds 0 and 1 agree in ranks; seed 2 (odd one out) is ignored.
    garbage = torch.randn(30, 1, 5, generator=gen, dtype=torch.float64)
    per_seed = torch.cat([signal, 3 * signal - 1, garbage], dim=1)
    result = noise_ceiling(per_seed)
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    # Halves of 2 seeds each: (s0 + s1) / 2 against (s2 + s3) / 2.
    four = torch.cat([signal, signal, -signal, -signal], dim=1)
    assert noise_ceiling(four).mean == pytest.approx(-1.0, abs=1e-12)


def test_noise_ceiling_of_pure_noise_is_near_zero_and_of_toy_gt_is_high() -> None:
    gen = torch.Generator().manual_seed(1)
    noise = noise_ceiling(torch.randn(40, 4, 500, generator=gen))
    assert abs(noise.mean) < 0.03
    low, high = noise.bootstrap_ci()
    assert low < 0 < high
    gt = subset_ground_truth(_train, _measure, 10, 20, seeds=2, progress=False)
    # The two seeds of a subset shift the model by only 0.01 relative to each other.
    assert gt.noise_ceiling().mean > 0.5
    assert not math.isnan(noise_ceiling(gt).mean)


def test_noise_ceiling_rejects_single_seed() -> None:
    with pytest.raises(DataError, match=r"seeds >= 2.*\(5, 1, 3\)"):
        noise_ceiling(torch.zeros(5, 1, 3))
