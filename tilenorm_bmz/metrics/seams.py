"""Tiled vs whole-image prediction: the direct seam test.

``max |tiled - whole|`` over the image, where the whole image fits in memory. A tile-local network
tiled with a sufficient halo (and global input normalization) gives 0; any seam, halo bookkeeping bug,
per-tile padding or per-tile normalization shows up as a non-zero difference, located by the seam map.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import torch
from pydantic import Field, computed_field
from torch import nn

from ._common import (
    ArrayLike,
    MetricResult,
    RunContext,
    RunOptions,
    as_numpy,
    ceil_to,
    eval_mode,
    keep_device,
    model_divisor,
    on_device,
    predict_batched,
    resolve_device,
    run_context,
)

__all__ = ["SeamFigure", "TiledVsWholeResult", "tiled_vs_whole"]

logger = logging.getLogger(__name__)

ImagePredictor = Callable[[np.ndarray], ArrayLike]


@dataclass(frozen=True, eq=False)
class SeamFigure:
    """2D maps for the report (not part of the JSON): ``seam_map`` is max over channels of |tiled - whole|,
    projected by max along the first axis for 3D; ``tiled``/``whole`` are the same plane of the worst
    channel (``(rows, cols)``; for 3D the plane through the largest difference)."""

    seam_map: np.ndarray
    tiled: np.ndarray
    whole: np.ndarray
    channel: int
    projection: str


class TiledVsWholeResult(MetricResult):
    """Result of :func:`tiled_vs_whole`."""

    skipped: bool = False
    reason: str = ""
    """Why the comparison was skipped (the whole image did not fit), empty otherwise."""
    image_shape: tuple[int, ...]
    """Spatial shape of the image compared."""
    max_abs_diff: float | None = None
    max_abs_diff_per_channel: list[float] | None = None
    mean_abs_diff: float | None = None
    worst_voxel: tuple[int, ...] | None = None
    """Spatial coordinates of the largest difference."""
    output_range: list[float] | None = None
    """Per output channel, ``max - min`` of the whole-image prediction (the scale of a regression output)."""
    device: str
    figure: SeamFigure | None = Field(default=None, exclude=True, repr=False)

    @property
    def relative_max_diff(self) -> float | None:
        """``max |tiled - whole| / output range`` over channels (regression outputs are judged by it)."""
        if self.max_abs_diff_per_channel is None or self.output_range is None:
            return None
        return max(d / max(r, 1e-12) for d, r in zip(self.max_abs_diff_per_channel, self.output_range, strict=True))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def seamless(self) -> bool | None:
        """``max_abs_diff == 0`` (None when skipped)."""
        return None if self.max_abs_diff is None else self.max_abs_diff == 0.0


def _predict_whole_model(
    model: nn.Module, image: np.ndarray, divisor: tuple[int, ...], device: torch.device
) -> np.ndarray:
    """One forward pass of the image zero-padded once at its end to the divisor (what the tiled
    predictor's tiles see at the image border), cropped back; modes and device are restored."""
    spatial = image.shape[1:]
    padded = tuple(ceil_to(s, d) for s, d in zip(spatial, divisor, strict=True))
    if padded != spatial:
        image = np.pad(image, ((0, 0), *((0, p - s) for s, p in zip(spatial, padded, strict=True))))
    x = torch.from_numpy(np.ascontiguousarray(image))[None]
    with eval_mode(model), on_device(model, device):
        y = predict_batched(model, x, 1, device)[0].cpu().numpy()
    return y[(slice(None), *(slice(0, s) for s in spatial))]


def tiled_vs_whole(
    predict_tiled: ImagePredictor,
    predict_whole: nn.Module | ImagePredictor,
    image: ArrayLike,
    *,
    max_voxels: int | None = None,
    context: RunContext | None = None,
    **options: Unpack[RunOptions],
) -> TiledVsWholeResult:
    """Compare a tiled prediction of ``image`` with the prediction of the whole image at once.

    Parameters
    ----------
    predict_tiled
        Maps an image ``(C, *spatial)`` to its tiled prediction ``(C_out, *spatial)``, e.g.
        ``TiledPredictor(model, ...).predict`` or a consumer emulation.
    predict_whole
        An ``nn.Module`` (run once on the whole image, eval mode, on ``device``) or a callable like
        ``predict_tiled`` that predicts the whole image in one piece.
    image
        Globally normalized image ``(C, *spatial)``.
    max_voxels
        Skip (with a reason) when the image has more spatial voxels than this.
    context, options
        How it runs (:class:`~tilenorm_bmz.metrics.RunContext`): the device of the whole-image prediction of an
        ``nn.Module``, and its size multiple (default: its ``divisor`` or 1): the image is zero-padded once at
        its end to a multiple for the whole-image pass and the output cropped back, which is what
        :class:`~tilenorm_bmz.tiling.TiledPredictor` does at the image border.

    Returns
    -------
    TiledVsWholeResult
        ``max_abs_diff`` and where it is, or ``skipped`` with the reason when the whole image did not fit.
    """
    img = as_numpy(image, "image").astype(np.float32, copy=False)
    if img.ndim < 2:
        raise ValueError(f"image must be (C, *spatial), got shape {img.shape}")
    ctx = run_context(context, options)
    dev, divisor = resolve_device(ctx.device), ctx.divisor
    spatial = tuple(int(s) for s in img.shape[1:])
    if max_voxels is not None and int(np.prod(spatial)) > max_voxels:
        return TiledVsWholeResult(
            skipped=True,
            reason=f"the image has {int(np.prod(spatial))} voxels, more than max_voxels={max_voxels}",
            image_shape=spatial,
            device=str(dev),
        )
    try:
        if isinstance(predict_whole, nn.Module):
            div = model_divisor(predict_whole, len(spatial), divisor)
            whole = _predict_whole_model(predict_whole, img, div, dev)
        else:
            whole = as_numpy(predict_whole(img), "whole prediction")
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return TiledVsWholeResult(
            skipped=True,
            reason=f"the whole image {spatial} does not fit in memory on {dev} ({type(e).__name__})",
            image_shape=spatial,
            device=str(dev),
        )
    if isinstance(predict_whole, nn.Module):  # undo what a tiled predictor does to the module's mode/device
        with eval_mode(predict_whole), keep_device(predict_whole):
            tiled = as_numpy(predict_tiled(img), "tiled prediction")
    else:
        tiled = as_numpy(predict_tiled(img), "tiled prediction")
    if tiled.shape != whole.shape:
        raise ValueError(
            f"the tiled prediction has shape {tiled.shape} but the whole-image prediction {whole.shape}: "
            "both must be (C_out, *spatial) of the same image"
        )
    diff = np.abs(tiled.astype(np.float32) - whole.astype(np.float32))
    flat = int(np.argmax(diff))
    c, *pos = np.unravel_index(flat, diff.shape)
    return TiledVsWholeResult(
        image_shape=spatial,
        max_abs_diff=float(diff.reshape(-1)[flat]),
        max_abs_diff_per_channel=diff.reshape(diff.shape[0], -1).max(1).astype(float).tolist(),
        mean_abs_diff=float(diff.mean(dtype=np.float64)),
        worst_voxel=tuple(int(p) for p in pos),
        output_range=np.ptp(whole.reshape(whole.shape[0], -1), axis=1).astype(float).tolist(),
        device=str(dev),
        figure=_make_figure(diff, tiled, whole, int(c), [int(p) for p in pos]),
    )


def _make_figure(
    diff: np.ndarray, tiled: np.ndarray, whole: np.ndarray, c: int, pos: list[int]
) -> SeamFigure:
    seam = diff.max(0)
    if seam.ndim == 1:
        return SeamFigure(seam[None], tiled[c][None], whole[c][None], c, "the whole (1D) image")
    if seam.ndim == 2:
        return SeamFigure(seam, tiled[c], whole[c], c, "the whole image")
    lead = tuple(range(seam.ndim - 2))
    index = tuple(pos[: seam.ndim - 2])
    return SeamFigure(
        seam_map=seam.max(axis=lead),
        tiled=tiled[(c, *index)],
        whole=whole[(c, *index)],
        channel=c,
        projection=f"seam map: maximum along axis 0; predictions: plane axis 0 = {index[0]}",
    )
