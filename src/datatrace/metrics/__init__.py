"""Efficacy metrics for attributions, checked against retraining (DESIGN.md §3, §9).

The linear datamodeling score follows TRAK (Park et al., 2023). Pruning and mislabel
detection take ``groups=`` for group units; singleton groups equal the per-example result.
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
from datatrace.metrics.mislabel import MislabelResult, mislabel_detection
from datatrace.metrics.removal import (
    BrittlenessResult,
    PruningResult,
    brittleness_curve,
    pruning_curve,
    random_example_pruning_curve,
    random_pruning_curve,
    top_proponents,
)

__all__ = [
    "BrittlenessResult",
    "Comparison",
    "LDSResult",
    "LOOCorrelation",
    "MislabelResult",
    "PruningResult",
    "beats",
    "brittleness_curve",
    "lds",
    "loo_correlation",
    "mislabel_detection",
    "not_worse",
    "paired_bootstrap",
    "pruning_curve",
    "random_example_pruning_curve",
    "random_pruning_curve",
    "spearman",
    "spearman_batched",
    "top_proponents",
]
