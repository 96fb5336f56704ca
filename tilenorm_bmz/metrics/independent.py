"""Dice on labelled images from another source than the training data (:mod:`tilenorm_bmz.data.independent`).

Each image is preprocessed as the model would be used (``preprocess``: its own input normalization fitted
on that whole image, or the package's pipeline), predicted tile by tile in eval mode, and scored per output
channel against the targets its labels give (``targets``: the training targets of instance labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .dice import dice

__all__ = ["IndependentScore", "independent_dice", "mean_dice", "object_diameter"]


class IndependentScore(BaseModel):
    """Dice per output channel on one independent image, with what the image was."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: list[int]
    dtype: str
    value_range: list[float]
    dice: list[float]
    objects: int = 0
    """Instances in the labels."""
    object_diameter: float | None = None
    """Median equivalent diameter of the instances in voxels (scale tells whether the model can see them)."""


def object_diameter(labels: np.ndarray) -> tuple[int, float | None]:
    """Number of instances and their median equivalent diameter (the disc's or ball's of the same size)."""
    ids, sizes = np.unique(np.asarray(labels), return_counts=True)
    sizes = sizes[ids != 0]
    if not sizes.size:
        return 0, None
    dims = np.asarray(labels).ndim
    d = 2 * np.sqrt(sizes / np.pi) if dims == 2 else np.cbrt(6 * sizes / np.pi)
    return int(sizes.size), float(np.median(d))


def independent_dice(
    predict: Callable[[np.ndarray], np.ndarray],
    images: Sequence[Any],
    *,
    preprocess: Callable[[np.ndarray], np.ndarray],
    targets: Callable[[np.ndarray, int], np.ndarray],
    threshold: float = 0.5,
) -> list[IndependentScore]:
    """Score ``predict(preprocess(raw))`` against ``targets(labels, output_channels)`` on every image.

    ``images`` are :class:`~tilenorm_bmz.data.independent.IndependentImage` (``name``, ``raw (C, *s)``,
    ``labels (*s)``); ``predict`` maps the network input ``(C, *s)`` to ``(C_out, *s)``.
    """
    out = []
    for im in images:
        raw = np.asarray(im.raw)
        pred = np.asarray(predict(preprocess(raw.astype(np.float32, copy=False))))
        want = targets(np.asarray(im.labels), pred.shape[0])
        if pred.shape != want.shape:
            raise ValueError(f"{im.name}: the prediction has shape {pred.shape} but its labels give targets "
                             f"{want.shape}; the model's outputs are not the training targets of instance labels")
        scores = dice(pred, want, threshold, channel_axis=0)
        n, diameter = object_diameter(im.labels)
        out.append(IndependentScore(
            name=im.name, shape=list(raw.shape[1:]), dtype=str(raw.dtype),
            value_range=[float(raw.min()), float(raw.max())], dice=[float(v) for v in scores],
            objects=n, object_diameter=diameter,
        ))
    return out


def mean_dice(scores: Sequence[IndependentScore]) -> list[float] | None:
    """Per-channel mean over the images (None without images)."""
    if not scores:
        return None
    return [float(v) for v in np.mean([s.dice for s in scores], axis=0)]
