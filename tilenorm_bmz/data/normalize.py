"""Quantile input normalization: the numeric side of :class:`tilenorm_bmz.config.InputNormalization`.

Definition (exactly what bioimage.io ``scale_range`` + ``clip`` compute per sample)::

    lo[c], hi[c] = numpy.quantile(x[c], [lower, upper], method="linear")     # over all spatial voxels
    y[c] = (float32(x[c]) - float32(lo[c])) / (float32(hi[c]) - float32(lo[c]) + eps)
    y = clip(y, 0, 1)                                                          # when clip

``method="linear"`` is numpy's default (type 7 of Hyndman and Fan) and what bioimageio.core uses for
sample quantiles, so a package with ``scale_range(min_percentile=100*lower, max_percentile=100*upper,
axes=spatial)`` reproduces the training normalization. Quantiles are computed from the stored values
(float64 interpolation for integer images); the subtraction and division run in float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import InputNormalization
from .io import Image, as_image

__all__ = [
    "FittedNormalization",
    "InputNormalization",
    "channel_quantiles",
    "dataset_quantiles",
    "fit_normalization",
    "normalize",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FittedNormalization:
    """Normalization ready to apply: per-channel ``lo``/``hi`` (``None`` for ``tilewise``: per tile).

    ``apply(x)`` takes ``x`` of shape ``(C, *spatial)`` (any real dtype) and returns float32 of the same
    shape. ``lo``/``hi`` are float64 arrays of shape ``(C,)``; ``estimated`` says whether they come from a
    random sample of blocks rather than every voxel.
    """

    settings: InputNormalization
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    estimated: bool = False
    sampled_voxels: int = 0

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def per_tile(self) -> bool:
        """True when every tile is normalized with its own quantiles (``tilewise``)."""
        return self.settings.mode == "tilewise"

    @property
    def n_channels(self) -> int | None:
        return None if self.lo is None else int(self.lo.shape[0])

    def apply(self, x: Any) -> np.ndarray:
        """Normalize ``x`` (``(C, *spatial)``) to float32; ``tilewise`` uses the quantiles of ``x`` itself."""
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"normalization expects (C, *spatial), got shape {x.shape}")
        s = self.settings
        if self.per_tile:
            lo, hi = channel_quantiles(x, s.lower, s.upper)
        else:
            assert self.lo is not None and self.hi is not None
            lo, hi = self.lo, self.hi
            if x.shape[0] != lo.shape[0]:
                raise ValueError(
                    f"normalization was fitted for {lo.shape[0]} channel(s) but the array has {x.shape[0]} "
                    f"(shape {x.shape}); arrays are (C, *spatial)"
                )
        return normalize(x, lo, hi, eps=s.eps, clip=s.clip)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the settings plus the fitted ``lo``/``hi`` (store next to a model)."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "lo": None if self.lo is None else [float(v) for v in self.lo],
            "hi": None if self.hi is None else [float(v) for v in self.hi],
            "estimated": self.estimated,
            "sampled_voxels": int(self.sampled_voxels),
        }


def normalize(
    x: Any,
    lo: Sequence[float] | np.ndarray,
    hi: Sequence[float] | np.ndarray,
    *,
    eps: float = 1e-6,
    clip: bool = True,
) -> np.ndarray:
    """``(x - lo) / (hi - lo + eps)`` per channel (axis 0) in float32, clipped to [0, 1] when ``clip``."""
    x = np.asarray(x, dtype=np.float32)
    shape = (-1,) + (1,) * (x.ndim - 1)
    lo32 = np.asarray(lo, dtype=np.float32).reshape(shape)
    hi32 = np.asarray(hi, dtype=np.float32).reshape(shape)
    y = (x - lo32) / (hi32 - lo32 + np.float32(eps))
    if clip:
        np.clip(y, 0.0, 1.0, out=y)
    return y.astype(np.float32, copy=False)


def channel_quantiles(x: Any, lower: float, upper: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``lower``/``upper`` quantiles of ``x`` (``(C, *spatial)``), numpy ``method="linear"``."""
    x = np.asarray(x)
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        raise ValueError(f"cannot compute quantiles of an empty array (shape {x.shape})")
    q = np.quantile(flat, [lower, upper], axis=1, method="linear")
    return np.asarray(q[0], dtype=np.float64), np.asarray(q[1], dtype=np.float64)


def _block_shape(image: Image) -> tuple[int, ...]:
    chunks = image.chunks
    spatial = image.spatial_shape
    default = 32 if len(spatial) == 3 else 128
    if chunks is not None:
        # whole storage chunks are the cheapest unit to read; grow tiny chunks (e.g. TIFF strips) a bit
        blk = [max(c, min(s, default // 4)) for c, s in zip(chunks[1:], spatial, strict=True)]
    else:
        blk = [min(s, default) for s in spatial]
    return tuple(blk)


def _sampled_quantiles(
    image: Image, lower: float, upper: float, max_voxels: int, seed: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantiles from randomly chosen, non-overlapping blocks (aligned to a block grid) of ``image``."""
    data = _sample_blocks(image, max_voxels, seed, progress)
    lo, hi = channel_quantiles(data, lower, upper)
    return lo, hi, int(data.shape[1])


def _sample_blocks(image: Image, max_voxels: int, seed: int, progress: bool) -> np.ndarray:
    """About ``max_voxels`` voxels per channel ``(C, N)`` from randomly chosen, non-overlapping blocks."""
    spatial = image.spatial_shape
    blk = _block_shape(image)
    grid = [math.ceil(s / b) for s, b in zip(spatial, blk, strict=True)]
    n_blocks_total = math.prod(grid)
    block_voxels = math.prod(blk)
    n = min(n_blocks_total, max(1, math.ceil(max_voxels / block_voxels)))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n_blocks_total, size=n, replace=False)
    chosen.sort()  # read in storage order
    parts: list[np.ndarray] = []
    from ..progress import track

    for flat_index in track(chosen, "sampling blocks for normalization", progress):
        pos = np.unravel_index(int(flat_index), grid)
        sl = tuple(slice(p * b, min((p + 1) * b, s)) for p, b, s in zip(pos, blk, spatial, strict=True))
        block = image[(slice(None), *sl)]
        parts.append(block.reshape(block.shape[0], -1))
    return np.concatenate(parts, axis=1)


def dataset_quantiles(
    images: Sequence[Image | np.ndarray | Any], lower: float, upper: float, *, max_voxels: int = 2**24,
    seed: int = 0, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel ``lower``/``upper`` quantiles of a whole dataset: the voxels of all ``images`` pooled (each
    image read whole when its share of ``max_voxels`` covers it, else sampled block by block, out of core).

    Returns ``(lo, hi, n)`` with ``n`` the voxels per channel the quantiles were computed from.
    """
    imgs = [as_image(im) for im in images]
    if not imgs:
        raise ValueError("no images to fit the normalization on")
    channels = {im.n_channels for im in imgs}
    if len(channels) != 1:
        raise ValueError(f"the images have different channel counts {sorted(channels)}: fit them separately")
    share = max(1, max_voxels // len(imgs))
    parts = []
    for i, im in enumerate(imgs):
        if math.prod(im.spatial_shape) <= share:
            parts.append(np.asarray(im[...]).reshape(im.n_channels, -1))
        else:
            parts.append(_sample_blocks(im, share, seed + i, progress))
    data = np.concatenate(parts, axis=1)
    lo, hi = channel_quantiles(data, lower, upper)
    return lo, hi, int(data.shape[1])


def fit_normalization(
    settings: InputNormalization, image: Image | np.ndarray | Any, *, progress: bool = False
) -> FittedNormalization:
    """Fit ``settings`` to ``image`` (an :class:`~tilenorm_bmz.data.io.Image` or an array ``(C, *spatial)``).

    * ``global``: exact quantiles when the image has at most ``settings.max_sample_voxels`` voxels per
      channel (read one channel at a time); otherwise quantiles of randomly chosen blocks totalling about
      ``max_sample_voxels`` voxels, seeded by ``settings.seed`` (``estimated=True``).
    * ``tilewise``: nothing to fit; ``apply`` computes the quantiles of each array it is given.
    * ``fixed``: ``low``/``high`` (one value is used for every channel).
    """
    if settings.mode == "tilewise":
        return FittedNormalization(settings)
    img = as_image(image)  # arrays and lazy array-likes (Zarr, dask) are wrapped without loading
    n_ch = img.n_channels
    if settings.mode == "fixed":
        assert settings.low is not None and settings.high is not None
        if len(settings.low) not in (1, n_ch):
            raise ValueError(
                f"input_normalization low/high have {len(settings.low)} values but the image has {n_ch} "
                f"channels; give one value per channel (or one for all)"
            )
        lo = np.broadcast_to(np.asarray(settings.low, np.float64), (n_ch,)).copy()
        hi = np.broadcast_to(np.asarray(settings.high, np.float64), (n_ch,)).copy()
        return FittedNormalization(settings, lo, hi)
    spatial_voxels = math.prod(img.spatial_shape)
    if spatial_voxels <= settings.max_sample_voxels:
        los, his = [], []
        for c in range(n_ch):
            lo_c, hi_c = channel_quantiles(img[c : c + 1], settings.lower, settings.upper)
            los.append(lo_c[0])
            his.append(hi_c[0])
        fitted = FittedNormalization(settings, np.array(los), np.array(his), sampled_voxels=spatial_voxels)
    else:
        lo, hi, n = _sampled_quantiles(
            img, settings.lower, settings.upper, settings.max_sample_voxels, settings.seed, progress
        )
        logger.info(
            "%s: normalization quantiles estimated from %d of %d voxels per channel",
            img.path or "image",
            n,
            spatial_voxels,
        )
        fitted = FittedNormalization(settings, lo, hi, estimated=True, sampled_voxels=n)
    if np.any(fitted.hi - fitted.lo <= 0):  # type: ignore[operator]
        logger.warning(
            "%s: quantiles %s..%s are equal for some channel (lo=%s, hi=%s): the normalized image is flat",
            img.path or "image",
            settings.lower,
            settings.upper,
            fitted.lo,
            fitted.hi,
        )
    return fitted
