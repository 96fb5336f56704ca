"""Tile-size sweep (the paper's Fig. 6): does the segmentation depend on the tile size?

The image is predicted tiled with several tile sizes (same halo). Each prediction is scored per output
channel by Dice against the labels, or, without labels, by its agreement (Dice and ``max |difference|``)
with the prediction made with the largest tile. A tile-local network gives the same segmentation for
every tile size; tile-wise normalization makes the result drift with the tile size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal, Unpack

import numpy as np
import torch
from pydantic import computed_field
from torch import nn

from ._common import (
    ArrayLike,
    MetricResult,
    Predictor,
    RunContext,
    RunOptions,
    as_numpy,
    as_spatial_tuple,
    ceil_to,
    eval_mode,
    keep_device,
    model_divisor,
    resolve_device,
    round_down,
    run_context,
    track,
)
from .dice import dice

__all__ = ["DEFAULT_SWEEP_SIZES", "SweepPoint", "SweepResult", "tile_size_sweep"]

logger = logging.getLogger(__name__)

#: Tile edges tried by default (those that fit the halo and the image are used).
DEFAULT_SWEEP_SIZES: tuple[int, ...] = (48, 64, 96, 128, 160, 192, 256, 320, 384, 512)

PredictorFactory = Callable[[tuple[int, ...]], Callable[[np.ndarray], ArrayLike]]


class SweepPoint(MetricResult):
    """The scores of one tile size."""

    tile_shape: tuple[int, ...]
    dice_to_labels: list[float] | None
    """Per output channel Dice against the labels (None without labels)."""
    agreement_with_largest: list[float]
    """Per output channel Dice against the prediction with the largest tile (1 for the largest itself)."""
    max_abs_diff_to_largest: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def score(self) -> list[float]:
        """What the sweep plots: Dice to the labels if given, else agreement with the largest tile."""
        return self.dice_to_labels if self.dice_to_labels is not None else self.agreement_with_largest


class SweepResult(MetricResult):
    """Result of :func:`tile_size_sweep`; ``points`` are sorted by increasing tile size."""

    reference: Literal["labels", "largest tile"]
    halo: tuple[int, ...]
    threshold: float
    points: list[SweepPoint]
    skipped_sizes: list[str]
    """Requested sizes that were not used, with the reason."""
    device: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def score_range(self) -> list[float]:
        """Per channel ``max - min`` of the score over tile sizes (0: the tile size does not matter)."""
        scores = np.array([p.score for p in self.points], dtype=float)
        return (scores.max(0) - scores.min(0)).tolist()


def _default_factory(
    model: Predictor, halo: tuple[int, ...], batch_size: int, device: torch.device, divisor: tuple[int, ...]
) -> PredictorFactory:
    from tilenorm_bmz.tiling import TiledPredictor  # lazy: metrics work without the tiling module loaded

    def make(tile_shape: tuple[int, ...]) -> Callable[[np.ndarray], ArrayLike]:
        predictor = TiledPredictor(
            model, tile_shape=tile_shape, halo=halo, batch_size=batch_size, device=device, divisor=divisor
        )
        return predictor.predict

    return make


def _resolve_sizes(
    sizes: Sequence[int | Sequence[int]],
    spatial: tuple[int, ...],
    halo: tuple[int, ...],
    div: tuple[int, ...],
) -> tuple[list[tuple[int, ...]], list[str]]:
    dims = len(spatial)
    cap = tuple(ceil_to(s, d) for s, d in zip(spatial, div, strict=True))  # the whole (padded) image
    low = tuple(ceil_to(2 * h + d, d) for h, d in zip(halo, div, strict=True))
    out: list[tuple[int, ...]] = []
    seen: dict[tuple[int, ...], tuple[int, ...]] = {}  # what the network sees -> the tile shape used
    skipped: list[str] = []
    for size in sizes:
        wanted = as_spatial_tuple(size, dims, "tile size")
        rounded = tuple(max(round_down(w, d), d) for w, d in zip(wanted, div, strict=True))
        if any(t < lo and t < c for t, lo, c in zip(rounded, low, cap, strict=True)):
            skipped.append(f"{wanted}: smaller than 2 * halo + divisor = {low}")
            continue
        # clip to the image where the clipped tile is still a valid tile; elsewhere the tiled predictor
        # shrinks the tile to the (padded) image itself
        shape = tuple(min(t, c) if c >= lo else t for t, c, lo in zip(rounded, cap, low, strict=True))
        effective = tuple(min(t, c) for t, c in zip(shape, cap, strict=True))
        if effective in seen:
            skipped.append(f"{wanted}: the same tiles as {seen[effective]} on this image")
            continue
        if shape != wanted:
            logger.info("tile size %s used as %s (divisor %s, image %s)", wanted, shape, div, spatial)
        seen[effective] = shape
        out.append(shape)
    out.sort(key=lambda s: (int(np.prod(s)), s))
    return out, skipped


def tile_size_sweep(
    model: Predictor,
    image: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    halo: int | Sequence[int],
    tile_sizes: Sequence[int | Sequence[int]] = DEFAULT_SWEEP_SIZES,
    predictor_factory: PredictorFactory | None = None,
    context: RunContext | None = None,
    **options: Unpack[RunOptions],
) -> SweepResult:
    """Score tiled predictions of ``image`` over several tile sizes (the paper's Fig. 6).

    Parameters
    ----------
    model
        The network (an ``nn.Module`` or a batch predictor, see :mod:`tilenorm_bmz.metrics`).
    image
        Globally normalized image ``(C, *spatial)``.
    labels
        Binary targets ``(C_out, *spatial)`` (or ``(*spatial)`` for a one-channel output); values above
        ``threshold`` are foreground. Without labels each size is compared with the largest tile.
    halo
        Halo of the tiled prediction (int or one per axis), the same for every size.
    tile_sizes
        Tile edges (int: the same on every axis) or shapes. Rounded down to the divisor, clipped to the
        image (a tile as large as the image is the whole-image prediction); sizes below
        ``2 * halo + divisor`` are skipped and listed in ``skipped_sizes``.
    predictor_factory
        ``tile_shape -> (image -> prediction)``; default: :class:`tilenorm_bmz.tiling.TiledPredictor`
        with ``halo`` and the context's batch size and device. Pass one to sweep another predictor (a consumer
        emulation).
    context, options
        How it runs (:class:`~tilenorm_bmz.metrics.RunContext`: binarization threshold, tiles per forward
        pass (default 1), device, the network's size multiple (default ``model.divisor`` or 1), a progress bar
        over the tile sizes); keyword options override the context's fields.
    """
    ctx = run_context(context, options)
    threshold, batch_size, progress = ctx.threshold, ctx.batch(1), ctx.progress
    img = as_numpy(image, "image").astype(np.float32, copy=False)
    if img.ndim < 2:
        raise ValueError(f"image must be (C, *spatial), got shape {img.shape}")
    spatial = tuple(int(s) for s in img.shape[1:])
    dims = len(spatial)
    halos = as_spatial_tuple(halo, dims, "halo")
    div = model_divisor(model, dims, ctx.divisor)
    dev = resolve_device(ctx.device)
    lab = None
    if labels is not None:
        lab = as_numpy(labels, "labels")
        if lab.shape == spatial:
            lab = lab[None]
        if lab.shape[1:] != spatial:
            raise ValueError(f"labels of shape {lab.shape} do not match the image's spatial shape {spatial}")
    shapes, skipped = _resolve_sizes(tile_sizes, spatial, halos, div)
    if not shapes:
        raise ValueError(
            f"no usable tile size among {list(tile_sizes)} for an image of {spatial} with halo {halos} and "
            f"divisor {div}: {'; '.join(skipped)}"
        )
    if predictor_factory is None and not isinstance(model, nn.Module):
        raise TypeError(
            "tile_size_sweep tiles with TiledPredictor, which needs a torch.nn.Module; for another predictor "
            "pass predictor_factory=(tile_shape -> (image -> prediction))"
        )
    factory = predictor_factory or _default_factory(model, halos, batch_size, dev, div)

    largest = shapes[-1]
    points: list[SweepPoint] = []
    with eval_mode(model), keep_device(model):  # the predictors' mode/device changes are undone after
        reference = as_numpy(factory(largest)(img), "prediction")
        for shape in track(shapes, "tile-size sweep", progress):
            pred = reference if shape == largest else as_numpy(factory(shape)(img), "prediction")
            if pred.shape[1:] != spatial:
                raise ValueError(
                    f"the predictor returned shape {pred.shape} for an image of spatial shape {spatial}"
                )
            if lab is not None and lab.shape[0] != pred.shape[0]:
                raise ValueError(
                    f"labels have {lab.shape[0]} channel(s) but the network predicts {pred.shape[0]}"
                )
            points.append(
                SweepPoint(
                    tile_shape=shape,
                    dice_to_labels=None if lab is None else dice(pred, lab, threshold).tolist(),
                    agreement_with_largest=dice(pred, reference, threshold).tolist(),
                    max_abs_diff_to_largest=float(np.abs(pred - reference).max()),
                )
            )
    return SweepResult(
        reference="labels" if lab is not None else "largest tile",
        halo=halos,
        threshold=threshold,
        points=points,
        skipped_sizes=skipped,
        device=str(dev),
    )
