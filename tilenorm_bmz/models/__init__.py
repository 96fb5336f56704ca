"""Network architectures."""

from .unet import NORM_KINDS, UNet, make_norm

__all__ = ["UNet", "NORM_KINDS", "make_norm"]
