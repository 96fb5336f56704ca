"""Network architectures."""

from ..config import NORM_KINDS
from .unet import UNet, make_norm

__all__ = ["NORM_KINDS", "UNet", "make_norm"]
