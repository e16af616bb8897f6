"""eqsat-attn: equality-saturation optimizer for JAX programs."""

from . import ir
from .disk_cache import set_cache_dir
from .capture import Captured, capture, jaxpr_to_program
from .explore import Exploration, explore
from .limits import Limits
from .lower import lower
from .optimize import OptimizedFunction, optimize
from .pipeline import OptimizeOptions
from .report import AttentionInfo, RegionInfo, Report

__all__ = [
    "AttentionInfo",
    "RegionInfo",
    "Captured",
    "Exploration",
    "Limits",
    "OptimizeOptions",
    "OptimizedFunction",
    "Report",
    "capture",
    "explore",
    "ir",
    "jaxpr_to_program",
    "lower",
    "optimize",
    "set_cache_dir",
]
