"""Labelled images from another source than a model's training data, for the Dice a user would see.

A model trained on one image is only as good as it is on the images users bring: another microscope, another
bit depth, another annotator. :class:`IndependentImages` names such a set in a config (``zoo.yaml``, the
study config): image and labels (files, or an embedded sample), optionally the planes of a volume taken as 2D
images, and where it comes from and under which licence, so that every figure measured on it can say so.
:func:`load_independent` reads it as ``(name, raw (C, *spatial), labels)`` triples, never normalized: the
model's own preprocessing is what is evaluated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from ..config import StrictModel
from .io import open_image, open_labels
from .samples import sample_path

__all__ = ["IndependentImage", "IndependentImages", "load_independent"]


class IndependentImages(StrictModel):
    """A labelled image (or the planes of one) from another source than the training data."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    """Short name used in tables (e.g. ``cells3d-planes``)."""
    sample: str | None = None
    """An embedded sample (``tilenorm_bmz.data.list_samples()``) instead of ``image`` + ``labels``."""
    image: Path | None = None
    """Raw image file (TIFF, Zarr, .npy), relative to the config's folder."""
    labels: Path | None = None
    """Instance labels of ``image`` (0 = background), same spatial shape."""
    planes: list[int] | None = None
    """Take these planes along the first spatial axis as 2D images (a 2D model on a volume's planes)."""
    description: str
    """What it shows and how it differs from the training data (microscope, bit depth, nucleus size)."""
    source: str
    """Where the files come from (package and version, file names)."""
    license: str
    """Licence of the image and of the labels."""

    @model_validator(mode="after")
    def _one_source(self) -> IndependentImages:
        files = self.image is not None, self.labels is not None
        if (self.sample is not None) == any(files) or (any(files) and not all(files)):
            raise ValueError(f"independent images {self.name}: give either sample or both image and labels")
        if self.planes is not None and not self.planes:
            raise ValueError(f"independent images {self.name}: planes is empty; list plane indices or omit it")
        return self

    def resolve_paths(self, base_dir: str | os.PathLike[str]) -> IndependentImages:
        """The same set with ``image`` / ``labels`` made absolute against ``base_dir`` (the config's folder)."""
        if self.sample is not None:
            return self
        return self.model_copy(update=dict(zip(("image", "labels"), self.paths(base_dir), strict=True)))

    def paths(self, base_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
        if self.sample is not None:
            return sample_path(self.sample)
        assert self.image is not None and self.labels is not None
        base = Path(base_dir) if base_dir is not None else Path()
        return tuple(p if p.is_absolute() else base / p for p in (self.image, self.labels))  # type: ignore[return-value]


@dataclass(frozen=True)
class IndependentImage:
    """One image of a set: raw ``(C, *spatial)`` as stored (not normalized) and its instance labels."""

    name: str
    raw: np.ndarray
    labels: np.ndarray


def load_independent(spec: IndependentImages, base_dir: str | os.PathLike[str] | None = None,
                     dims: int | None = None, channels: int | None = None) -> list[IndependentImage]:
    """The images of ``spec``; ``dims`` and ``channels`` (the model's) are checked, with the fix named when they
    do not fit. Every image must hold at least one labelled object (else its Dice says nothing)."""
    image_path, labels_path = spec.paths(base_dir)
    raw = open_image(image_path).read()
    labels = open_labels(labels_path).read()
    if raw.shape[1:] != labels.shape:
        raise ValueError(f"independent images {spec.name}: image {raw.shape[1:]} and labels {labels.shape} differ "
                         "in spatial shape")
    if spec.planes is None:
        out = [IndependentImage(spec.name, raw, labels)]
    else:
        if raw.ndim != 4:
            raise ValueError(f"independent images {spec.name}: planes need a 3D image, got spatial shape "
                             f"{raw.shape[1:]}; remove planes")
        bad = [p for p in spec.planes if not 0 <= p < raw.shape[1]]
        if bad:
            raise ValueError(f"independent images {spec.name}: planes {bad} outside 0..{raw.shape[1] - 1}")
        out = [IndependentImage(f"{spec.name}[{p}]", raw[:, p], labels[p]) for p in spec.planes]
    if dims is not None and out[0].labels.ndim != dims:
        raise ValueError(f"independent images {spec.name} are {out[0].labels.ndim}D but the model is {dims}D"
                         + ("; take 2D planes with `planes: [...]`" if dims == 2 else ""))
    if channels is not None and raw.shape[0] != channels:
        raise ValueError(f"independent images {spec.name} have {raw.shape[0]} channel(s) ({image_path.name}) but the "
                         f"model takes {channels}: give a {channels}-channel image (e.g. the nuclear stain alone)")
    empty = [im.name for im in out if not np.any(im.labels)]
    if empty:
        raise ValueError(f"independent images {', '.join(empty)} have no labelled objects: choose images (or planes) "
                         "that show some")
    return out
