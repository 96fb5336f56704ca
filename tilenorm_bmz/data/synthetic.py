"""Synthetic blob images with instance labels, for tests and the demo.

:func:`synthetic_blobs` draws ellipsoids (ellipses in 2D) of varying size and brightness at random
positions; where two overlap, each voxel goes to the blob whose normalized distance is smallest, so
neighbours touch along a shared face. The image is blurred (a point-spread function), multiplied by a
brightness ramp along the last axis (``gradient``), and noisy, so tiles from different places have
different intensity statistics: exactly the situation where tile-wise input normalization changes the
network's output from tile to tile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from .labels import clean_labels

__all__ = ["synthetic_blobs"]


def synthetic_blobs(
    shape: Sequence[int],
    *,
    n_objects: int | None = None,
    radius: tuple[float, float] | None = None,
    seed: int = 0,
    gradient: float = 3.0,
    noise: float = 0.03,
    background: float = 0.08,
    blur: float = 1.0,
    dtype: Literal["float32", "uint16"] = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """A blob image ``(1, *shape)`` and its instance labels ``shape``.

    Parameters
    ----------
    shape
        Spatial shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
    n_objects
        Number of blobs drawn; default: enough to cover about a quarter of the image.
    radius
        ``(min, max)`` mean radius of a blob in voxels; default ``(0.6 r, 1.4 r)`` with
        ``r = max(3, min(shape) / 12)``. Each axis of a blob gets its own radius within +-25 % of its mean.
    seed
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    gradient
        The image is multiplied by ``1 + gradient * x / (X - 1)`` along the last axis: the right end is
        ``1 + gradient`` times brighter than the left (0: no gradient).
    noise
        Standard deviation of additive Gaussian noise, relative to the unit blob brightness (scaled by the
        ramp too, so the signal-to-noise ratio is the same everywhere).
    background
        Background level before the ramp.
    blur
        Gaussian blur sigma in voxels (0: none).
    dtype
        ``float32`` (blob brightness 0.4..1 before the ramp) or ``uint16`` (the float image times 1000
        plus a camera offset of 100, rounded).

    Returns
    -------
    image, labels
        ``image`` ``(1, *shape)`` of ``dtype``; ``labels`` ``shape`` uint16 (uint32 beyond 65535 blobs),
        ids ``1..N`` with every id one face-connected piece.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"synthetic_blobs needs a 2D or 3D shape with every size >= 4; got {shape}")
    if dtype not in ("float32", "uint16"):
        raise ValueError(f"dtype must be 'float32' or 'uint16', got {dtype!r}")
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    if radius is None:
        r0 = max(3.0, min(shape) / 12.0)
        radius = (0.6 * r0, 1.4 * r0)
    r_min, r_max = float(radius[0]), float(radius[1])
    if not 0 < r_min <= r_max:
        raise ValueError(f"radius must be (min, max) with 0 < min <= max; got {radius}")
    if n_objects is None:
        r_mean = 0.5 * (r_min + r_max)
        unit_ball = math.pi if ndim == 2 else 4.0 / 3.0 * math.pi
        n_objects = max(1, round(0.25 * math.prod(shape) / (unit_ball * r_mean**ndim)))

    best = np.full(shape, np.inf, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint32)
    signal = np.zeros(shape, dtype=np.float32)
    for k in range(1, n_objects + 1):
        center = rng.uniform(0, shape)
        r = rng.uniform(r_min, r_max) * rng.uniform(0.75, 1.25, size=ndim)
        brightness = rng.uniform(0.4, 1.0)
        lo = np.maximum(np.floor(center - r).astype(int), 0)
        hi = np.minimum(np.ceil(center + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = np.ogrid[sl]
        d = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, center, r, strict=True)).astype(np.float32)
        inside = (d < 1.0) & (d < best[sl])
        best[sl][inside] = d[inside]
        labels[sl][inside] = k
        # slightly brighter towards the centre, like a nucleus
        signal[sl][inside] = brightness * (1.0 - 0.3 * d[inside])

    image = signal + np.float32(background)
    if blur > 0:
        image = ndi.gaussian_filter(image, blur).astype(np.float32)
    ramp_shape = (1,) * (ndim - 1) + (shape[-1],)
    ramp = (1.0 + gradient * np.linspace(0.0, 1.0, shape[-1], dtype=np.float32)).reshape(ramp_shape)
    image = image * ramp + rng.normal(0.0, noise, size=shape).astype(np.float32) * ramp
    labels = clean_labels(
        labels, fill_holes=False, connectivity=1, min_size=max(2, round(0.02 * r_min**ndim))
    )
    if int(labels.max(initial=0)) < 2**16:
        labels = labels.astype(np.uint16)
    if dtype == "uint16":
        out = np.clip(np.rint(image * 1000.0 + 100.0), 0, 65535).astype(np.uint16)
    else:
        out = image.astype(np.float32)
    return out[None], labels
