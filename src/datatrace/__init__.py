"""datatrace: training data attribution for PyTorch.

Which training examples made this prediction, and by how much? See DESIGN.md for the
conventions: scores are ``(n_query, n_units)`` and positive means "training on this unit
improves the query".
"""

import logging

from datatrace.ensemble import DropoutMember, dropout_members, independent_members
from datatrace.errors import (
    AccuracyWarning,
    ConfigError,
    ConvergenceWarning,
    CostWarning,
    DataError,
    DatatraceError,
    DatatraceWarning,
    MissingDependencyError,
    ModelError,
    NotFittedError,
    NumericalError,
    StoreError,
)
from datatrace.group import Grouping, make_grouper
from datatrace.lora import LoRAMember, lora_members, train_lora_members
from datatrace.methods import (
    METHODS,
    Attributor,
    GradCosAttributor,
    GradDotAttributor,
    InfluenceAttributor,
    LoGraAttributor,
    RepresenterAttributor,
    SourceAttributor,
    TracInAttributor,
    TRAKAttributor,
    UnrolledAttributor,
    make_attributor,
)
from datatrace.recording import CheckpointRecorder, load_trajectory
from datatrace.replay import TrainingRecipe
from datatrace.scores import Scores, TopK
from datatrace.task import Checkpoint, Target, Task

__version__ = "0.1.0"

# a library logs, the application decides where it goes (docs/conventions.md)
logging.getLogger("datatrace").addHandler(logging.NullHandler())

__all__ = [
    "METHODS",
    "AccuracyWarning",
    "Attributor",
    "Checkpoint",
    "CheckpointRecorder",
    "ConfigError",
    "ConvergenceWarning",
    "CostWarning",
    "DataError",
    "DatatraceError",
    "DatatraceWarning",
    "DropoutMember",
    "GradCosAttributor",
    "GradDotAttributor",
    "Grouping",
    "InfluenceAttributor",
    "LoGraAttributor",
    "LoRAMember",
    "MissingDependencyError",
    "ModelError",
    "NotFittedError",
    "NumericalError",
    "RepresenterAttributor",
    "Scores",
    "SourceAttributor",
    "StoreError",
    "TRAKAttributor",
    "Target",
    "Task",
    "TopK",
    "TracInAttributor",
    "TrainingRecipe",
    "UnrolledAttributor",
    "dropout_members",
    "independent_members",
    "load_trajectory",
    "lora_members",
    "make_attributor",
    "make_grouper",
    "train_lora_members",
]
