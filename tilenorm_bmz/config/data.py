"""Training data configs: input normalization, targets, split, synthetic sample and :class:`DataConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from ._base import StrictModel

__all__ = [
    "SAMPLE_NAMES",
    "DataConfig",
    "InputNormalization",
    "NormalizationMode",
    "SampleName",
    "SplitConfig",
    "SyntheticConfig",
    "TargetConfig",
]

NormalizationMode = Literal["global", "tilewise", "fixed"]
NormalizationChoice = Literal["model", "global", "tilewise", "none"]
"""What ``predict --normalization`` may ask for: as the model was trained, a mode with its quantiles, or none."""
NORMALIZATION_CHOICES: tuple[str, ...] = get_args(NormalizationChoice)
SampleName = Literal["nuclei2d", "nuclei3d", "synthetic"]
#: Values of ``DataConfig.sample``: the embedded real data sets and the synthetic generator.
SAMPLE_NAMES: tuple[str, ...] = get_args(SampleName)
_SAMPLE_DIMS = {"nuclei2d": 2, "nuclei3d": 3}


class InputNormalization(StrictModel):
    """Quantile normalization of the network input (the paper: global, quantiles 0.01 / 0.98, clipped).

    Per channel, ``y = (x - lo) / (hi - lo + eps)`` in float32, then clipped to [0, 1] when ``clip``:

    * ``global``: ``lo``, ``hi`` are the ``lower`` / ``upper`` quantiles of the whole image
      (``numpy.quantile(x, q, method="linear")``, numpy's default), computed once per image. For
      images with more than ``max_sample_voxels`` voxels per channel they are estimated from randomly
      chosen blocks (the generator is seeded with ``seed``, so the estimate is repeatable). This equals
      bioimage.io's per-sample ``scale_range`` with ``min_percentile = 100 * lower``,
      ``max_percentile = 100 * upper`` over the spatial axes, followed by ``clip`` to [0, 1].
    * ``tilewise``: the same quantiles computed on every tile on its own (one of the paper's compared
      settings; it makes outputs depend on the tile and so causes seams).
    * ``fixed``: ``lo = low``, ``hi = high``, one value per channel (or one value for all channels).

    The numeric side lives in :mod:`tilenorm_bmz.data.normalize`: :func:`~tilenorm_bmz.data.fit_normalization`
    returns a
    :class:`~tilenorm_bmz.data.normalize.FittedNormalization` whose ``apply`` normalizes arrays. A model
    stores the setting it was trained with as ``checkpoint.extra["input_normalization"] =
    model_dump(mode="json")``.
    """

    mode: NormalizationMode = "global"
    lower: float = 0.01
    """Lower quantile in [0, 1] (not a percentile)."""
    upper: float = 0.98
    """Upper quantile in [0, 1] (not a percentile)."""
    clip: bool = True
    low: list[float] | None = None
    """``mode="fixed"`` only: the value mapped to 0, per channel."""
    high: list[float] | None = None
    """``mode="fixed"`` only: the value mapped to 1, per channel."""
    eps: float = Field(1e-6, gt=0.0)
    """Added to ``hi - lo`` (bioimage.io ``scale_range`` uses the same 1e-6 by default)."""
    max_sample_voxels: int = Field(2**24, ge=1)
    """``global``: above this many voxels per channel the quantiles are estimated from random blocks."""
    seed: int = 0
    """Seed of the block sampling used for large images."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in ("lower", "upper"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                hint = f"; did you mean {v / 100:g}?" if 1.0 < v <= 100.0 else ""
                raise ValueError(
                    f"input_normalization.{name} is a quantile in [0, 1] (the paper uses lower=0.01, "
                    f"upper=0.98), not a percentile; got {v}{hint}"
                )
        if self.lower >= self.upper:
            raise ValueError(
                f"input_normalization.lower ({self.lower}) must be smaller than upper ({self.upper})"
            )
        if self.mode == "fixed":
            if self.low is None or self.high is None:
                raise ValueError(
                    "input_normalization mode 'fixed' needs low and high (one value per channel, e.g. "
                    "low: [100.0], high: [4000.0]); or use mode 'global'"
                )
            if len(self.low) != len(self.high) or not self.low:
                raise ValueError(
                    f"input_normalization low and high need the same number of values (one per channel); "
                    f"got {len(self.low)} and {len(self.high)}"
                )
            bad = [i for i, (lo, hi) in enumerate(zip(self.low, self.high, strict=True)) if not hi > lo]
            if bad:
                raise ValueError(
                    f"input_normalization high must be larger than low; not so for channel(s) {bad}"
                )
        elif self.low is not None or self.high is not None:
            raise ValueError(
                f"input_normalization low/high are only used by mode 'fixed'; remove them or set mode: fixed "
                f"(mode is {self.mode!r})"
            )
        return self

    @property
    def percentiles(self) -> tuple[float, float]:
        """``(100 * lower, 100 * upper)``: the bioimage.io ``scale_range`` percentiles."""
        return 100.0 * self.lower, 100.0 * self.upper


class TargetConfig(StrictModel):
    """Instance labels -> semantic targets (:func:`tilenorm_bmz.data.instances_to_targets`).

    Channels: ``foreground`` (object minus its boundary), ``boundary`` (inner boundary of every object,
    ``boundary_width`` voxels thick, so touching objects separate), and ``background`` as a last channel
    when ``background`` is true. Holes inside an object are filled per label first when ``fill_holes``.
    """

    boundary_width: int = Field(1, ge=1)
    background: bool = False
    fill_holes: bool = True

    @property
    def channel_names(self) -> list[str]:
        return ["foreground", "boundary"] + (["background"] if self.background else [])

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)


class SplitConfig(StrictModel):
    """Train/validation split: by ``image`` (the first ``fraction`` of the images train, the rest validate,
    in the order given) or by ``region`` (every image is cut along spatial ``axis``: the first ``fraction``
    trains, the rest validates; the paper splits one volume 70/30)."""

    by: Literal["image", "region"] = "region"
    fraction: float = 0.7
    axis: int = -1
    """Spatial axis the region split cuts (0 = z in 3D / y in 2D; -1 = x)."""

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(
                f"split.fraction is the training share, strictly between 0 and 1 (e.g. 0.7); got {v}"
            )
        return v


class SyntheticConfig(StrictModel):
    """The synthetic blob image used when ``DataConfig.sample`` is ``synthetic``
    (:func:`tilenorm_bmz.data.synthetic_blobs`). ``shape`` defaults to 4 tiles along every axis."""

    shape: tuple[int, ...] | None = None
    n_objects: int | None = Field(None, ge=1)
    gradient: float = Field(3.0, ge=0.0)
    """Brightness ratio - 1 between the two ends of the image (0: no gradient)."""
    seed: int = 0


class DataConfig(StrictModel):
    """Training data: image/label pairs (or an embedded sample), input normalization, targets, tiles, split.

    Either ``sample`` (``nuclei2d``, ``nuclei3d``: real data shipped with the package; ``synthetic``: blobs)
    or ``images`` with one instance label image per image in ``labels`` (TIFF, Zarr/OME-Zarr, .npy).
    Relative paths are relative to the folder of the config file (:meth:`resolve_paths`).
    """

    sample: SampleName | None = None
    images: list[Path] = []
    labels: list[Path] = []
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    input_normalization: InputNormalization = Field(default_factory=InputNormalization)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    tile_shape: tuple[int, ...]
    """Training tile, one size per spatial axis (z, y, x or y, x)."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    min_foreground: float = Field(0.0, ge=0.0, le=1.0)
    """Reject tiles whose fraction of object voxels is below this (0: accept all)."""
    max_tries: int = Field(20, ge=1)
    """Tiles drawn before giving up on ``min_foreground`` (the tile with most foreground is used)."""
    flips: bool = True
    """Flip every tile along each spatial axis with probability 0.5."""
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        dims = len(self.tile_shape)
        if dims not in (2, 3) or min(self.tile_shape) < 1:
            raise ValueError(
                f"data.tile_shape needs 2 (y, x) or 3 (z, y, x) positive sizes, e.g. [256, 256] or "
                f"[32, 64, 64]; got {list(self.tile_shape)}"
            )
        if self.sample is not None and (self.images or self.labels):
            raise ValueError(
                f"data: give either sample ({self.sample!r}) or images + labels, not both; remove one of them"
            )
        if self.sample is None:
            if not self.images:
                raise ValueError(
                    "data has no images: set sample to one of nuclei2d, nuclei3d, synthetic, or list "
                    "images and their instance labels"
                )
            if len(self.labels) != len(self.images):
                raise ValueError(
                    f"data.images has {len(self.images)} entries but data.labels has {len(self.labels)}: "
                    f"give one instance label image per image, in the same order"
                )
        want = _SAMPLE_DIMS.get(self.sample or "")
        if want is not None and dims != want:
            example = "[256, 256]" if want == 2 else "[32, 64, 64]"
            raise ValueError(
                f"sample {self.sample!r} is {want}D: data.tile_shape needs {want} sizes (e.g. {example}); "
                f"got {list(self.tile_shape)}"
            )
        synthetic_shape = self.synthetic.shape
        if self.sample == "synthetic" and synthetic_shape is not None and len(synthetic_shape) != dims:
            raise ValueError(
                f"data.synthetic.shape {list(synthetic_shape)} and data.tile_shape "
                f"{list(self.tile_shape)} must have the same number of axes"
            )
        if not -dims <= self.split.axis < dims:
            raise ValueError(
                f"data.split.axis must be a spatial axis in [-{dims}, {dims - 1}]; got {self.split.axis}"
            )
        if self.split.by == "image" and len(self.images) < 2:
            raise ValueError(
                "data.split.by 'image' needs at least 2 images (some train, the rest validate); with one "
                "image use split: {by: region, fraction: 0.7}"
            )
        return self

    @property
    def dims(self) -> int:
        """Spatial dimensionality (2 or 3), from ``tile_shape``."""
        return len(self.tile_shape)

    def resolve_paths(self, base_dir: str | os.PathLike[str]) -> DataConfig:
        """A copy with relative ``images``/``labels`` paths made absolute against ``base_dir``."""
        base = Path(base_dir)

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (base / p)

        return self.model_copy(
            update={"images": [fix(p) for p in self.images], "labels": [fix(p) for p in self.labels]}
        )
