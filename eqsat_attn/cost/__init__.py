"""Cost models: the protocol, a byte-counting model and the roofline models per device."""

from .devices import CPU, DEVICES, H100, H200, DeviceSpec, calibration_path, device_spec
from .model import CostModel, MaterializedBytes, OpView, program_cost, view_of
from .roofline import Breakdown, RooflineModel, current_device_model, current_device_name, for_device

__all__ = [
    "CPU", "DEVICES", "H100", "H200", "Breakdown", "CostModel", "DeviceSpec", "MaterializedBytes", "OpView",
    "RooflineModel", "calibration_path", "current_device_model", "current_device_name", "device_spec",
    "for_device", "program_cost", "view_of",
]
