"""tilenorm-bmz's own :class:`~tilenorm_bmz.tiling.TiledPredictor`, as the gate's tiled-vs-whole check."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...config import GateConfig
from ...introspect import resolve_device
from ...metrics import tiled_vs_whole
from ..subject import GateSubject
from ._common import (
    ConsumerSeams,
    _cap,
    _no_reference,
    _not_applicable,
    _shape,
    central_region,
    register,
    tiled_predictor_tile,
)


def emulate_tiled_predictor(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    halo: Sequence[int],
    tile_shape: Sequence[int] | None = None,
    batch_size: int = 2,
    device: str = "auto",
    max_voxels: int | None = None,
) -> ConsumerSeams:
    """Seams of :class:`~tilenorm_bmz.tiling.TiledPredictor` on the central region of ``raw`` that holds two
    tiles per axis (the subject's preprocessing applied to that whole region first)."""
    from ...tiling import TiledPredictor

    if (why := _no_reference(subject)) is not None:
        return _not_applicable("tilenorm-bmz", why)
    tile = tuple(tile_shape) if tile_shape is not None else (
        subject.fixed_shape or tiled_predictor_tile(halo, subject.divisor))
    sizes = [min(s, 2 * t - 2 * h) for s, t, h in zip(raw.shape[1:], tile, halo, strict=True)]
    crop, region = central_region(raw, _cap(sizes, list(subject.divisor), list(subject.divisor), max_voxels))
    image = subject.preprocess(crop)
    dev = resolve_device(device)
    predictor = TiledPredictor(subject.network, tile_shape=tile, halo=tuple(halo), batch_size=batch_size,
                               device=dev, divisor=subject.divisor)
    result = tiled_vs_whole(predictor.predict, subject.network, image, device=dev, divisor=subject.divisor)
    grid = predictor.tiling(image.shape[1:]).grid_shape
    return ConsumerSeams(
        consumer="tilenorm-bmz", applicable=True, result=result,
        description=(f"tiles of {_shape(tile)} ({_shape(grid)} grid) with halo {_shape(halo)}, preprocessing on the "
                     "whole image, zero padding at the image end, halo cropped"),
        settings={"tile_shape": list(tile), "halo": list(halo), "grid": list(grid), "region": region,
                  "weights": subject.weights_format},
    )


@register("tilenorm-bmz", "tilenorm-bmz TiledPredictor")
def _emulate(subject: GateSubject, raw: np.ndarray, *, halo: Sequence[int], config: GateConfig, device: str,
             progress: bool) -> ConsumerSeams:
    return emulate_tiled_predictor(subject, raw, halo=halo, batch_size=config.batch_size, device=device,
                                   max_voxels=config.region_voxels)
