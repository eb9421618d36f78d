"""Groups of training examples as attribution units, and the groupers that form them.

Generalized group data attribution (Ley et al., 2024, "Generalized Group Data Attribution")
attributes to groups of training points instead of single points: a group's gradient is the
gradient of its summed loss, so one group feature replaces ``|g|`` per-sample features in
projection, kernels, scoring and storage. The shared attribution loop consumes a
:class:`Grouping` (``groups=`` of every attributor); this module knows no method.

A :class:`Grouping` maps each training index to a group. Group ids are any non-negative
integers; they are relabelled internally to ``0..n_groups-1`` in ascending id order and the
original ids are the score's ``unit_ids``. Groupers (DESIGN.md §8 ids): ``random``,
``class-random`` (groups of one class each), ``kmeans-input``, ``kmeans-repr``,
``kmeans-grad`` and ``given``. Every grouper is deterministic for its seed and records the
seconds it took on the grouping it returns (the grouping cost is part of the bill).
"""

from datatrace.data import take_examples
from datatrace.group.clustering import balanced_kmeans, kmeans
from datatrace.group.groupers import ClassRandomGrouper, GivenGrouper, Grouper, RandomGrouper
from datatrace.group.grouping import Grouping
from datatrace.group.kmeans_groupers import (
    KMeansGradGrouper,
    KMeansInputGrouper,
    KMeansReprGrouper,
)
from datatrace.group.spec import GROUPERS, make_grouper, resolve_groups

# importable from here for the shared loop, not part of the documented API
from datatrace.group.spec import GroupsSpec as GroupsSpec
from datatrace.group.spec import check_groups_spec as check_groups_spec

__all__ = [
    "GROUPERS",
    "ClassRandomGrouper",
    "GivenGrouper",
    "Grouper",
    "Grouping",
    "KMeansGradGrouper",
    "KMeansInputGrouper",
    "KMeansReprGrouper",
    "RandomGrouper",
    "balanced_kmeans",
    "kmeans",
    "make_grouper",
    "resolve_groups",
    "take_examples",
]
