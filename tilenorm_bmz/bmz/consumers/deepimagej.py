"""deepImageJ (JDLL ``TileCalculator`` / ``TileMaker``): whole-image preprocessing, mirror padding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ...config import GateConfig
from ...introspect import resolve_device
from ...metrics import tiled_vs_whole
from ..subject import GateSubject
from ._common import (
    ConsumerSeams,
    _cap,
    _crop_halo,
    _no_reference,
    _not_applicable,
    _shape,
    central_region,
    register,
)

#: deepImageJ's largest tile in voxels (JDLL ``TileFactory.OPTIMAL_MAX_NUMBER_PIXELS``).
DEEPIMAGEJ_MAX_PIXELS = 4096 * 4096 * 3


def deepimagej_tile_shape(spatial: Sequence[int], size_min: Sequence[int], size_step: Sequence[int],
                          halo: Sequence[int], max_pixels: int | None = None) -> tuple[int, ...]:
    """deepImageJ's tile (JDLL ``TileCalculator``): per axis the image plus the halo on both sides, rounded down to
    a valid size ``min + n * step`` (a fixed size as it is), the largest axes reduced by a step until the tile
    has at most ``max_pixels`` voxels (``DEEPIMAGEJ_MAX_PIXELS``)."""
    limit = DEEPIMAGEJ_MAX_PIXELS if max_pixels is None else max_pixels
    tile = [m if st == 0 else m + max(0, (s + 2 * h - m) // st) * st
            for s, m, st, h in zip(spatial, size_min, size_step, halo, strict=True)]
    return tuple(_cap(tile, list(size_min), [max(1, st) for st in size_step], limit))


def emulate_deepimagej(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    device: str = "auto",
    max_voxels: int | None = None,
    batch_size: int = 1,
) -> ConsumerSeams:
    """Seams of deepImageJ's tiled prediction (see the module docstring) on the central region of ``raw`` that
    holds two of its tiles per axis (a parameterized package: at most ``max_voxels``, which deepImageJ runs in
    one tile unless the size steps leave a remainder)."""
    import torch

    if not subject.is_package:
        return _not_applicable("deepImageJ", "a checkpoint, not a package: package it first")
    if (why := _no_reference(subject)) is not None:
        return _not_applicable("deepImageJ", why)
    if subject.weights_format == "pytorch_state_dict" and "torchscript" not in subject.weight_formats:
        return _not_applicable("deepImageJ", "deepImageJ runs TorchScript (or ONNX/TensorFlow) weights; the package "
                               "has a PyTorch state dict only (add TorchScript weights: `bioimageio add-weights`)")
    assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
    halo, div = subject.declared_halo, subject.divisor
    fixed = subject.fixed_shape
    if fixed is not None:  # two tiles per axis
        want = [min(s, 2 * (t - 2 * h)) for s, t, h in zip(raw.shape[1:], fixed, halo, strict=True)]
    else:
        want = list(raw.shape[1:])
    # the reference runs the region plus the halo in one forward pass: a multiple of the divisor
    want = [max(d - 2 * h, (w + 2 * h) // d * d - 2 * h) for w, h, d in zip(want, halo, div, strict=True)]
    crop, region = central_region(raw, _cap(want, [max(1, d - 2 * h) for h, d in zip(halo, div, strict=True)],
                                     list(div), max_voxels))
    spatial = crop.shape[1:]
    tile = deepimagej_tile_shape(spatial, subject.size_min, subject.size_step, halo)
    inner = [t - 2 * h for t, h in zip(tile, halo, strict=True)]
    if any(i < 1 for i in inner):
        return _not_applicable("deepImageJ", f"its tile {_shape(tile)} leaves nothing inside the halo {_shape(halo)}")
    grid = [math.ceil(s / i) for s, i in zip(spatial, inner, strict=True)]
    dev = resolve_device(device)
    net = subject.network

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(dev))
        return y[0].float().cpu().numpy()

    def mirror(image: np.ndarray, read: Sequence[tuple[int, int]]) -> np.ndarray:
        """``image[read]`` with the part outside the image mirrored (``reflect``: the border voxel once)."""
        inside = tuple(slice(max(0, a), min(b, s)) for (a, b), s in zip(read, image.shape[1:], strict=True))
        pad = [(max(0, -a), max(0, b - s)) for (a, b), s in zip(read, image.shape[1:], strict=True)]
        return np.pad(image[(slice(None), *inside)], ((0, 0), *pad), mode="reflect")

    def tiled(image: np.ndarray) -> np.ndarray:  # preprocessing on the whole image, then tiles
        import itertools

        x = subject.preprocess(image)
        result: np.ndarray | None = None
        for index in itertools.product(*(range(g) for g in grid)):
            starts = [k * i for k, i in zip(index, inner, strict=True)]
            y = forward(mirror(x, [(o - h, o - h + t) for o, h, t in zip(starts, halo, tile, strict=True)]))
            if result is None:
                result = np.zeros((y.shape[0], *spatial), dtype=np.float32)
            stops = [min(o + i, s) for o, i, s in zip(starts, inner, spatial, strict=True)]
            result[(slice(None), *(slice(o, e) for o, e in zip(starts, stops, strict=True)))] = y[
                (slice(None), *(slice(h, h + e - o) for h, o, e in zip(halo, starts, stops, strict=True)))]
        assert result is not None
        return result

    def whole(image: np.ndarray) -> np.ndarray:
        x = subject.preprocess(image)
        return _crop_halo(forward(mirror(x, [(-h, s + h) for h, s in zip(halo, spatial, strict=True)])), halo)

    if all(g == 1 for g in grid):
        return _not_applicable(
            "deepImageJ", f"deepImageJ runs this {_shape(spatial)} region in one tile of {_shape(tile)} (its tiles "
            f"reach the image plus the halo, up to {DEEPIMAGEJ_MAX_PIXELS} voxels): it tiles only larger images")
    result = tiled_vs_whole(tiled, whole, crop, device=str(dev))
    return ConsumerSeams(
        consumer="deepImageJ", applicable=True, result=result,
        description=(f"tiles of {_shape(tile)} (inner {_shape(inner)}, {_shape(grid)} grid), mirror padding at the "
                     f"image border, preprocessing on the whole image, {subject.weights_format} weights"),
        settings={"tile_shape": list(tile), "halo": list(halo), "grid": grid, "pad_mode": "reflect",
                  "weights": subject.weights_format, "region": region},
    )


@register("deepImageJ", "deepImageJ (JDLL tiling), emulated")
def _emulate(subject: GateSubject, raw: np.ndarray, *, halo: Sequence[int], config: GateConfig, device: str,
             progress: bool) -> ConsumerSeams:
    return emulate_deepimagej(subject, raw, device=device, max_voxels=config.region_voxels)
