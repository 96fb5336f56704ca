"""Seamless tiled prediction: block geometry, receptive field -> halo, in memory, out of core, on dask.

* :class:`Tiling` / :class:`Block`: frozen value objects of a tiling (where each tile reads, which output
  it owns); tiles lie inside the image and start at multiples of the network's size divisor.
* :class:`TiledPredictor`: predicts any-size images tile by tile, cropping the halo; exact for tile-local
  networks when the halo covers the receptive field (:func:`forward_whole` is the reference).
* :func:`receptive_field`: theoretical (analytic + numerical) and effective receptive field, tile coupling
  by normalization, and the recommended halo.
* :func:`predict_dask`: the same blocks as dask.distributed tasks writing to Zarr.
* :func:`plan_tile`: the cheapest tiling whose measured forward memory and buffers fit a budget.
* :func:`predict_file`: files in, files out (what ``tilenorm-bmz predict`` runs).
"""

from ..introspect import infer_divisor, model_divisor, resolve_device
from .blocks import AxisTiling, Block, Tiling, max_inner_size, min_tile_size
from .distributed import local_client, predict_dask
from .memory import (
    ForwardMemory,
    auto_tile_shape,
    bytes_per_voxel,
    measure_forward_memory,
    memory_budget,
    plan_tile,
)
from .pipeline import PredictionSummary, predict_file
from .plan import TilePlan, plan_tiles
from .predictor import TiledPredictor, forward_whole
from .receptive_field import (
    RFReport,
    analytic_receptive_field,
    receptive_field,
    recommend_halo,
    round_halo,
    tile_coupling_layers,
)

__all__ = [
    "AxisTiling",
    "Block",
    "ForwardMemory",
    "PredictionSummary",
    "RFReport",
    "TilePlan",
    "TiledPredictor",
    "Tiling",
    "analytic_receptive_field",
    "auto_tile_shape",
    "bytes_per_voxel",
    "forward_whole",
    "infer_divisor",
    "local_client",
    "max_inner_size",
    "measure_forward_memory",
    "memory_budget",
    "min_tile_size",
    "model_divisor",
    "plan_tile",
    "plan_tiles",
    "predict_dask",
    "predict_file",
    "receptive_field",
    "recommend_halo",
    "resolve_device",
    "round_halo",
    "tile_coupling_layers",
]
