"""Network architectures."""

from .unet import NORM_KINDS, UNet, make_norm

__all__ = ["NORM_KINDS", "UNet", "make_norm"]
