"""Cost models: the protocol, a byte-counting model and the roofline models per device."""

from .model import CostModel, MaterializedBytes, OpView, program_cost, view_of

__all__ = ["CostModel", "MaterializedBytes", "OpView", "program_cost", "view_of"]
