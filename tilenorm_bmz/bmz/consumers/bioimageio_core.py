"""bioimageio.core 0.11's blocked prediction (``PredictionPipeline.predict_sample_with_blocking``)."""

from __future__ import annotations

import logging
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
    _is_parameterized,
    _no_reference,
    _not_applicable,
    _Pipeline,
    _quiet,
    _shape,
    _weights,
    _WholeSizes,
    central_region,
    register,
)

logger = logging.getLogger(__name__)

def emulate_bioimageio_core(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    blocksize: int | None = None,
    device: str = "auto",
    max_voxels: int | None = None,
) -> ConsumerSeams:
    """Seams of bioimageio.core's blocked prediction of the central region of ``raw`` that holds one block (it
    is cut into at least two blocks per axis; see the module docstring)."""

    if not subject.is_package:
        return _not_applicable("bioimageio.core", "a checkpoint, not a package: package it first")
    if (why := _no_reference(subject)) is not None:
        return _not_applicable("bioimageio.core", why)
    fixed_out = [str(a.id) for a in subject.descr.outputs[0].axes
                 if str(getattr(a, "type", "")) == "space" and isinstance(getattr(a, "size", None), int)]
    if fixed_out:
        return _not_applicable(
            "bioimageio.core", f"the package declares fixed output sizes ({', '.join(fixed_out)}): bioimageio.core's "
            "blocked prediction gives an output of that size, so it cannot predict an image larger than one tile "
            "(declare the output sizes as references to the input's)")
    assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
    sizes = _WholeSizes(subject)
    if not sizes.fits(raw.shape[1:]):
        return _not_applicable("bioimageio.core", f"the image {_shape(raw.shape[1:])} is smaller than the package's "
                               "smallest whole sample")
    largest = [sizes.largest(a, s) for a, s in enumerate(raw.shape[1:])]
    if blocksize is None:  # the smallest block of at least 4 * halo: two blocks per axis of a one-block sample
        blocksize = max(0, *(-(-(4 * h - m) // st) if st else 0 for m, st, h in zip(
            subject.size_min, subject.size_step, subject.declared_halo, strict=True)))
    # per axis (core takes n per tensor axis): an axis the image limits does not shrink the blocks of the others
    n_axes = [min(blocksize, (r - m) // st) if st else 0 for r, m, st in zip(
        largest, subject.size_min, subject.size_step, strict=True)]
    if min(n_axes) < 0:
        return _not_applicable(
            "bioimageio.core",
            f"the image {_shape(raw.shape[1:])} is smaller than the package's smallest block "
            f"{_shape(subject.size_min)} (bioimageio.core refuses blocks larger than the image)",
        )
    if min(n_axes) < blocksize:
        logger.info("bioimageio.core emulation: block size parameter %d reduced to %s to fit the image", blocksize,
                    n_axes)
    block = tuple(m + n * st for m, n, st in zip(subject.size_min, n_axes, subject.size_step, strict=True))
    inner = [b - 2 * h for b, h in zip(block, subject.declared_halo, strict=True)]
    # the smallest sample holding a block: ceil(block / inner) >= 2 blocks per axis (core shifts the last one to
    # the border), so every seam position is crossed on every axis
    # (without a halo the inner block is the block: one voxel more makes the second block)
    want = [min(sizes.smallest(a, max(b, i + 1)), r) for a, (b, i, r) in enumerate(zip(block, inner, largest,
                                                                                      strict=True))]
    crop, region = central_region(raw, _cap(want, block, sizes.step, max_voxels))
    spatial = crop.shape[1:]
    descr = subject.descr
    fmt = _weights(subject, ("pytorch_state_dict", "torchscript", "onnx"))
    pad = getattr(descr.inputs[0], "pad", None)
    pad_mode = str(getattr(pad, "mode", None) or "symmetric")
    n_of = dict(zip(subject.axes, n_axes, strict=True))
    ns = {(t.id, a.id): n_of[str(a.id)] for t in descr.inputs for a in t.axes if _is_parameterized(a)}
    n = n_axes[0] if len(set(n_axes)) == 1 else "x".join(map(str, n_axes))
    dev = str(resolve_device(device))

    with _Pipeline(subject, fmt, dev) as pipe:

        def tiled(image: np.ndarray) -> np.ndarray:
            with _quiet():
                out = pipe.pp.predict_sample_with_blocking(pipe.sample(image), ns=ns)
            return pipe.output(out)

        def whole(image: np.ndarray) -> np.ndarray:
            sample = pipe.sample(image)
            pipe.pp.apply_preprocessing(sample)
            return pipe.output(pipe.pp.predict_sample_without_blocking(sample, skip_preprocessing=True))

        result = tiled_vs_whole(tiled, whole, crop, device=dev)
    grid = [math.ceil(s / max(i, 1)) for s, i in zip(spatial, inner, strict=True)]
    return ConsumerSeams(
        consumer="bioimageio.core", applicable=True, result=result,
        description=(f"blocks of {_shape(block)} (n = {n}, inner {_shape(inner)}, {_shape(grid)} grid), {pad_mode} "
                     f"padding at the image border, preprocessing on the whole sample, {fmt} weights"),
        settings={"blocksize_parameter": n, "block_shape": list(block), "halo": list(subject.declared_halo),
                  "pad_mode": pad_mode, "weights": fmt, "grid": grid, "region": region},
    )


@register("bioimageio.core", "bioimageio.core blocked prediction")
def _emulate(subject: GateSubject, raw: np.ndarray, *, halo: Sequence[int], config: GateConfig, device: str,
             progress: bool) -> ConsumerSeams:
    return emulate_bioimageio_core(subject, raw, blocksize=config.core_blocksize, device=device,
                                   max_voxels=config.region_voxels)
