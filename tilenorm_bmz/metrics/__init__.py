"""Metrics of tiled segmentation: Dice, tile mismatch, train/eval disparity, seams, halo, tile-size sweep.

Definitions are exact as in the paper (Buglakova et al. 2025) and ``ARCHITECTURE.md``. Inputs are numpy
arrays (or tensors) ``(C, *spatial)``; results are frozen pydantic models whose ``model_dump(mode="json")``
is the JSON record; arrays for figures sit in excluded ``figure`` fields.

Predictions run with torch on ``device`` (``"auto"``: CUDA when available), tiles batched. The network
is an ``nn.Module`` (eval mode, restored afterwards) or, for every metric but the disparity, any callable
mapping a float32 tensor ``(N, C, *s)`` to ``(N, C_out, *s)``, so the metrics run on any predictor.

How a metric runs (device, tiles per forward pass, the network's divisor, the binarization threshold, progress
bars) is one :class:`RunContext` shared by the metrics of a run (``context=``); each field may also be given as
a keyword argument, which overrides the context's.

A validation gate is a composition of these functions::

    rf = receptive_field(model, dims)
    checks = [
        tile_mismatch(model, image, halo=halo),
        train_eval_disparity(model, image),
        tiled_vs_whole(TiledPredictor(model, tile_shape, halo).predict, model, image),
        halo_sufficiency(halo, rf),
        tile_size_sweep(model, image, labels, halo=halo),
    ]
"""

from ._common import MetricResult, RunContext, RunOptions, eval_mode, resolve_device, run_context
from .dice import dice
from .disparity import DisparityFigure, DisparityResult, norm_layers, train_eval_disparity
from .halo import COUPLED, HaloSufficiencyResult, halo_sufficiency
from .independent import IndependentScore, independent_dice, mean_dice
from .mismatch import MismatchFigure, MismatchGeometry, TileMismatchResult, mismatch_geometry, tile_mismatch
from .seams import SeamFigure, TiledVsWholeResult, tiled_vs_whole
from .sweep import DEFAULT_SWEEP_SIZES, SweepPoint, SweepResult, tile_size_sweep
from .wrappers import NormTrainMode, TilewiseNormalized

__all__ = [
    "COUPLED",
    "DEFAULT_SWEEP_SIZES",
    "DisparityFigure",
    "DisparityResult",
    "HaloSufficiencyResult",
    "IndependentScore",
    "MetricResult",
    "MismatchFigure",
    "MismatchGeometry",
    "NormTrainMode",
    "RunContext",
    "RunOptions",
    "SeamFigure",
    "SweepPoint",
    "SweepResult",
    "TileMismatchResult",
    "TiledVsWholeResult",
    "TilewiseNormalized",
    "dice",
    "independent_dice",
    "eval_mode",
    "halo_sufficiency",
    "mean_dice",
    "mismatch_geometry",
    "norm_layers",
    "resolve_device",
    "run_context",
    "tile_mismatch",
    "tile_size_sweep",
    "tiled_vs_whole",
    "train_eval_disparity",
]
