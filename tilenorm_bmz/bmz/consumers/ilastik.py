"""ilastik's Neural Network workflow (tiktorch -> bioimageio.core), pinned to the release it models."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from ...config import GateConfig
from ...introspect import resolve_device
from ...metrics import tiled_vs_whole
from ...progress import track
from ..subject import GateSubject
from ._common import (
    ConsumerSeams,
    _cap,
    _crop_halo,
    _no_reference,
    _not_applicable,
    _per_sample_steps,
    _Pipeline,
    _shape,
    _weights,
    _WholeSizes,
    central_region,
    register,
)

#: ilastik's tile target per dimensionality (``InputAxisUtils.MIN_SIZE_2D`` / ``MIN_SIZE_3D``).
ILASTIK_MIN_SIZE = {2: 512, 3: 64}
#: The ilastik release the emulation follows (its tiktorch and bioimageio.core).
ILASTIK_RELEASE = "ilastik 1.4.2 (tiktorch 26.5, bioimageio.core 0.10.2)"


def ilastik_tile_shape(size_min: Sequence[int], size_step: Sequence[int], dims: int) -> tuple[int, ...]:
    """ilastik's tile: ``min + n * step`` with the smallest per-axis ``n`` that makes an axis reach 512 / 64."""
    target = ILASTIK_MIN_SIZE[dims]
    factors = [max(0, math.ceil((target - m) / s)) for m, s in zip(size_min, size_step, strict=True) if s]
    n = min(factors, default=0)  # fixed sizes (step 0) stay as they are
    return tuple(m + n * s for m, s in zip(size_min, size_step, strict=True))




def _ilastik_blocks(spatial: Sequence[int], tile: Sequence[int], halo: Sequence[int]) -> Iterator[
        tuple[tuple[slice, ...], tuple[slice, ...], tuple[tuple[int, int], ...], tuple[slice, ...]]]:
    """lazyflow's requests: (block in the image, read region, reflect padding, block inside the tile output)."""
    import itertools

    block = [t - 2 * h for t, h in zip(tile, halo, strict=True)]
    starts = [range(0, s, b) for s, b in zip(spatial, block, strict=True)]
    for origin in itertools.product(*starts):
        roi, read, pad, local = [], [], [], []
        for o, b, s, t, h in zip(origin, block, spatial, tile, halo, strict=True):
            stop = min(o + b, s)
            up0, up1 = o - h, stop + h
            a = t - (up1 - up0)
            up0, up1 = up0 - (a + 1) // 2, up1 + a // 2
            roi.append(slice(o, stop))
            read.append(slice(max(0, up0), min(up1, s)))
            pad.append((max(0, -up0), max(0, up1 - s)))
            local.append(slice(o - up0, stop - up0))
        yield tuple(roi), tuple(read), tuple(pad), tuple(local)


def emulate_ilastik(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    device: str = "auto",
    max_voxels: int | None = None,
    progress: bool = False,
) -> ConsumerSeams:
    """Seams of ilastik's tiled prediction of the central region of ``raw`` holding two of its blocks per axis
    (see the module docstring)."""

    if not subject.is_package:
        return _not_applicable("ilastik", "a checkpoint, not a package: package it first")
    if subject.descr is not None and len(subject.descr.inputs) > 1:
        return _not_applicable("ilastik", f"ilastik's neural network workflow runs models with one input; this one "
                               f"has {len(subject.descr.inputs)}")
    if (why := _no_reference(subject)) is not None:
        return _not_applicable("ilastik", why)
    assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
    halo = subject.declared_halo
    tile = ilastik_tile_shape(subject.size_min, subject.size_step, subject.dims)
    if any(t - 2 * h < 1 for t, h in zip(tile, halo, strict=True)):
        return _not_applicable("ilastik", f"ilastik's tile {_shape(tile)} leaves no block inside the halo {_shape(halo)}")
    sizes = _WholeSizes(subject)
    if not sizes.fits(raw.shape[1:]):
        return _not_applicable("ilastik", f"the image {_shape(raw.shape[1:])} is smaller than the package's smallest "
                               "whole sample (the reference prediction)")
    # two of ilastik's blocks per axis (a smaller image: all of it), a valid whole sample for the reference
    block = [t - 2 * h for t, h in zip(tile, halo, strict=True)]
    want = [sizes.largest(a, max(min(s, 2 * b), sizes.low[a])) for a, (s, b) in enumerate(zip(
        raw.shape[1:], block, strict=True))]
    crop, region = central_region(raw, _cap(want, sizes.low, sizes.step, max_voxels))
    fmt = _weights(subject, ("torchscript", "pytorch_state_dict", "onnx"))
    dev = str(resolve_device(device))
    spatial = crop.shape[1:]
    blocks = list(_ilastik_blocks(spatial, tile, halo))

    with _Pipeline(subject, fmt, dev) as pipe:

        def run_tile(x: np.ndarray) -> np.ndarray:  # tiktorch: the whole pipeline on one tile
            out = pipe.pp.predict_sample_without_blocking(
                pipe.sample(x), skip_input_padding=True, skip_output_cropping=True)
            return pipe.output(out)

        def tiled(image: np.ndarray) -> np.ndarray:
            result: np.ndarray | None = None
            for roi, read, pad, local in track(blocks, "ilastik emulation", progress):
                x = np.pad(image[(slice(None), *read)], ((0, 0), *pad), mode="reflect")
                y = run_tile(x)
                if result is None:
                    result = np.zeros((y.shape[0], *spatial), dtype=np.float32)
                result[(slice(None), *roi)] = y[(slice(None), *local)]
            assert result is not None
            return result

        def whole(image: np.ndarray) -> np.ndarray:
            x = np.pad(pipe.preprocessed(image), ((0, 0), *((h, h) for h in halo)), mode="reflect")
            return _crop_halo(pipe.forward_preprocessed(x), halo)

        result = tiled_vs_whole(tiled, whole, crop, device=dev)
    per_tile = _per_sample_steps(subject.descr)
    return ConsumerSeams(
        consumer="ilastik", applicable=True, result=result,
        description=(f"tiles of {_shape(tile)} (blocks of {_shape(t - 2 * h for t, h in zip(tile, halo, strict=True))}, "
                     f"{len(blocks)} tile(s)), reflect padding, the package's preprocessing applied per tile"
                     + (f" ({', '.join(per_tile)} statistics computed per tile)" if per_tile else "")
                     + f", {fmt} weights"),
        settings={"tile_shape": list(tile), "block_shape": [t - 2 * h for t, h in zip(tile, halo, strict=True)],
                  "halo": list(halo), "n_tiles": len(blocks), "weights": fmt, "pad_mode": "reflect",
                  "per_tile_statistics": per_tile, "region": region},
    )


@register("ilastik", f"{ILASTIK_RELEASE}, emulated")
def _emulate(subject: GateSubject, raw: np.ndarray, *, halo: Sequence[int], config: GateConfig, device: str,
             progress: bool) -> ConsumerSeams:
    return emulate_ilastik(subject, raw, device=device, max_voxels=config.region_voxels, progress=progress)
