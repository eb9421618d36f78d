"""Benchmark settings, retraining ground truth and runners (DESIGN.md §7).

The subset ground truth follows the LDS protocol of TRAK (Park et al., 2023); the
``fixed-seed-drop`` protocol (:mod:`datatrace.bench.protocols`) replays the attributed run
without a small random fraction of its examples.
"""

from datatrace.bench.cache import (
    GroundTruthSpec,
    LOOSpec,
    default_cache_dir,
    lds_ground_truth,
    loo_ground_truth,
)
from datatrace.bench.groundtruth import (
    LeaveOneOut,
    SubsetGroundTruth,
    leave_one_out,
    noise_ceiling,
    sample_subsets,
    subset_ground_truth,
)
from datatrace.bench.mislabel import (
    MislabelGroundTruth,
    MislabelSpec,
    flip_labels,
    mislabel_ground_truth,
)
from datatrace.bench.protocols import (
    DropGroundTruth,
    DropSpec,
    drop_ground_truth,
    parse_protocol,
    train_dropped,
)

__all__ = [
    "DropGroundTruth",
    "DropSpec",
    "GroundTruthSpec",
    "LOOSpec",
    "LeaveOneOut",
    "MislabelGroundTruth",
    "MislabelSpec",
    "SubsetGroundTruth",
    "default_cache_dir",
    "drop_ground_truth",
    "flip_labels",
    "lds_ground_truth",
    "leave_one_out",
    "loo_ground_truth",
    "mislabel_ground_truth",
    "noise_ceiling",
    "parse_protocol",
    "sample_subsets",
    "subset_ground_truth",
    "train_dropped",
]
