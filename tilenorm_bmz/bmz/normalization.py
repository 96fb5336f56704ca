"""Input normalization of a packaged model, expressed in bioimage.io preprocessing operations.

Two choices, both computed here exactly as bioimage.io.core computes them (so the test output written
into the package is what core reproduces):

``percentile``
    ``scale_range`` with the training quantiles (the paper: 1 and 98 percent) over the spatial axes of each
    sample and channel, then ``clip`` to [0, 1]. Core computes the percentiles on the whole sample before
    tiling (seamless); ilastik computes them per tile (tiles may differ).
``fixed``
    ``scale_linear`` with gain and offset from training-data statistics (the same quantiles, measured once),
    then ``clip`` to [0, 1]. Identical in every consumer and for every tile.

The model's recorded input normalization (``extra["input_normalization"]`` of a checkpoint, written by the
training loop) supplies the quantiles; fixed statistics come from ``extra["input_statistics"]``
(``{"low": [...], "high": [...]}``, one value per input channel) or, failing that, from the sample.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SCALE_RANGE_EPS", "PackageNormalization"]

logger = logging.getLogger(__name__)

#: ``eps`` of bioimage.io's ``scale_range`` (its default): ``(x - lo) / (hi - lo + eps)``.
SCALE_RANGE_EPS = 1e-6


class PackageNormalization(BaseModel):
    """How a package normalizes its raw input (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["percentile", "fixed"] = "percentile"
    lower: float = Field(0.01, ge=0.0, lt=1.0)
    """Lower quantile as a fraction (0.01 = 1st percentile)."""
    upper: float = Field(0.98, gt=0.01, le=1.0)
    clip: bool = True
    """Clip the normalized values to [0, 1]."""
    eps: float = Field(SCALE_RANGE_EPS, gt=0.0)
    """Added to ``hi - lo``: ``(x - lo) / (hi - lo + eps)``."""
    low: list[float] | None = None
    """``fixed``: per-channel value mapped to 0."""
    high: list[float] | None = None
    """``fixed``: per-channel value mapped to 1."""
    statistics_source: str | None = None
    """Where ``low``/``high`` came from (for the documentation)."""
    trained_with: str = "global"
    """The normalization setting the network was trained with (``global`` or ``tilewise``)."""

    @model_validator(mode="after")
    def _check(self) -> PackageNormalization:
        if self.lower >= self.upper:
            raise ValueError(f"lower quantile {self.lower} must be below upper quantile {self.upper}")
        if self.mode == "fixed":
            if self.low is None or self.high is None or len(self.low) != len(self.high) or not self.low:
                raise ValueError("fixed normalization needs per-channel low and high values of equal length")
            bad = [i for i, (lo, hi) in enumerate(zip(self.low, self.high, strict=True)) if not hi > lo]
            if bad:
                raise ValueError(f"fixed normalization: high must exceed low for channel(s) {bad}")
        return self

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_recorded(
        cls,
        recorded: Any,
        *,
        mode: Literal["percentile", "fixed"] = "percentile",
        statistics: Mapping[str, Sequence[float]] | None = None,
        sample: np.ndarray | None = None,
    ) -> PackageNormalization:
        """Build from a model's recorded input normalization.

        Parameters
        ----------
        recorded
            ``extra["input_normalization"]`` of a checkpoint: an ``InputNormalization`` or its dict, with
            ``lower``/``upper`` quantiles (fractions), ``clip`` and ``mode`` (``global``/``tilewise``).
            ``None``: the paper's default (0.01, 0.98, clipped, global).
        mode
            ``percentile`` or ``fixed``.
        statistics
            Training-data statistics for ``fixed``: ``{"low": [...], "high": [...]}`` per channel.
        sample
            Raw sample ``(C, *spatial)`` whose quantiles are used for ``fixed`` when ``statistics`` is None.
        """
        rec = _as_mapping(recorded)
        lower = float(rec.get("lower", 0.01))
        upper = float(rec.get("upper", 0.98))
        clip = bool(rec.get("clip", True))
        eps = float(rec.get("eps", SCALE_RANGE_EPS))
        trained_with = str(rec.get("mode", "global"))
        common = {"lower": lower, "upper": upper, "clip": clip, "eps": eps, "trained_with": trained_with}
        if trained_with == "tilewise":
            logger.warning(
                "the network was trained with tile-wise input normalization; bioimage.io has no such "
                "operation: the package normalizes each whole image (core) or each tile (ilastik)"
            )
        if trained_with == "fixed":
            if mode == "percentile":
                logger.warning(
                    "the network was trained with fixed input normalization; the package uses the same "
                    "fixed values (scale_linear), not percentiles"
                )
            return cls(mode="fixed", low=list(rec["low"]), high=list(rec["high"]),
                       statistics_source="the fixed values the network was trained with", **common)
        if mode == "percentile":
            return cls(mode=mode, **common)
        if statistics is not None:
            low = [float(v) for v in statistics["low"]]
            high = [float(v) for v in statistics["high"]]
            source = "training-data statistics recorded in the checkpoint"
        elif sample is not None:
            flat = np.asarray(sample, dtype=np.float32).reshape(sample.shape[0], -1)
            q = np.quantile(flat, [lower, upper], axis=1, method="linear")
            low, high = [float(v) for v in q[0]], [float(v) for v in q[1]]
            source = "quantiles of the sample image (no training-data statistics were recorded)"
            logger.warning(
                "--input-norm fixed: no training-data statistics in the checkpoint; using the %g/%g "
                "quantiles of the sample image", lower, upper,
            )
        else:
            raise ValueError("fixed input normalization needs training-data statistics or a sample image")
        if len(low) == 1 and sample is not None and sample.shape[0] > 1:
            low, high = low * sample.shape[0], high * sample.shape[0]
        return cls(mode=mode, low=low, high=high, statistics_source=source, **common)

    # -- numerics -----------------------------------------------------------------------------------
    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Normalize one raw sample ``(C, *spatial)`` exactly as bioimage.io.core's preprocessing does."""
        x = np.asarray(raw, dtype=np.float32)
        spatial = tuple(range(1, x.ndim))
        if self.mode == "percentile":
            lo = np.quantile(x, self.lower, axis=spatial, keepdims=True, method="linear")
            hi = np.quantile(x, self.upper, axis=spatial, keepdims=True, method="linear")
            y = (x - lo) / (hi - lo + np.float32(self.eps))
        else:
            gain, offset = self.gain_offset()
            shape = (-1,) + (1,) * len(spatial)
            y = x * np.asarray(gain).reshape(shape) + np.asarray(offset).reshape(shape)
        if self.clip:
            y = np.clip(y, 0.0, 1.0)
        return np.asarray(y, dtype=np.float32)

    def gain_offset(self) -> tuple[list[float], list[float]]:
        """``fixed``: per-channel gain and offset with ``x * gain + offset``: ``(x - low) / (high - low + eps)``."""
        if self.low is None or self.high is None:
            raise ValueError("gain_offset is defined for fixed normalization only")
        gain = [1.0 / (hi - lo + self.eps) for lo, hi in zip(self.low, self.high, strict=True)]
        offset = [-lo * g for lo, g in zip(self.low, gain, strict=True)]
        return gain, offset

    def as_input_normalization(self) -> dict[str, Any]:
        """The fields of :class:`tilenorm_bmz.config.InputNormalization` that reproduce this normalization.

        Recorded in ``config.tilenorm_bmz.input_normalization`` so that reading the package back
        (convert, calibrate, predict) normalizes exactly as the package does.
        """
        out: dict[str, Any] = {"lower": self.lower, "upper": self.upper, "clip": self.clip, "eps": self.eps}
        if self.mode == "fixed":
            out.update(mode="fixed", low=list(self.low or []), high=list(self.high or []))
        else:
            out["mode"] = "tilewise" if self.trained_with == "tilewise" else "global"
        return out

    def describe(self) -> str:
        """One sentence for the documentation."""
        lo, hi = f"{self.lower * 100:g}", f"{self.upper * 100:g}"
        clip = ", clipped to [0, 1]" if self.clip else ""
        if self.mode == "percentile":
            return (
                f"per-image percentile normalization: percentiles {lo} and {hi} of each image and channel are "
                f"mapped to 0 and 1 (`scale_range`){clip}"
            )
        pairs = ", ".join(f"[{a:.6g}, {b:.6g}]" for a, b in zip(self.low or [], self.high or [], strict=True))
        return (
            f"fixed normalization: the per-channel range {pairs} (percentiles {lo} and {hi} of "
            f"{self.statistics_source or 'the training data'}) is mapped to [0, 1] (`scale_linear`){clip}"
        )


def _as_mapping(recorded: Any) -> Mapping[str, Any]:
    if recorded is None:
        return {}
    if isinstance(recorded, Mapping):
        return recorded
    if isinstance(recorded, BaseModel):
        return recorded.model_dump(mode="json")
    raise TypeError(f"input normalization must be a mapping or a pydantic model, got {type(recorded).__name__}")
