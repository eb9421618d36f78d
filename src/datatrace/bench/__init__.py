"""Benchmark settings, retraining ground truth and runners (DESIGN.md §7).

The subset ground truth follows the LDS protocol of TRAK (Park et al., 2023).
"""

from datatrace.bench.groundtruth import (
    LeaveOneOut,
    SubsetGroundTruth,
    leave_one_out,
    noise_ceiling,
    sample_subsets,
    subset_ground_truth,
)

__all__ = [
    "LeaveOneOut",
    "SubsetGroundTruth",
    "leave_one_out",
    "noise_ceiling",
    "sample_subsets",
    "subset_ground_truth",
]
