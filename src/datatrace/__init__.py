"""datatrace: training data attribution for PyTorch.

Which training examples made this prediction, and by how much? See DESIGN.md for the
conventions: scores are ``(n_query, n_units)`` and positive means "training on this unit
improves the query".
"""

from datatrace.errors import (
    ConfigError,
    DataError,
    DatatraceError,
    ModelError,
    NotFittedError,
    NumericalError,
    StoreError,
)
from datatrace.methods import (
    METHODS,
    Attributor,
    GradCosAttributor,
    GradDotAttributor,
    InfluenceAttributor,
    RepresenterAttributor,
    TracInAttributor,
    TRAKAttributor,
    make_attributor,
)
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
    "GradCosAttributor",
    "GradDotAttributor",
    "InfluenceAttributor",
    "ModelError",
    "NotFittedError",
    "NumericalError",
    "RepresenterAttributor",
    "Scores",
    "StoreError",
    "TRAKAttributor",
    "Target",
    "Task",
    "TopK",
    "TracInAttributor",
    "make_attributor",
]
