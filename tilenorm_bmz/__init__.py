"""tilenorm-bmz: seamless tiled segmentation with BatchRenorm U-Nets and bioimage.io packages.

The public API is re-exported here; bioimage.io functionality lives in :mod:`tilenorm_bmz.bmz` and is
imported lazily so that the core works without loading bioimageio.
"""

from __future__ import annotations

import logging
from typing import Any

from ._version import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .config import NormConfig, RenormSchedule, UNetConfig
from .models import UNet
from .norm import BatchRenorm, calibrate_norm, convert_norm

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "export_package": "tilenorm_bmz.bmz",
    "validate_package": "tilenorm_bmz.bmz",
    "TiledPredictor": "tilenorm_bmz.tiling",
    "receptive_field": "tilenorm_bmz.tiling",
    "dice": "tilenorm_bmz.metrics",
    "tile_mismatch": "tilenorm_bmz.metrics",
    "train_eval_disparity": "tilenorm_bmz.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tilenorm_bmz' has no attribute {name!r}")


__all__ = [
    "__version__",
    "BatchRenorm",
    "NormConfig",
    "RenormSchedule",
    "UNet",
    "UNetConfig",
    "calibrate_norm",
    "convert_norm",
    "load_checkpoint",
    "save_checkpoint",
    "export_package",
    "validate_package",
    "TiledPredictor",
    "receptive_field",
    "dice",
    "tile_mismatch",
    "train_eval_disparity",
]
