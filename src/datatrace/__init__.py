"""datatrace: training data attribution for PyTorch.

Which training examples made this prediction, and by how much? See DESIGN.md for the
conventions: scores are ``(n_query, n_units)`` and positive means "training on this unit
improves the query".
"""

from datatrace.ensemble import DropoutMember, dropout_members, independent_members
from datatrace.errors import (
    ConfigError,
    DataError,
    DatatraceError,
    ModelError,
    NotFittedError,
    NumericalError,
    StoreError,
)
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
from datatrace.replay import TrainingRecipe
from datatrace.scores import Scores, TopK
from datatrace.task import Checkpoint, Target, Task

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Attributor",
    "Checkpoint",
    "ConfigError",
    "DataError",
    "DatatraceError",
    "DropoutMember",
    "GradCosAttributor",
    "GradDotAttributor",
    "InfluenceAttributor",
    "LoGraAttributor",
    "LoRAMember",
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
    "lora_members",
    "make_attributor",
    "train_lora_members",
]
