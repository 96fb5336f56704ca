"""The validation gate config: :class:`GateConfig` and the gate's vocabularies (checks, consumers)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from ._base import StrictModel, _check_halo

__all__ = ["GATE_CHECKS", "GATE_CONSUMERS", "GateCheck", "GateConfig", "GateConsumer"]

GateCheck = Literal["bioimageio", "tile_mismatch", "disparity", "tiled_vs_whole", "consumers", "halo", "sweep",
                    "dice"]
#: The checks of the validation gate, in the order they run (``GateConfig.checks``).
GATE_CHECKS: tuple[str, ...] = get_args(GateCheck)
GateConsumer = Literal["tilenorm-bmz", "bioimageio.core", "ilastik", "deepImageJ"]
ReportFormat = Literal["json", "collection"]
"""``json``: report.json + report.html; ``collection``: also the bioimage.io collection's tool report."""
REPORT_FORMATS: tuple[str, ...] = get_args(ReportFormat)
#: Predictors the gate emulates when it measures seams (``GateConfig.gating_consumers``).
GATE_CONSUMERS: tuple[str, ...] = get_args(GateConsumer)


class GateConfig(StrictModel):
    """Thresholds and settings of the validation gate (``tilenorm-bmz validate``; ``package`` runs it too).

    A model is accepted when no check fails. The defaults are the project's acceptance rule: the bioimage.io
    test passes, two overlapping tiles agree (``max_dist <= 1e-4``: seamless up to float rounding), train/eval
    disparity is at most 0.05 per channel, and the declared halo covers the measured receptive field. Seams
    (tiled vs whole image) decide for the consumers in ``gating_consumers``; the others are measured and
    reported (ilastik by default: it normalizes every tile on its own and re-centres border tiles, so a
    package can be exact in bioimageio.core and still differ slightly in ilastik).

    The consumer emulations, the tiled-vs-whole comparison and the tile-size sweep each run on the central
    region of every image that holds two of their tiles per axis (at most ``region_voxels`` voxels; for
    packages a valid whole-sample size for bioimageio.core), and tile mismatch measures ``max_crops`` crops, so
    the gate's cost does not grow with the volume beyond the disparity tiles and the preprocessing.
    """

    checks: list[GateCheck] = list(GATE_CHECKS)  # type: ignore[arg-type]
    """Checks to run: bioimageio, tile_mismatch, disparity, tiled_vs_whole, consumers, halo, sweep, dice."""
    require_bioimageio_test: bool = True
    """The bioimage.io format validation and model test must pass (packages; False: report only)."""
    output_kind: Literal["auto", "probability", "regression"] = "auto"
    """What the network predicts: probabilities (compared binarized at ``threshold``: Dice) or values of a
    regression (denoising, restoration: compared relative to the output's range, ``max - min``). auto:
    probability when the package's postprocessing ends in a sigmoid/softmax or every output on the data lies in
    [0, 1], else regression."""
    max_dist: float = Field(1e-4, ge=0.0)
    """Tile mismatch: largest |O1 - O2| in the valid overlap of two tiles (regression outputs: divided by the
    output range)."""
    max_disparity: float = Field(0.05, ge=0.0, le=1.0)
    """Train/eval disparity: largest ``1 - Dice(P_train, P_eval)`` of any channel (regression outputs:
    ``mean |P_train - P_eval| / output range``)."""
    max_seam: float = Field(1e-4, ge=0.0)
    """Tiled vs whole image, per consumer: largest |tiled - whole| (regression outputs: divided by the output
    range)."""
    require_sufficient_halo: bool = True
    """The declared halo must be at least the one-sided receptive field (False: report only)."""
    gating_consumers: list[GateConsumer] = ["tilenorm-bmz", "bioimageio.core"]
    """Consumers whose seams decide (tilenorm-bmz, bioimageio.core, ilastik, deepImageJ); the others are reported."""
    max_sweep_range: float | None = Field(None, ge=0.0)
    """Largest spread of the sweep score over tile sizes (None: the sweep is informational)."""
    min_dice: float | None = Field(None, ge=0.0, le=1.0)
    """Smallest Dice against the labels of any channel (None: Dice is informational)."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Binarization threshold of predictions (Dice, mismatch, disparity)."""
    max_clipped: float = Field(0.05, ge=0.0, le=1.0)
    """Largest fraction of an image's voxels the preprocessing may push onto the bottom or the top of its range
    (beyond what the percentiles clip by design); more makes the image degenerate: no verdict."""
    crop_shape: list[int] | None = None
    """Tile mismatch crop (default: the paper's 192x192x288 / 192x288, scaled down to fit the image)."""
    stride: int = Field(64, ge=1)
    """Tile mismatch crop grid stride."""
    tile: int | None = Field(None, ge=1)
    """Tile mismatch tile length along the long axis (default 192)."""
    offset: int | None = Field(None, ge=1)
    """Tile mismatch offset of the second tile (default tile / 2)."""
    max_crops: int | None = Field(2, ge=1)
    """Tile mismatch crops measured per image, evenly spread over the grid (None: all)."""
    disparity_tiles: int = Field(4, ge=1)
    """Tiles sampled per image for the train/eval disparity."""
    disparity_tile: int | None = Field(None, ge=1)
    """Disparity tile edge (default: 192 in 2D, 64 in 3D, the training tiles of the paper; clipped to the image)."""
    disparity_batch_size: int = Field(1, ge=1)
    """Tiles per train-mode forward pass (part of what is measured: 1 = batch-1 training)."""
    sweep_sizes: list[int] | None = None
    """Tile edges of the tile-size sweep, e.g. the paper's [64, 96, 128, 192, 256] (default: tiles giving 1 to 4
    (2D) / 1 to 2 (3D) tiles per axis of the sweep region, which is two seam-test tiles wide)."""
    region_voxels: int = Field(2**22, ge=1)
    """Largest region (voxels) of each consumer emulation and of the sweep (each needs only two tiles per axis)."""
    core_blocksize: int | None = Field(None, ge=0)
    """bioimageio.core block size parameter n (blocks of min + n * step, reduced to fit the image); default: the
    smallest n whose block is at least 4 * halo, so a one-block sample splits into two blocks per axis (the
    cheapest emulation; core's own default is 10)."""
    halo: int | list[int] | None = None
    """Halo for checkpoints (packages use the halo they declare); default: from the receptive field."""
    weights: Literal["auto", "pytorch_state_dict", "torchscript", "onnx"] = "auto"
    """Package weights the metrics run (auto: the state dict when it can be built, else TorchScript, else ONNX)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    batch_size: int = Field(2, ge=1)
    """Tiles per forward pass (tile mismatch, tiled predictions)."""

    @field_validator("checks", "gating_consumers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v

    @field_validator("crop_shape")
    @classmethod
    def _crop(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) not in (2, 3) or min(v) < 1):
            raise ValueError(f"crop_shape needs 2 or 3 positive sizes (y, x or z, y, x), got {v}")
        return v

    @field_validator("halo")
    @classmethod
    def _halo(cls, v: int | list[int] | None) -> int | list[int] | None:
        return _check_halo(v)

    @field_validator("sweep_sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"sweep_sizes needs at least one positive tile edge, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:") or v == "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v
