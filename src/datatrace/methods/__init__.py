"""Attribution methods: the shared loop and one file per method (DESIGN.md §3)."""

from datatrace.methods.base import (
    METHODS,
    Attributor,
    FeatureForm,
    FormChoice,
    FormDemand,
    MemberContext,
    MethodConfig,
    make_attributor,
    register_method,
    unregister_method,
)
from datatrace.methods.gradsim import GradCosAttributor, GradDotAttributor, GradSimConfig
from datatrace.methods.influence import InfluenceAttributor, InfluenceConfig
from datatrace.methods.logra import LoGraAttributor, LoGraConfig
from datatrace.methods.rps import RepresenterAttributor, RepresenterConfig
from datatrace.methods.source import SourceAttributor, SourceConfig
from datatrace.methods.tracin import TracInAttributor
from datatrace.methods.trak import TRAKAttributor, TRAKConfig
from datatrace.methods.unrolled import UnrolledAttributor, UnrolledConfig

__all__ = [
    "METHODS",
    "Attributor",
    "FeatureForm",
    "FormChoice",
    "FormDemand",
    "GradCosAttributor",
    "GradDotAttributor",
    "GradSimConfig",
    "InfluenceAttributor",
    "InfluenceConfig",
    "LoGraAttributor",
    "LoGraConfig",
    "MemberContext",
    "MethodConfig",
    "RepresenterAttributor",
    "RepresenterConfig",
    "SourceAttributor",
    "SourceConfig",
    "TRAKAttributor",
    "TRAKConfig",
    "TracInAttributor",
    "UnrolledAttributor",
    "UnrolledConfig",
    "make_attributor",
    "register_method",
    "unregister_method",
]
