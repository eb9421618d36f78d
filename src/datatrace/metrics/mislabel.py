"""Mislabel detection: how well a per-example score ranks the flipped labels first.

A training example whose label was flipped is one the model must memorise, so its
self-influence is large: Koh & Liang (2017, "Understanding Black-box Predictions via
Influence Functions", ICML, §5.4) inspect training points in decreasing order of
self-influence ``I(z_i, z_i)``, and Pruthi et al. (2020, "Estimating Training Data Influence
by Tracing Gradient Descent", NeurIPS) in decreasing order of TracIn self-influence
``TracInCP(z, z)``; both report the fraction of flipped labels found against the fraction of
the training set inspected. Threshold-free summaries are the AUROC (the probability that a
random flipped example outranks a random clean one) and the average precision (AUPRC).

Ties are handled deterministically, so a result never depends on the order of the examples:

* **AUROC** is the Mann–Whitney statistic ``U / (n_flipped * n_clean)``, where a tied
  (flipped, clean) pair counts 1/2. It is computed from average ranks and equals
  ``sklearn.metrics.roc_auc_score``.
* **AUPRC** is the average precision ``sum_b (R_b - R_{b-1}) P_b`` over the distinct score
  values ``b`` in decreasing order: a block of tied scores is one threshold, inspected
  whole, as in ``sklearn.metrics.average_precision_score`` (no interpolation).
* **fraction found** after inspecting ``j`` examples counts, inside a partially inspected
  tie block of ``t`` examples holding ``f`` flipped ones, ``f / t`` flipped per inspected
  example: the expectation over a random order of the tied examples. At the ends of tie
  blocks the curve is exact; in between it is linear.

**Groups** (Ley et al., 2024, "Generalized Group Data Attribution"): with ``groups=`` the
scores are one per group (group self-influence, or ``grouping.sum_rows`` of the training
loss) and inspecting a group inspects all its examples: every example takes its group's
score, so a group is a tie block and everything above applies on the training examples.
Singleton groups give exactly the per-example result. ``area`` summarises the curve.

Everything is pure torch (scikit-learn is only a test dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch

from datatrace.errors import DataError
from datatrace.metrics.lds import _average_ranks, _real_cpu64
from datatrace.metrics.removal import _group_labels

if TYPE_CHECKING:
    from datatrace.metrics.removal import GroupsLike

__all__ = ["MislabelResult", "mislabel_detection"]

ScoreLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float]
MaskLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[bool]


@dataclass(frozen=True)
class MislabelResult:
    """Mislabel detection quality of one ranking score.

    Attributes:
        auroc: Probability that a random flipped example scores above a random clean one,
            ties counting 1/2 (0.5 for a random ranking, 1 for a perfect one).
        auprc: Average precision of the flipped examples (``base_rate`` in expectation for a
            random ranking, 1 for a perfect one).
        fraction_inspected: ``(n_train + 1,)`` float64, ``0, 1/n, ..., 1``.
        fraction_found: ``(n_train + 1,)`` float64 fraction of the flipped examples found
            after inspecting ``fraction_inspected`` of the training set in decreasing score
            order (tie blocks count their mean, see the module docstring).
        n_flipped: Number of flipped examples.
        n_train: Number of training examples.

    Example:
        >>> r = mislabel_detection(torch.tensor([0.9, 0.1, 0.8, 0.3]),
        ...                        torch.tensor([True, False, False, True]))
        >>> r.auroc, r.found_at(0.5)
        (0.75, 0.5)
    """

    auroc: float
    auprc: float
    fraction_inspected: torch.Tensor
    fraction_found: torch.Tensor
    n_flipped: int
    n_train: int

    @property
    def area(self) -> float:
        """Trapezoidal area under ``fraction_found`` against ``fraction_inspected``.

        About 0.5 for a random order, ``1 - base_rate / 2`` for a perfect one.
        """
        x, y = self.fraction_inspected, self.fraction_found
        return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())

    @property
    def base_rate(self) -> float:
        """Fraction of flipped examples: a random ranking's expected precision and AUPRC."""
        return self.n_flipped / self.n_train

    def found_at(self, fraction: float) -> float:
        """Fraction of flipped examples found after inspecting ``fraction`` of the train set.

        Between the grid points ``j / n_train`` the curve is interpolated linearly, which
        is exact in expectation over which example of the next position is inspected.

        Args:
            fraction: Fraction of the training set inspected, in ``[0, 1]``.

        Returns:
            The fraction of flipped examples found, in ``[0, 1]``.

        Raises:
            DataError: If ``fraction`` is not a number in ``[0, 1]``.
        """
        _check_fraction(fraction)
        position = fraction * self.n_train
        lo = min(math.floor(position), self.n_train)
        hi = min(lo + 1, self.n_train)
        w = position - lo
        found = self.fraction_found
        return float((1.0 - w) * found[lo] + w * found[hi])


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise DataError(f"fraction must be a number in [0, 1]; got {type(fraction).__name__}.")
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"fraction must lie in [0, 1]; got {fraction!r}.")


def _scores_1d(scores: ScoreLike) -> torch.Tensor:
    s = _real_cpu64(scores, "scores")
    if s.ndim != 1:
        raise DataError(
            f"scores must be 1-D (n_train,), one ranking score per training example (e.g. "
            f"`attributor.self_attribute()`); got shape {tuple(s.shape)}."
        )
    n_bad = int((~torch.isfinite(s)).sum())
    if n_bad:
        raise DataError(
            f"scores (shape {tuple(s.shape)}) contain {n_bad} non-finite values; a ranking "
            "needs every example scored."
        )
    return s


def _mask_1d(flipped: MaskLike, n_train: int) -> torch.Tensor:
    f = flipped if isinstance(flipped, torch.Tensor) else torch.as_tensor(np.asarray(flipped))
    if f.dtype != torch.bool:
        raise DataError(
            f"flipped must be a bool mask of the flipped labels; got dtype {f.dtype}. Pass "
            "`flipped.bool()` if it holds 0/1 indicators."
        )
    if f.shape != (n_train,):
        raise DataError(
            f"flipped must have shape (n_train={n_train},) to match scores; got {tuple(f.shape)}."
        )
    return f.detach().to("cpu")


def mislabel_detection(
    scores: ScoreLike, flipped: MaskLike, *, groups: GroupsLike | None = None
) -> MislabelResult:
    """Score how well ``scores`` ranks the flipped training labels first.

    Args:
        scores: ``(n_train,)`` ranking score, higher = more suspicious, e.g. self-influence
            (``attributor.self_attribute()``) or the training loss (the trivial baseline);
            ``(n_groups,)`` with ``groups``.
        flipped: ``(n_train,)`` bool, True where the label was flipped.
        groups: A ``Grouping`` or ``(n_train,)`` group ids (scores in ascending id order):
            each group is inspected whole (module docstring).

    Returns:
        A ``MislabelResult`` with AUROC, AUPRC and the fraction-found curve; ties are
        resolved as described in the module docstring.

    Raises:
        DataError: If ``scores`` is not 1-D or has non-finite values (the count is named),
            ``flipped`` is not a bool mask of the same length, or either class is empty.

    Example:
        >>> r = mislabel_detection([3.0, 2.0, 1.0], [True, False, False])
        >>> r.auroc, r.auprc, r.fraction_found.tolist()
        (1.0, 1.0, [0.0, 1.0, 1.0, 1.0])
        >>> r = mislabel_detection([0.1, 3.0], [False, False, True, False], groups=[0, 0, 1, 1])
        >>> r.fraction_found.tolist(), r.area
        ([0.0, 0.5, 1.0, 1.0, 1.0], 0.75)
    """
    s = _scores_1d(scores)
    if groups is not None:
        s = s[_group_labels(groups, len(s), "scores")[0]]  # every example takes its group's
    n = int(s.shape[0])
    f = _mask_1d(flipped, n)
    n_pos = int(f.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"mislabel detection needs at least one flipped and one clean example; got "
            f"{n_pos} flipped and {n_neg} clean of {n}."
        )
    # Mann–Whitney: the rank sum of the flipped examples minus its minimum, over all pairs;
    # average ranks make a tied (flipped, clean) pair count 1/2.
    ranks = _average_ranks(s)
    u = float(ranks[f].sum()) - n_pos * (n_pos + 1) / 2.0
    auroc = u / (n_pos * n_neg)

    # Inspection order: decreasing score (stable, though nothing below depends on it).
    order = torch.sort(s, descending=True, stable=True).indices
    sorted_s = s[order]
    sorted_f = f[order].to(torch.float64)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    block = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    flipped_per_block = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(
        0, block, sorted_f
    )

    # Average precision with one threshold per distinct score (sklearn's convention).
    found_at_end = torch.cumsum(flipped_per_block, 0)
    inspected_at_end = torch.cumsum(counts, 0).to(torch.float64)
    auprc = float((flipped_per_block / n_pos * (found_at_end / inspected_at_end)).sum())

    # Fraction found: every inspected example contributes its tie block's flip rate f / t.
    # Computed as found_before_block + (j * f) / t from integers, so the curve is exactly
    # f at the block's end and monotone, with no running-sum rounding.
    counts_f = counts.to(torch.float64)
    found_before = (found_at_end - flipped_per_block)[block]
    within = torch.arange(n, dtype=torch.float64) + 1 - (inspected_at_end - counts_f)[block]
    found_count = found_before + within * flipped_per_block[block] / counts_f[block]
    found = torch.cat([torch.zeros(1, dtype=torch.float64), found_count]) / n_pos
    found = found.clamp(0.0, 1.0)
    inspected = torch.arange(n + 1, dtype=torch.float64) / n
    return MislabelResult(
        auroc=auroc,
        auprc=auprc,
        fraction_inspected=inspected,
        fraction_found=found,
        n_flipped=n_pos,
        n_train=n,
    )
