"""Pydantic configuration models: the single source of truth for every run.

Every model is strict (``extra="forbid"``, assignments validated) and round-trips through YAML:
``Model.from_yaml(path)`` reads what ``model.to_yaml(path)`` wrote, and
``Model.model_validate(m.model_dump(mode="json")) == m`` holds for every config (tested).
Validators encode the rules of the network (sizes divisible by the pooling factors, ...) and their
messages say what to change.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # the numeric side of InputNormalization; imported lazily at call time (no cycle)
    from .data.normalize import FittedNormalization

__all__ = [
    "GATE_CHECKS",
    "GATE_CONSUMERS",
    "NORM_KINDS",
    "SAMPLE_NAMES",
    "WEIGHT_FORMATS",
    "CitationConfig",
    "DataConfig",
    "ExportConfig",
    "GateCheck",
    "GateConfig",
    "GateConsumer",
    "InputNormalization",
    "MaintainerConfig",
    "NormConfig",
    "NormKind",
    "NormalizationMode",
    "PersonConfig",
    "RenormSchedule",
    "SplitConfig",
    "StrictModel",
    "SyntheticConfig",
    "TargetConfig",
    "TrainConfig",
    "UNetConfig",
    "WeightFormat",
    "atomic_write_text",
]

NormKind = Literal["batchrenorm", "batchnorm", "instancenorm", "groupnorm", "none"]
#: The normalization kinds a :class:`UNetConfig` may name. These names keep their meaning forever.
NORM_KINDS: tuple[str, ...] = ("batchrenorm", "batchnorm", "instancenorm", "groupnorm", "none")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_halo(v: int | list[int] | None) -> int | list[int] | None:
    """A halo override: one non-negative int, or one per spatial axis (2 or 3)."""
    values = [v] if isinstance(v, int) else (v or [])
    if any(h < 0 for h in values):
        raise ValueError(f"halo must be >= 0, got {v}")
    if isinstance(v, list) and len(v) not in (2, 3):
        raise ValueError(f"halo needs one value or one per spatial axis (2 or 3), got {len(v)}")
    return v


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated, YAML round-trips."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialize to YAML (``model_dump(mode="json")``); also write it atomically when ``path`` is given."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike[str]) -> Self:
        """Load from a YAML file (or YAML text) and validate."""
        p = Path(path_or_text) if not (isinstance(path_or_text, str) and "\n" in path_or_text) else None
        if p is not None:
            if not p.exists():
                raise FileNotFoundError(f"config file {p} does not exist")
            text = p.read_text(encoding="utf-8")
        else:
            text = str(path_or_text)
        data = yaml.safe_load(text)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)


class NormConfig(StrictModel):
    """Feature normalization of a network.

    ``kind`` is one of ``batchrenorm``, ``batchnorm``, ``instancenorm``, ``groupnorm``, ``none``.
    ``groups`` is only used by ``groupnorm`` (capped at the channel count, and reduced to a divisor of it).
    ``momentum`` follows PyTorch's convention (the paper uses 0.01).
    """

    kind: NormKind = "batchrenorm"
    """batchrenorm | batchnorm | instancenorm | groupnorm | none."""
    momentum: float = Field(0.01, gt=0.0, le=1.0)
    """Running-statistics momentum (PyTorch convention; the paper: 0.01)."""
    eps: float = Field(1e-5, gt=0.0)
    groups: int = Field(8, ge=1)
    """Groups of groupnorm (capped at, and made a divisor of, the channel count)."""


PoolFactor = tuple[int, ...]


class UNetConfig(StrictModel):
    """Architecture of a :class:`tilenorm_bmz.models.UNet` (the keyword arguments of its constructor).

    ``features`` is the channel count of the first level (doubled at every downsampling) or the explicit
    list of ``depth + 1`` channel counts. ``pool_factors`` has one entry per downsampling, each an int or
    a per-axis tuple (e.g. ``(1, 2, 2)`` for stacks with few z slices); ``None`` means 2 on every axis.
    """

    dims: Literal[2, 3] = 3
    """Spatial dimensions."""
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(2, ge=1)
    """One per target channel (foreground, boundary[, background])."""
    depth: int = Field(2, ge=0, le=6)
    """Number of downsamplings (the paper: 2)."""
    features: int | list[int] = 32
    """Channels of the first level, doubled per level (32 -> 32/64/128), or a list of depth + 1 counts."""
    norm: NormConfig = Field(default_factory=NormConfig)
    pool_factors: list[PoolFactor] | None = None
    """One pooling factor per downsampling (int or per-axis list such as [1, 2, 2]); null: 2 everywhere."""
    final_activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"

    @field_validator("norm", mode="before")
    @classmethod
    def _norm_from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in NORM_KINDS:
                raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}; got {v!r}")
            return {"kind": v}
        return v

    @field_validator("pool_factors", mode="before")
    @classmethod
    def _pool_from_ints(cls, v: Any) -> Any:
        if v is None:
            return v
        return [tuple(f) if isinstance(f, list | tuple) else (f,) for f in v]

    @model_validator(mode="after")
    def _check(self) -> Self:
        if isinstance(self.features, list):
            if len(self.features) != self.depth + 1:
                raise ValueError(
                    f"features has {len(self.features)} entries but depth={self.depth} needs depth + 1 = "
                    f"{self.depth + 1} (one per level); or give a single int that is doubled per level"
                )
            if any(f < 1 for f in self.features):
                raise ValueError("every entry of features must be >= 1")
        elif self.features < 1:
            raise ValueError("features must be >= 1")
        if self.pool_factors is not None:
            if len(self.pool_factors) != self.depth:
                raise ValueError(
                    f"pool_factors has {len(self.pool_factors)} entries but depth={self.depth}: give one "
                    f"factor (int or a tuple of {self.dims}) per downsampling"
                )
            fixed: list[PoolFactor] = []
            for f in self.pool_factors:
                t = tuple(f)
                if len(t) == 1:
                    t = t * self.dims
                if len(t) != self.dims or any(int(x) < 1 for x in t):
                    raise ValueError(
                        f"pool factor {f} must be a positive int or a tuple of {self.dims} positive ints"
                    )
                fixed.append(tuple(int(x) for x in t))
            object.__setattr__(self, "pool_factors", fixed)
        return self

    @property
    def level_features(self) -> list[int]:
        """Channel count per level (``depth + 1`` entries)."""
        if isinstance(self.features, list):
            return list(self.features)
        return [self.features * 2**i for i in range(self.depth + 1)]

    @property
    def resolved_pool_factors(self) -> list[PoolFactor]:
        if self.pool_factors is None:
            return [(2,) * self.dims for _ in range(self.depth)]
        return list(self.pool_factors)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Input sizes must be multiples of this, per spatial axis (product of the pooling factors)."""
        return tuple(math.prod(f[a] for f in self.resolved_pool_factors) for a in range(self.dims))


class RenormSchedule(StrictModel):
    """BatchRenorm clipping schedule driven by the trainer's global step (Ioffe 2017; the paper's setting).

    For ``step < warmup_steps`` the limits are ``r_max = 1, d_max = 0`` (plain BatchNorm training), then
    both rise linearly to ``r_max``, ``d_max`` over ``ramp_steps`` steps and stay there. With momentum 0.01
    the running statistics need about 500 steps to settle, so the warm-up should be at least that long.
    """

    warmup_steps: int = Field(5000, ge=0)
    ramp_steps: int = Field(1000, ge=0)
    r_max: float = Field(3.0, ge=1.0)
    d_max: float = Field(5.0, ge=0.0)

    def limits(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` at global step ``step``."""
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.ramp_steps == 0:
            return float(self.r_max), float(self.d_max)
        t = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def apply(self, model: Any, step: int) -> tuple[float, float]:
        """Set the limits for ``step`` on every BatchRenorm layer of ``model``; returns them.

        Any module with a ``set_renorm_limits(r_max, d_max)`` method is updated (that is the BatchRenorm
        protocol), so the schedule does not depend on the layer implementation.
        """
        r_max, d_max = self.limits(step)
        for m in model.modules():
            setter = getattr(m, "set_renorm_limits", None)
            if callable(setter):
                setter(r_max, d_max)
        return r_max, d_max


# -- bioimage.io export ---------------------------------------------------------------------------------
WeightFormat = Literal["pytorch_state_dict", "torchscript", "onnx"]
#: Weight formats ``tilenorm-bmz package`` can write (torchscript is what deepImageJ and ilastik run).
WEIGHT_FORMATS: tuple[str, ...] = ("pytorch_state_dict", "torchscript", "onnx")


class PersonConfig(StrictModel):
    """An author of a packaged model.

    There is deliberately no ``github_user``: bioimage.io validates it online (api.github.com), which
    fails offline and leaks network traffic from an otherwise offline export.
    """

    name: str = Field(min_length=1)
    affiliation: str | None = None
    email: str | None = None
    orcid: str | None = Field(None, pattern=r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")

    @field_validator("name")
    @classmethod
    def _no_slash(cls, v: str) -> str:
        if "/" in v or "\\" in v:
            raise ValueError(f"author name {v!r} must not contain '/' or '\\' (bioimage.io rule)")
        return v


class MaintainerConfig(StrictModel):
    """A maintainer of a packaged model. bioimage.io identifies maintainers by GitHub user name, which
    its validation checks online: packages with maintainers cannot be tested offline."""

    github_user: str = Field(min_length=1)
    name: str | None = None
    affiliation: str | None = None
    email: str | None = None
    orcid: str | None = Field(None, pattern=r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")


class CitationConfig(StrictModel):
    """A reference to cite; at least one of ``doi`` and ``url``. Prefer a DOI: bioimage.io's validation
    sends a request to every ``url``, so a package citing URLs is not tested fully offline."""

    text: str = Field(min_length=1)
    doi: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _doi_or_url(self) -> Self:
        if not self.doi and not self.url:
            raise ValueError(f"citation {self.text!r} needs a doi or a url")
        return self


class ExportConfig(StrictModel):
    """Metadata and options of a bioimage.io package written by ``tilenorm-bmz package``.

    ``name``, ``authors`` and ``license`` are what bioimage.io shows; the tiling-artifacts paper
    (arXiv 2503.19545) and Batch Renormalization (arXiv 1702.03275) are always cited in addition to
    ``citations``. ``documentation`` replaces the generated README (it should keep a ``# Validation``
    section); ``covers`` replace the generated input | prediction cover. ``input_norm``:
    ``percentile`` writes per-image percentile ``scale_range`` + clip (as the network was trained with
    global normalization); ``fixed`` writes ``scale_linear`` + clip from training-data statistics, which
    keeps ilastik (it preprocesses every tile on its own) tile-consistent. ``halo`` overrides the halo
    derived from the receptive field (one int, or one per spatial axis z, y, x). ``legacy`` writes the
    package in a format that ilastik's bioimage.io stack (core 0.10 / spec 0.5.9) and deepImageJ read.
    """

    name: str | None = Field(None, min_length=5, max_length=128, pattern=r"^[A-Za-z0-9_+\- ()]+$")
    description: str | None = Field(None, max_length=1024)
    authors: list[PersonConfig] = []
    maintainers: list[MaintainerConfig] = []
    license: str = "MIT"
    tags: list[str] = []
    version: str = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+([-+].+)?$")
    citations: list[CitationConfig] = []
    training_data: str | None = None
    """Free-text description of the training data (what, where from, how many images)."""
    input_channel_names: list[str] | None = None
    output_channel_names: list[str] | None = None
    documentation: Path | None = None
    covers: list[Path] = []
    weight_formats: list[WeightFormat] = ["pytorch_state_dict", "torchscript"]
    input_norm: Literal["percentile", "fixed"] = "percentile"
    halo: int | list[int] | None = None
    legacy: bool = True

    @field_validator("weight_formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"weight_formats must name at least one of {', '.join(WEIGHT_FORMATS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"weight_formats has duplicates: {v}")
        return v

    @field_validator("halo")
    @classmethod
    def _halo(cls, v: int | list[int] | None) -> int | list[int] | None:
        return _check_halo(v)


# -- data -----------------------------------------------------------------------------------------------
NormalizationMode = Literal["global", "tilewise", "fixed"]
SampleName = Literal["nuclei2d", "nuclei3d", "synthetic"]
#: Values of ``DataConfig.sample``: the embedded real data sets and the synthetic generator.
SAMPLE_NAMES: tuple[str, ...] = ("nuclei2d", "nuclei3d", "synthetic")
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

    The numeric side lives in :mod:`tilenorm_bmz.data.normalize`: :meth:`fit` returns a
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

    def fit(self, image: Any, *, progress: bool = False) -> FittedNormalization:
        """Per-channel ``lo``/``hi`` of ``image`` (an ``Image`` or an array ``(C, *spatial)``).

        See :func:`tilenorm_bmz.data.normalize.fit_normalization`; for ``tilewise`` nothing is computed
        here and ``apply`` computes the quantiles of every tile it is given.
        """
        from .data.normalize import fit_normalization  # call-time import: config does not depend on data

        return fit_normalization(self, image, progress=progress)


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


class TrainConfig(StrictModel):
    """A training run: network, data, optimizer and the BatchRenorm schedule (``tilenorm-bmz train``).

    One ``steps`` is one optimizer step, made of ``grad_accumulation`` forward/backward passes of
    ``batch_size`` tiles each (the paper: batch 1, accumulation 8). The BatchRenorm schedule is driven by
    this global step. The same config trains every norm kind (``model.norm``), so they can be compared.
    """

    model: UNetConfig | None = None
    """The network; may be omitted only when fine-tuning an existing model (``convert --finetune``)."""
    data: DataConfig
    schedule: RenormSchedule = Field(default_factory=RenormSchedule)
    """BatchRenorm clipping schedule: r_max = 1, d_max = 0 for warmup_steps, then a linear ramp."""
    steps: int = Field(6000, ge=1)
    """Number of optimizer steps."""
    batch_size: int = Field(1, ge=1)
    """Tiles per forward pass (the batch the normalization layers see)."""
    grad_accumulation: int = Field(8, ge=1)
    """Forward/backward passes per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    """Adam learning rate."""
    weight_decay: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision on CUDA (BatchRenorm statistics stay float32)."""
    validate_every: int = Field(500, ge=1)
    """Validate (tiled Dice in eval mode, train/eval disparity) every this many steps, and at the end."""
    checkpoint_every: int = Field(500, ge=1)
    """Write ``last.pt`` every this many steps (and at the end, and on Ctrl-C)."""
    val_tile_shape: tuple[int, ...] | None = None
    """Tile of the validation prediction; default: the training tile enlarged to cover the halo well."""
    val_batch_size: int = Field(2, ge=1)
    disparity_tiles: int = Field(4, ge=0)
    """Validation tiles for the train/eval disparity probe (0 to skip)."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Binarization threshold of predictions for Dice."""
    seed: int = Field(0, ge=0)
    """Seeds the network initialization (the data has its own seed)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.model is None:
            return self
        m, d = self.model, self.data
        if m.dims != d.dims:
            raise ValueError(
                f"model.dims is {m.dims} but data.tile_shape {list(d.tile_shape)} is {d.dims}D; make them agree"
            )
        bad = [f"{t} (axis {a})" for a, (t, q) in enumerate(zip(d.tile_shape, m.divisor, strict=True)) if t % q]
        if bad:
            fixed = [max(q, round(t / q) * q) for t, q in zip(d.tile_shape, m.divisor, strict=True)]
            raise ValueError(
                f"data.tile_shape {list(d.tile_shape)} is not a multiple of the network's divisor "
                f"{list(m.divisor)} (product of the pooling factors) at {', '.join(bad)}; use e.g. {fixed}"
            )
        if self.val_tile_shape is not None:
            if len(self.val_tile_shape) != m.dims:
                raise ValueError(f"val_tile_shape needs {m.dims} sizes, got {list(self.val_tile_shape)}")
            if any(t % q for t, q in zip(self.val_tile_shape, m.divisor, strict=True)):
                raise ValueError(
                    f"val_tile_shape {list(self.val_tile_shape)} must be a multiple of the divisor {list(m.divisor)}"
                )
        n_targets = d.targets.n_channels
        if m.out_channels != n_targets:
            raise ValueError(
                f"model.out_channels is {m.out_channels} but the targets have {n_targets} channels "
                f"({', '.join(d.targets.channel_names)}); set model.out_channels: {n_targets}"
            )
        if m.final_activation == "softmax" and not d.targets.background:
            raise ValueError(
                "final_activation softmax needs mutually exclusive classes: set data.targets.background: true "
                "(foreground, boundary, background), or use sigmoid"
            )
        return self

    def advice(self) -> list[str]:
        """Warnings about settings that are valid but probably not what the user wants."""
        out: list[str] = []
        kind = self.model.norm.kind if self.model is not None else None
        if kind == "batchnorm" and self.batch_size < 8:
            out.append(
                f"batchnorm with batch_size {self.batch_size}: running statistics will disagree with the batch "
                "statistics the network trains with (train/eval disparity); use norm batchrenorm"
            )
        if kind in ("instancenorm", "groupnorm"):
            out.append(
                f"{kind} normalizes every tile on its own, so tiled predictions will show seams; use batchrenorm"
            )
        if kind == "batchrenorm" and self.schedule.warmup_steps < 500 <= self.steps:
            out.append(
                f"schedule.warmup_steps is {self.schedule.warmup_steps}: with momentum 0.01 the running "
                "statistics need about 500 steps to settle before r_max/d_max ramp up"
            )
        if kind == "batchrenorm" and self.schedule.warmup_steps >= self.steps:
            out.append(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) >= steps ({self.steps}): the run never "
                "leaves the plain-BatchNorm phase"
            )
        if self.data.input_normalization.mode == "tilewise":
            out.append("tilewise input normalization makes predictions depend on the tile (seams); the paper "
                       "compares it, use global for models you share")
        return out


# -- validation gate --------------------------------------------------------------------------------------
GateCheck = Literal["bioimageio", "tile_mismatch", "disparity", "tiled_vs_whole", "consumers", "halo", "sweep",
                    "dice"]
#: The checks of the validation gate, in the order they run (``GateConfig.checks``).
GATE_CHECKS: tuple[str, ...] = ("bioimageio", "tile_mismatch", "disparity", "tiled_vs_whole", "consumers", "halo",
                                "sweep", "dice")
GateConsumer = Literal["tilenorm-bmz", "bioimageio.core", "ilastik"]
#: Predictors the gate emulates when it measures seams (``GateConfig.gating_consumers``).
GATE_CONSUMERS: tuple[str, ...] = ("tilenorm-bmz", "bioimageio.core", "ilastik")


class GateConfig(StrictModel):
    """Thresholds and settings of the validation gate (``tilenorm-bmz validate``; ``package`` runs it too).

    A model is accepted when no check fails. The defaults are the project's acceptance rule: the bioimage.io
    test passes, two overlapping tiles agree (``max_dist <= 1e-4``: seamless up to float rounding), train/eval
    disparity is at most 0.05 per channel, and the declared halo covers the measured receptive field. Seams
    (tiled vs whole image) decide for the consumers in ``gating_consumers``; the others are measured and
    reported (ilastik by default: it normalizes every tile on its own and re-centres border tiles, so a
    package can be exact in bioimageio.core and still differ slightly in ilastik).

    The consumer emulations, the tiled-vs-whole comparison and the tile-size sweep each run on the central
    region of every image that holds two of their tiles per axis (at most ``region_voxels`` voxels; for
    packages a valid whole-sample size for bioimageio.core), and tile mismatch measures ``max_crops`` crops, so
    the gate's cost does not grow with the volume beyond the disparity tiles and the preprocessing.
    """

    checks: list[GateCheck] = list(GATE_CHECKS)  # type: ignore[arg-type]
    """Checks to run: bioimageio, tile_mismatch, disparity, tiled_vs_whole, consumers, halo, sweep, dice."""
    require_bioimageio_test: bool = True
    """The bioimage.io format validation and model test must pass (packages; False: report only)."""
    max_dist: float = Field(1e-4, ge=0.0)
    """Tile mismatch: largest |O1 - O2| in the valid overlap of two tiles."""
    max_disparity: float = Field(0.05, ge=0.0, le=1.0)
    """Train/eval disparity: largest ``1 - Dice(P_train, P_eval)`` of any channel."""
    max_seam: float = Field(1e-4, ge=0.0)
    """Tiled vs whole image, per consumer: largest |tiled - whole|."""
    require_sufficient_halo: bool = True
    """The declared halo must be at least the one-sided receptive field (False: report only)."""
    gating_consumers: list[GateConsumer] = ["tilenorm-bmz", "bioimageio.core"]
    """Consumers whose seams decide (tilenorm-bmz, bioimageio.core, ilastik); the others are reported."""
    max_sweep_range: float | None = Field(None, ge=0.0)
    """Largest spread of the sweep score over tile sizes (None: the sweep is informational)."""
    min_dice: float | None = Field(None, ge=0.0, le=1.0)
    """Smallest Dice against the labels of any channel (None: Dice is informational)."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Binarization threshold of predictions (Dice, mismatch, disparity)."""
    crop_shape: list[int] | None = None
    """Tile mismatch crop (default: the paper's 192x192x288 / 192x288, scaled down to fit the image)."""
    stride: int = Field(64, ge=1)
    """Tile mismatch crop grid stride."""
    tile: int | None = Field(None, ge=1)
    """Tile mismatch tile length along the long axis (default 192)."""
    offset: int | None = Field(None, ge=1)
    """Tile mismatch offset of the second tile (default tile / 2)."""
    max_crops: int | None = Field(2, ge=1)
    """Tile mismatch crops measured per image, evenly spread over the grid (None: all)."""
    disparity_tiles: int = Field(4, ge=1)
    """Tiles sampled per image for the train/eval disparity."""
    disparity_tile: int | None = Field(None, ge=1)
    """Disparity tile edge (default: 192 in 2D, 64 in 3D, the training tiles of the paper; clipped to the image)."""
    disparity_batch_size: int = Field(1, ge=1)
    """Tiles per train-mode forward pass (part of what is measured: 1 = batch-1 training)."""
    sweep_sizes: list[int] | None = None
    """Tile edges of the tile-size sweep, e.g. the paper's [64, 96, 128, 192, 256] (default: tiles giving 1 to 4
    (2D) / 1 to 2 (3D) tiles per axis of the sweep region, which is two seam-test tiles wide)."""
    region_voxels: int = Field(2**22, ge=1)
    """Largest region (voxels) of each consumer emulation and of the sweep (each needs only two tiles per axis)."""
    core_blocksize: int | None = Field(None, ge=0)
    """bioimageio.core block size parameter n (blocks of min + n * step, reduced to fit the image); default: the
    smallest n whose block is at least 4 * halo, so a one-block sample splits into two blocks per axis (the
    cheapest emulation; core's own default is 10)."""
    halo: int | list[int] | None = None
    """Halo for checkpoints (packages use the halo they declare); default: from the receptive field."""
    weights: Literal["auto", "pytorch_state_dict", "torchscript"] = "auto"
    """Package weights the metrics run (auto: the state dict when it can be built, else TorchScript)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    batch_size: int = Field(2, ge=1)
    """Tiles per forward pass (tile mismatch, tiled predictions)."""

    @field_validator("checks", "gating_consumers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v

    @field_validator("crop_shape")
    @classmethod
    def _crop(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) not in (2, 3) or min(v) < 1):
            raise ValueError(f"crop_shape needs 2 or 3 positive sizes (y, x or z, y, x), got {v}")
        return v

    @field_validator("halo")
    @classmethod
    def _halo(cls, v: int | list[int] | None) -> int | list[int] | None:
        return _check_halo(v)

    @field_validator("sweep_sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"sweep_sizes needs at least one positive tile edge, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:") or v == "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

