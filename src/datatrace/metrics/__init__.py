"""Efficacy metrics for attributions, checked against retraining (DESIGN.md §3, §9).

The linear datamodeling score follows TRAK (Park et al., 2023).
"""

from datatrace.metrics.lds import (
    Comparison,
    LDSResult,
    LOOCorrelation,
    beats,
    lds,
    loo_correlation,
    not_worse,
    paired_bootstrap,
    spearman,
    spearman_batched,
)

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
