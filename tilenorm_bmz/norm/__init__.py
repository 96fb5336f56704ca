"""Normalization layers: BatchRenorm, its schedule, and conversion of any network's norm layers."""

from ..config import RenormSchedule
from .batchrenorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_limits
from .convert import ConversionReport, LayerConversion, SkippedLayer, calibrate_norm, convert_norm

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ConversionReport",
    "LayerConversion",
    "RenormSchedule",
    "SkippedLayer",
    "calibrate_norm",
    "convert_norm",
    "renorm_limits",
]
