"""bioimage.io export metadata: authors, maintainers, citations and :class:`ExportConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from ._base import StrictModel, _check_halo

__all__ = [
    "WEIGHT_FORMATS",
    "CitationConfig",
    "ExportConfig",
    "MaintainerConfig",
    "PersonConfig",
    "WeightFormat",
]

WeightFormat = Literal["pytorch_state_dict", "torchscript", "onnx"]
InputNormKind = Literal["percentile", "fixed"]
"""A package's preprocessing: per-image percentile ``scale_range``, or ``scale_linear`` with fixed values."""
INPUT_NORM_KINDS: tuple[str, ...] = get_args(InputNormKind)
#: Weight formats ``tilenorm-bmz package`` can write (torchscript is what deepImageJ and ilastik run).
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)


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
    input_norm: InputNormKind = "percentile"
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
