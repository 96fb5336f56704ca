"""Consumer emulation: predict an image the way each consumer really runs a package, and measure the seams.

A package can be seamless in one predictor and not in another: the consumers differ in where they apply the
preprocessing, how they pad the image border and how they cut the tiles. Each emulation below predicts the
image tiled and compares it with the same consumer's prediction of the whole image at once
(:func:`tilenorm_bmz.metrics.tiled_vs_whole`: ``max |tiled - whole|`` and a seam map), so what is measured is
the seam the tiling adds, not a difference between consumers.

``tilenorm-bmz`` (:class:`~tilenorm_bmz.tiling.TiledPredictor`)
    The package's preprocessing on the whole image (its per-image statistics once), tiles inside the image
    starting at multiples of the size step, zero padding at the image end, the halo cropped. Reference: one
    forward pass of the whole (zero-padded) image.
``bioimageio.core`` (0.11, ``predict(..., blocksize_parameter=n)``; by default, per axis, the smallest ``n``
    whose block is at least four halos, the cheapest one that still gives two blocks per axis, reduced on an
    axis the image limits; any ``n`` runs the same code)
    Its own blocked prediction (:meth:`PredictionPipeline.predict_sample_with_blocking`): preprocessing up to
    the last sample-wise operator on the whole sample, blocks of ``min + n * step`` (input halo included),
    the package's padding mode at the image border (``symmetric`` when it declares none), outputs cropped by
    the halo. Traps handled: ``n = 0`` is passed as a mapping (an int 0 becomes the default 10), ``n`` is
    reduced until the block fits the image (a larger block raises), and the sample is wrapped in a
    :class:`~bioimageio.core.Sample` with explicit axes (no axis-permutation guessing). Reference: the same
    preprocessing on the whole sample, then ``predict_sample_without_blocking`` (symmetric halo padding).
``ilastik`` (Neural Network workflow -> tiktorch -> bioimageio.core), pinned to the release it models:
    ilastik 1.4.2 with tiktorch 26.5 and bioimageio.core 0.10.2 (``ILASTIK_RELEASE``, named in the reports).
    Weights: TorchScript first, then the state dict. Tile: the smallest ``n`` such that some spatial axis of
    ``min + n * step`` reaches 512 (2D) / 64 (3D) (``InputAxisUtils.get_best_tile_shape``); blocks of
    ``tile - 2 * halo`` on a grid from the image origin, clipped to the image; each block's region plus the
    halo is extended to the tile shape (``(a + 1) // 2`` voxels before, ``a // 2`` after), reflect-padded
    outside the image, and predicted on its own with the package's **whole** preprocessing applied to that
    tile (tiktorch calls ``predict_sample_without_blocking`` per tile: per-image percentiles become per-tile
    percentiles); the block is cropped out of the tile output (lazyflow ``OpTikTorchClassifierPredict``).
    Reference: the preprocessing on the whole image, reflect padding by the halo, one forward pass.

``deepImageJ`` (JDLL ``TileCalculator`` / ``TileMaker``)
    The package's preprocessing on the whole image, then tiles of the image plus the halo on both sides rounded
    down to a valid size (a fixed size as it is; at most ``DEEPIMAGEJ_MAX_PIXELS`` voxels), on a grid of
    ``tile - 2 * halo`` from the image origin, mirror padding outside the image, the halo cropped. It runs the
    weights the gate loaded (deepImageJ itself runs TorchScript; the bioimage.io test checks that the formats
    agree). Reference: mirror padding by the halo, one forward pass. A parameterized package runs regions of
    the gate's size in one tile (not applicable: no seams there).

One module per consumer registers its emulation (:func:`register`) in :data:`EMULATIONS`; adding a consumer is
one module, its import here and its name in ``GateConsumer`` (the reports list them in that vocabulary's order).

Each emulation runs on the central region of the image that holds two of its tiles (blocks) per axis, so its
cost does not grow with the image, and every seam position is still crossed on every axis; for a package the
region is a size bioimageio.core accepts as a whole sample (``size + 2 * halo = min + n * step``) and at most
``max_voxels`` voxels. The region is recorded in ``settings["region"]``.
"""

from . import bioimageio_core, deepimagej, ilastik, tiled_predictor  # noqa: F401  (each registers itself)
from ._common import (
    CONSUMER_LABELS,
    EMULATIONS,
    ConsumerSeams,
    Emulation,
    central_region,
    per_tile_statistics,
    register,
    tiled_predictor_region,
    tiled_predictor_tile,
)
from .bioimageio_core import emulate_bioimageio_core
from .deepimagej import DEEPIMAGEJ_MAX_PIXELS, deepimagej_tile_shape, emulate_deepimagej
from .ilastik import ILASTIK_MIN_SIZE, ILASTIK_RELEASE, _ilastik_blocks, emulate_ilastik, ilastik_tile_shape
from .tiled_predictor import emulate_tiled_predictor

__all__ = [
    "CONSUMER_LABELS",
    "DEEPIMAGEJ_MAX_PIXELS",
    "EMULATIONS",
    "ILASTIK_MIN_SIZE",
    "ILASTIK_RELEASE",
    "ConsumerSeams",
    "Emulation",
    "_ilastik_blocks",
    "central_region",
    "deepimagej_tile_shape",
    "emulate_bioimageio_core",
    "emulate_deepimagej",
    "emulate_ilastik",
    "emulate_tiled_predictor",
    "ilastik_tile_shape",
    "per_tile_statistics",
    "register",
    "tiled_predictor_region",
    "tiled_predictor_tile",
]
