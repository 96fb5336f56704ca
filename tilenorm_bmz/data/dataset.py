"""From a :class:`~tilenorm_bmz.config.DataConfig` to a training sampler and validation data.

:func:`build_training_data` is what the training loop calls: it opens the images and labels (or the
embedded sample / synthetic data), splits them by image or by region, fits the input normalization once
per image (on the whole image, as at inference), computes the targets once, and returns a
:class:`TrainingData` with the :class:`~tilenorm_bmz.data.sampler.TileSampler` for training and a list
of :class:`ValidationItem` (whole validation regions, for tiled prediction).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .io import Image, open_image, open_labels
from .labels import instances_to_targets
from .normalize import FittedNormalization, fit_normalization
from .sampler import Region, SamplerSource, TileSampler, split_by_image, split_by_region
from .samples import sample_path
from .synthetic import synthetic_blobs

__all__ = ["DataPair", "TrainingData", "ValidationItem", "build_training_data", "open_pairs"]

logger = logging.getLogger(__name__)


@dataclass
class DataPair:
    """An opened image (``(C, *spatial)``) and its instance labels (``spatial``)."""

    name: str
    image: Image
    labels: Image


@dataclass
class ValidationItem:
    """A validation region of one image: its raw pixels, normalization and targets.

    ``targets`` are ``(K, *region)`` (uint8); ``normalization`` is the one fitted on the whole image
    (``per_tile`` for tilewise normalization, which a tiled predictor must apply to every tile itself).
    """

    name: str
    image: Image
    region: Region
    normalization: FittedNormalization
    targets: np.ndarray = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(r.stop - r.start for r in self.region)

    def raw(self) -> np.ndarray:
        """The region's raw pixels ``(C, *region)``."""
        return self.image[(slice(None), *self.region)]

    def normalized(self) -> np.ndarray:
        """The region normalized as the whole image (``global``/``fixed``), float32 ``(C, *region)``.

        Raises ``ValueError`` for ``tilewise``: then every tile is normalized on its own, by the predictor.
        """
        if self.normalization.per_tile:
            raise ValueError(
                "tilewise input normalization has no whole-image normalization: apply "
                "ValidationItem.normalization.apply to every tile (raw()) inside the tiled prediction"
            )
        return self.normalization.apply(self.raw())


@dataclass
class TrainingData:
    """Everything the training loop needs from the data side."""

    config: DataConfig
    train: TileSampler
    validation: list[ValidationItem]
    channel_names: list[str]

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    @property
    def out_channels(self) -> int:
        return len(self.channel_names)

    @property
    def dims(self) -> int:
        return len(self.train.tile_shape)


def open_pairs(cfg: DataConfig, *, base_dir: str | os.PathLike[str] | None = None) -> list[DataPair]:
    """Open the image/label pairs a config names (files, an embedded sample, or synthetic data)."""
    if cfg.sample == "synthetic":
        s = cfg.synthetic
        shape = s.shape or tuple(4 * t for t in cfg.tile_shape)
        image, labels = synthetic_blobs(shape, n_objects=s.n_objects, gradient=s.gradient, seed=s.seed)
        return [
            DataPair(
                "synthetic",
                Image.from_array(image, "c" + "zyx"[3 - len(shape) :]),
                Image.from_array(labels, "zyx"[3 - len(shape) :], labels=True),
            )
        ]
    if cfg.sample is not None:
        ip, lp = sample_path(cfg.sample)
        return [DataPair(cfg.sample, open_image(ip), open_labels(lp))]
    c = cfg.resolve_paths(base_dir) if base_dir is not None else cfg
    pairs = []
    for ip, lp in zip(c.images, c.labels, strict=True):
        img, lab = open_image(ip), open_labels(lp)
        if img.spatial_shape != lab.spatial_shape:
            raise ValueError(
                f"{ip} has spatial shape {img.spatial_shape} (axes {img.axes!r}) but its labels {lp} have "
                f"{lab.spatial_shape}; every label image must match its image"
            )
        if img.spatial_ndim != cfg.dims:
            raise ValueError(
                f"{ip} is {img.spatial_ndim}D (shape {img.shape}, axes {img.axes!r}) but data.tile_shape "
                f"{list(cfg.tile_shape)} is {cfg.dims}D; give a tile size per spatial axis"
            )
        pairs.append(DataPair(Path(ip).name, img, lab))
    return pairs


def build_training_data(
    cfg: DataConfig,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    target_dtype: np.dtype | type = np.uint8,
    progress: bool = False,
) -> TrainingData:
    """Open, split, normalize and build the training sampler and the validation items for ``cfg``.

    ``base_dir`` resolves relative paths (the folder of the config file). Targets are computed on each
    whole label image once (so label images must fit in memory; images stay lazy) and shared by the
    sampler and the validation items.
    """
    pairs = open_pairs(cfg, base_dir=base_dir)
    norm = cfg.input_normalization
    tg = cfg.targets
    fitted = [fit_normalization(norm, p.image, progress=progress) for p in pairs]
    targets = [
        instances_to_targets(
            p.labels.read(),
            boundary_width=tg.boundary_width,
            background=tg.background,
            fill_holes=tg.fill_holes,
        )
        for p in pairs
    ]
    train_sources: list[SamplerSource] = []
    train_fitted: list[FittedNormalization] = []
    validation: list[ValidationItem] = []
    if cfg.split.by == "region":
        for p, f, t in zip(pairs, fitted, targets, strict=True):
            tr, va = split_by_region(p.image.spatial_shape, cfg.split.fraction, cfg.split.axis)
            train_sources.append(SamplerSource(p.image, p.labels, tr, p.name, targets=t))
            train_fitted.append(f)
            validation.append(ValidationItem(p.name, p.image, va, f, t[(slice(None), *va)]))
    else:
        idx_train, idx_val = split_by_image(list(range(len(pairs))), cfg.split.fraction)
        for i in idx_train:
            train_sources.append(
                SamplerSource(pairs[i].image, pairs[i].labels, None, pairs[i].name, targets=targets[i])
            )
            train_fitted.append(fitted[i])
        for i in idx_val:
            full = tuple(slice(0, s) for s in pairs[i].image.spatial_shape)
            validation.append(ValidationItem(pairs[i].name, pairs[i].image, full, fitted[i], targets[i]))
    sampler = TileSampler(
        train_sources,
        cfg.tile_shape,
        normalization=norm,
        boundary_width=tg.boundary_width,
        background=tg.background,
        fill_holes=tg.fill_holes,
        flips=cfg.flips,
        min_foreground=cfg.min_foreground,
        max_tries=cfg.max_tries,
        seed=cfg.seed,
        target_dtype=target_dtype,
        fitted=train_fitted,
    )
    n_train = sum(math.prod(r.stop - r.start for r in reg) for reg in sampler.regions)
    n_val = sum(math.prod(v.shape) for v in validation)
    logger.info(
        "training data: %d image(s), %d training voxels, %d validation voxels, normalization %s",
        len(pairs),
        n_train,
        n_val,
        norm.mode,
    )
    return TrainingData(cfg, sampler, validation, tg.channel_names)
