"""Linear datamodeling score (LDS), leave-one-out agreement and paired comparisons.

The LDS is the evaluation of TRAK (Park et al., 2023, "TRAK: Attributing Model Behavior at
Scale", ICML, §2.2 Definition 2.3 and Eq. (4)), built on datamodels (Ilyas et al., 2022).
Draw ``m`` random subsets ``S_1..S_m`` of the training units, retrain on each and measure the
query target ``f_q(S_j)``. An attribution ``tau`` predicts ``g_q(S_j) = sum_{i in S_j}
tau[q, i]``; the LDS of query ``q`` is the Spearman rank correlation over the ``m`` subsets
between ``g_q`` and ``f_q``, and the reported LDS is its mean over queries (DESIGN.md §8).

Orientation (DESIGN.md §1): ``scores[q, i] > 0`` means training on unit ``i`` *improves*
query ``q``, so targets must also be in improvement orientation (higher is better: the
negated loss, a margin, a log-probability). Feeding a raw loss flips the sign of the LDS.

Comparisons follow DESIGN.md §9: "A beats B" when the lower end of a paired-bootstrap 95%
interval of ``LDS_A - LDS_B`` (resampling queries) is above 0; "A is not worse than B" when
its upper end is at or above 0.

Everything here is pure torch (scipy is only a test and benchmark dependency); ranks use the
average of tied positions, which matches ``scipy.stats.spearmanr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import numpy as np
import torch

from datatrace.errors import ConfigError, DataError
from datatrace.scores import Scores

__all__ = [
    "Comparison",
    "LDSResult",
    "LOOCorrelation",
    "beats",
    "lds",
    "loo_correlation",
    "not_worse",
    "paired_bootstrap",
    "spearman",
    "spearman_batched",
]

ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float]

# Bootstrap replicates are drawn in chunks so that n_boot x n_query indices never all sit in
# memory at once (1000 replicates of 100k queries would be 800 MB of int64).
_BOOT_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Spearman correlation
# --------------------------------------------------------------------------------------------


def _real_cpu64(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a float64 CPU tensor; a DataError when it holds bools or complex numbers."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{name} must hold real numbers; got dtype {t.dtype}.")
    return t.detach().to("cpu", torch.float64)


def _as_float64(x: ArrayLike, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{name} must hold real numbers; got dtype {t.dtype}.")
    t = t.detach().to(torch.float64)
    if torch.isnan(t).any():
        raise DataError(
            f"{name} (shape {tuple(t.shape)}) contains {int(torch.isnan(t).sum())} NaN values; "
            "ranks are undefined for NaN, drop or impute them first."
        )
    return t


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim; tied values share the mean of their positions."""
    x = x.contiguous()
    sorted_x = torch.sort(x, dim=-1).values
    # A value's tie block occupies sorted positions [left, right); its average 1-based rank is
    # the mean of left+1 .. right, i.e. (left + right + 1) / 2.
    left = torch.searchsorted(sorted_x, x, side="left")
    right = torch.searchsorted(sorted_x, x, side="right")
    return (left + right + 1).to(torch.float64) / 2


def _spearman_last_dim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last dim of two float64 tensors of equal shape."""
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    num = (ra * rb).sum(dim=-1)
    den = torch.sqrt((ra * ra).sum(dim=-1) * (rb * rb).sum(dim=-1))
    rho = (num / den).clamp(-1.0, 1.0)
    # Detect constant inputs exactly (not via den == 0) so that the NaN is deliberate.
    constant = (a.amax(dim=-1) == a.amin(dim=-1)) | (b.amax(dim=-1) == b.amin(dim=-1))
    return torch.where(constant, torch.full_like(rho, float("nan")), rho)


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two 1-D sequences.

    Ties get average ranks, as in ``scipy.stats.spearmanr``. Computed in float64.

    Args:
        a: 1-D values, length ``n >= 2``.
        b: 1-D values, same length as ``a``.

    Returns:
        The correlation in ``[-1, 1]``, or ``nan`` when ``a`` or ``b`` is constant (the rank
        correlation is undefined there, as in scipy).

    Raises:
        DataError: If the inputs are not 1-D of equal length ``>= 2``, or contain NaN.

    Example:
        >>> spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0])
        0.8
    """
    ta = _as_float64(a, "a")
    tb = _as_float64(b, "b")
    if ta.ndim != 1 or tb.ndim != 1 or ta.shape != tb.shape:
        raise DataError(
            f"spearman needs two 1-D inputs of equal length; got shapes {tuple(ta.shape)} and "
            f"{tuple(tb.shape)}. Use spearman_batched for 2-D inputs."
        )
    if ta.shape[0] < 2:
        raise DataError(f"spearman needs at least 2 paired values; got shape {tuple(ta.shape)}.")
    return float(_spearman_last_dim(ta, tb.to(ta.device)).item())


def spearman_batched(a: ArrayLike, b: ArrayLike, dim: int = 0) -> torch.Tensor:
    """Spearman correlations of matching slices of two 2-D arrays.

    With ``dim=0`` the correlation runs down each column (``a[:, k]`` against ``b[:, k]``);
    with ``dim=1`` (or ``-1``) along each row.

    Args:
        a: 2-D values.
        b: 2-D values, same shape as ``a``.
        dim: The dimension the correlation runs along; its size must be ``>= 2``.

    Returns:
        float64 tensor with one correlation per slice (length ``a.shape[1 - dim]``); ``nan``
        where either slice is constant.

    Raises:
        DataError: If the shapes differ, are not 2-D, the correlated dimension has fewer than
            2 entries, or the inputs contain NaN.
        ConfigError: If ``dim`` is not one of 0, 1, -1, -2.

    Example:
        >>> a = torch.tensor([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
        >>> spearman_batched(a, torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])).tolist()
        [1.0, -0.5]
    """
    if dim not in (0, 1, -1, -2):
        raise ConfigError(f"dim must be 0 or 1 (or -1, -2) for 2-D inputs; got {dim}.")
    ta = _as_float64(a, "a")
    tb = _as_float64(b, "b")
    if ta.ndim != 2 or ta.shape != tb.shape:
        raise DataError(
            f"spearman_batched needs two 2-D inputs of equal shape; got {tuple(ta.shape)} and "
            f"{tuple(tb.shape)}."
        )
    if ta.shape[dim] < 2:
        raise DataError(
            f"spearman_batched correlates along dim {dim}, which needs at least 2 entries; got "
            f"shape {tuple(ta.shape)}."
        )
    tb = tb.to(ta.device)
    if dim in (0, -2):
        ta, tb = ta.T, tb.T
    return _spearman_last_dim(ta, tb)


# --------------------------------------------------------------------------------------------
# Bootstrap helpers
# --------------------------------------------------------------------------------------------


def _check_boot_settings(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive int; got {n_boot!r}.")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie strictly between 0 and 1 (e.g. 0.95); got {level!r}.")


def _bootstrap_mean_interval(
    values: torch.Tensor, n_boot: int, level: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``values.mean()``, resampling entries with replacement."""
    values = values.detach().to("cpu", torch.float64)
    n = int(values.shape[0])
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    means = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = torch.randint(0, n, (rows, n), generator=gen)
        means.append(values[idx].mean(dim=1))
    boot = torch.cat(means)
    tail = (1.0 - level) / 2.0
    q = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    low, high = torch.quantile(boot, q).tolist()
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# LDS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score of one attribution against retraining ground truth.

    Attributes:
        mean: Mean of ``per_query`` over the queries whose correlation is defined (``nan``
            when none is).
        per_query: ``(n_query,)`` float64 Spearman correlation of every query; ``nan`` where
            the predicted or the actual target is constant over the subsets.
        n_excluded: How many queries are ``nan`` and therefore left out of ``mean``.

    Example:
        >>> r = LDSResult.from_per_query(torch.tensor([0.5, float("nan"), 0.25]))
        >>> (r.mean, r.n_used, r.n_excluded)
        (0.375, 2, 1)
    """

    mean: float
    per_query: torch.Tensor
    n_excluded: int

    @classmethod
    def from_per_query(cls, per_query: torch.Tensor) -> LDSResult:
        """Build a result from per-query correlations, ignoring ``nan`` entries in the mean."""
        per_query = per_query.detach().to("cpu", torch.float64)
        if per_query.ndim != 1:
            raise DataError(
                f"per_query must be 1-D (n_query,); got shape {tuple(per_query.shape)}."
            )
        valid = ~torch.isnan(per_query)
        n_valid = int(valid.sum())
        mean = float(per_query[valid].mean()) if n_valid else float("nan")
        return cls(mean=mean, per_query=per_query, n_excluded=int(per_query.shape[0]) - n_valid)

    @property
    def n_used(self) -> int:
        """Number of queries that enter ``mean``."""
        return int(self.per_query.shape[0]) - self.n_excluded

    def bootstrap_ci(
        self, n_boot: int = 1000, level: float = 0.95, seed: int = 0
    ) -> tuple[float, float]:
        """Percentile bootstrap interval of ``mean``, resampling queries with replacement.

        Args:
            n_boot: Number of bootstrap replicates.
            level: Coverage of the interval, in ``(0, 1)``.
            seed: Seed of the resampling; the interval is deterministic given it.

        Returns:
            ``(low, high)``.

        Raises:
            ConfigError: If ``n_boot < 1`` or ``level`` is outside ``(0, 1)``.
            DataError: If no query has a defined correlation.
        """
        _check_boot_settings(n_boot, level)
        values = self.per_query[~torch.isnan(self.per_query)]
        if values.numel() == 0:
            raise DataError(
                f"no query has a defined LDS ({self.n_excluded} of {self.per_query.shape[0]} "
                "are nan because a target or prediction is constant over the subsets)."
            )
        return _bootstrap_mean_interval(values, n_boot, level, seed)


def lds(scores: torch.Tensor | Scores, subsets: torch.Tensor, targets: ArrayLike) -> LDSResult:
    """Linear datamodeling score (TRAK, Park et al. 2023, Eq. (4)).

    For query ``q`` and subset ``j`` the attribution predicts
    ``predicted[j, q] = sum_{i in S_j} scores[q, i]``; the LDS of ``q`` is the Spearman
    correlation over the ``m`` subsets of ``predicted[:, q]`` with ``targets[:, q]``.

    Args:
        scores: ``(n_query, n_train)`` attribution scores (a tensor or a ``Scores``), positive
            = training on the unit improves the query (DESIGN.md §1). Columns are units in the
            same order as the columns of ``subsets``.
        subsets: ``(m, n_train)`` bool; ``subsets[j, i]`` says whether retraining ``j`` used
            unit ``i``.
        targets: ``(m, n_query)`` measured target of every query after retraining ``j``, in
            improvement orientation (higher is better: negated loss, margin, log-prob).

    Returns:
        An ``LDSResult``; queries whose prediction or target is constant over the subsets get
        ``nan`` and are left out of the mean (counted in ``n_excluded``).

    Raises:
        DataError: On shapes that do not line up (the message names them), ``m < 2``,
            non-bool ``subsets`` or non-finite scores or targets.

    Example:
        >>> scores = torch.tensor([[1.0, 2.0, 4.0]])
        >>> subsets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
        >>> lds(scores, subsets, torch.tensor([[1.0], [2.0], [4.0], [3.0]])).mean
        1.0
    """
    values = scores.values if isinstance(scores, Scores) else scores
    if not isinstance(values, torch.Tensor) or values.ndim != 2:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise DataError(f"scores must be a 2-D tensor (n_query, n_train); got {shape}.")
    if not isinstance(subsets, torch.Tensor) or subsets.dtype != torch.bool:
        got = subsets.dtype if isinstance(subsets, torch.Tensor) else type(subsets).__name__
        raise DataError(
            f"subsets must be a bool tensor (m, n_train) marking the units each retraining "
            f"used; got {got}. Pass `subsets.bool()` if it holds 0/1 indicators."
        )
    t = _as_float64(targets, "targets")
    n_query, n_train = values.shape
    if subsets.ndim != 2 or subsets.shape[1] != n_train:
        raise DataError(
            f"subsets must have shape (m, n_train={n_train}) to match scores of shape "
            f"{tuple(values.shape)}; got {tuple(subsets.shape)}."
        )
    m = int(subsets.shape[0])
    if t.shape != (m, n_query):
        raise DataError(
            f"targets must have shape (m={m}, n_query={n_query}) to match subsets "
            f"{tuple(subsets.shape)} and scores {tuple(values.shape)}; got {tuple(t.shape)}. "
            "Rows are retrainings, columns are queries."
        )
    if m < 2:
        raise DataError(
            f"LDS correlates over subsets and needs m >= 2 of them; got subsets of shape "
            f"{tuple(subsets.shape)}."
        )
    s = values.detach().to(torch.float64)
    if not torch.isfinite(s).all():
        raise DataError(
            f"scores (shape {tuple(s.shape)}) contain {int((~torch.isfinite(s)).sum())} "
            "non-finite values."
        )
    if not torch.isfinite(t).all():
        raise DataError(
            f"targets (shape {tuple(t.shape)}) contain {int((~torch.isfinite(t)).sum())} "
            "non-finite values."
        )
    predicted = subsets.to(device=s.device, dtype=torch.float64) @ s.T  # (m, n_query)
    per_query = _spearman_last_dim(predicted.T, t.to(s.device).T)
    return LDSResult.from_per_query(per_query)


# --------------------------------------------------------------------------------------------
# Paired comparison (DESIGN.md §9)
# --------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
    """Outcome of a paired-bootstrap comparison; unpacks as ``holds, (low, high)``.

    Attributes:
        holds: Whether the claim (``beats`` or ``not_worse``) holds.
        interval: ``(low, high)`` bootstrap interval of ``mean(a - b)`` over queries.
    """

    holds: bool
    interval: tuple[float, float]


def _per_query_of(x: torch.Tensor | LDSResult | ArrayLike) -> torch.Tensor:
    if isinstance(x, LDSResult):
        return x.per_query
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to("cpu", torch.float64)


def paired_bootstrap(
    per_query_a: torch.Tensor | LDSResult | ArrayLike,
    per_query_b: torch.Tensor | LDSResult | ArrayLike,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired-bootstrap interval of ``mean(a - b)``, resampling queries (DESIGN.md §9).

    Both inputs score the same queries in the same order; the same resampled queries are
    used for ``a`` and ``b``, which is what makes the comparison paired. Queries where either
    value is ``nan`` (an undefined LDS) are dropped from both.

    Args:
        per_query_a: ``(n_query,)`` per-query values of method A (or its ``LDSResult``).
        per_query_b: ``(n_query,)`` per-query values of method B (or its ``LDSResult``).
        n_boot: Number of bootstrap replicates.
        level: Coverage of the interval, in ``(0, 1)``.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)`` of the percentile interval of ``mean(a - b)``.

    Raises:
        DataError: If the inputs are not 1-D of equal length, or no query is defined in both.
        ConfigError: If ``n_boot < 1`` or ``level`` is outside ``(0, 1)``.

    Example:
        >>> a = torch.tensor([0.6, 0.7, 0.8, 0.9])
        >>> low, high = paired_bootstrap(a, a - 0.1)
        >>> round(low, 6), round(high, 6)
        (0.1, 0.1)
    """
    _check_boot_settings(n_boot, level)
    a = _per_query_of(per_query_a)
    b = _per_query_of(per_query_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise DataError(
            f"paired_bootstrap needs two 1-D per-query arrays over the same queries; got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    both = ~(torch.isnan(a) | torch.isnan(b))
    if not both.any():
        raise DataError(
            f"no query has a defined value in both inputs (shape {tuple(a.shape)}, all pairs "
            "contain nan)."
        )
    return _bootstrap_mean_interval(a[both] - b[both], n_boot, level, seed)


def beats(
    per_query_a: torch.Tensor | LDSResult | ArrayLike,
    per_query_b: torch.Tensor | LDSResult | ArrayLike,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Whether A beats B: the lower end of the paired interval of ``A - B`` is above 0.

    Arguments are those of ``paired_bootstrap``.

    Example:
        >>> a = torch.tensor([0.6, 0.7, 0.8, 0.9])
        >>> beats(a, a - 0.1).holds, beats(a, a).holds
        (True, False)
    """
    low, high = paired_bootstrap(per_query_a, per_query_b, n_boot, level, seed)
    return Comparison(low > 0.0, (low, high))


def not_worse(
    per_query_a: torch.Tensor | LDSResult | ArrayLike,
    per_query_b: torch.Tensor | LDSResult | ArrayLike,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Whether A is not worse than B: the upper end of the paired interval is at or above 0.

    Arguments are those of ``paired_bootstrap``.

    Example:
        >>> a = torch.tensor([0.6, 0.7, 0.8, 0.9])
        >>> not_worse(a, a).holds, not_worse(a - 0.1, a).holds
        (True, False)
    """
    low, high = paired_bootstrap(per_query_a, per_query_b, n_boot, level, seed)
    return Comparison(high >= 0.0, (low, high))


# --------------------------------------------------------------------------------------------
# Leave-one-out agreement
# --------------------------------------------------------------------------------------------


class LOOCorrelation(NamedTuple):
    """Agreement of predicted and actual leave-one-out effects; unpacks as a 3-tuple.

    Attributes:
        pearson: Pearson correlation of predicted with actual.
        spearman: Spearman correlation of predicted with actual.
        slope: Least-squares slope of *predicted* (y) regressed on *actual* (x); 1 means
            the method's magnitudes are in units of the true target change (DESIGN.md §1).
    """

    pearson: float
    spearman: float
    slope: float


def loo_correlation(predicted: ArrayLike, actual: ArrayLike) -> LOOCorrelation:
    """Compare predicted effects (scores) with retrained leave-one-out effects.

    Both arrays are in improvement orientation (positive = training on the unit helped) and
    are flattened, so a ``(n_units, n_query)`` pair pools every (unit, query) effect into one
    correlation, as in the scatter plots of Koh & Liang (2017).

    Args:
        predicted: Predicted effects, e.g. ``scores.values[:, idx].T``.
        actual: Actual effects of the same shape, e.g. ``leave_one_out(...).effects``.

    Returns:
        ``LOOCorrelation(pearson, spearman, slope)`` where ``slope`` is the ordinary
        least-squares slope of ``predicted`` (y) on ``actual`` (x):
        ``cov(actual, predicted) / var(actual)``. Each is ``nan`` when undefined (a constant
        input; for ``slope`` only a constant ``actual``).

    Raises:
        DataError: If the shapes differ, fewer than 2 values are given, or values are NaN.

    Example:
        >>> loo_correlation([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]).slope
        2.0
    """
    p = _as_float64(predicted, "predicted")
    a = _as_float64(actual, "actual")
    if p.shape != a.shape:
        raise DataError(
            f"predicted and actual must have the same shape; got {tuple(p.shape)} and "
            f"{tuple(a.shape)}."
        )
    p = p.reshape(-1)
    a = a.reshape(-1).to(p.device)
    if p.numel() < 2:
        raise DataError(f"loo_correlation needs at least 2 values; got shape {tuple(p.shape)}.")
    pc = p - p.mean()
    ac = a - a.mean()
    sxy = float((pc * ac).sum())
    sxx = float((ac * ac).sum())
    syy = float((pc * pc).sum())
    a_const = bool(a.amax() == a.amin())
    p_const = bool(p.amax() == p.amin())
    nan = float("nan")
    pearson = nan if (a_const or p_const) else max(-1.0, min(1.0, sxy / (sxx * syy) ** 0.5))
    slope = nan if a_const else sxy / sxx
    rho = float(_spearman_last_dim(p, a).item())
    return LOOCorrelation(pearson=pearson, spearman=rho, slope=slope)
