"""Test tensors, sample tensors and the cover image of a package.

The test input is a crop of real raw data (not normalized, sized to a valid input size); the test output
is the network's raw, *uncropped* output for it, computed with the package's own preprocessing maths
(:class:`~tilenorm_bmz.bmz.normalization.PackageNormalization`), so every weight format reproduces it.
The sample tensors hold the same arrays as TIFF (deepImageJ's compatibility check runs the sample and
compares with the test output).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .geometry import AxisGeometry
from .normalization import PackageNormalization

__all__ = [
    "TestTensors",
    "as_sample_array",
    "crop_test_input",
    "load_sample",
    "make_test_tensors",
    "write_cover",
]

logger = logging.getLogger(__name__)

#: Largest test tensor edge by dimensionality (keeps packages small; raised to the axis minimum if needed).
TEST_SIZE_CAP = {2: 256, 3: 64}
#: bioimage.io rejects test tensors whose values all lie within +-1e-4.
_TINY = 1e-4


def as_sample_array(array: Any, dims: int, in_channels: int) -> np.ndarray:
    """Bring an image to ``(C, *spatial)``: add a channel axis to a single-channel ``(*spatial)`` image."""
    a = np.asarray(array)
    if a.ndim == dims and in_channels == 1:
        a = a[None]
    if a.ndim != dims + 1:
        raise ValueError(
            f"the sample image has shape {a.shape}; a {dims}D network with {in_channels} input channel(s) needs "
            f"({in_channels}, {', '.join('ZYX'[3 - dims:])})" + (" or a plain image" if in_channels == 1 else "")
        )
    if a.shape[0] != in_channels:
        raise ValueError(f"the sample image has {a.shape[0]} channel(s) (shape {a.shape}); the network expects {in_channels}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"the sample image has dtype {a.dtype}; expected real numbers")
    return a


def load_sample(source: str | os.PathLike[str] | np.ndarray, dims: int, in_channels: int) -> tuple[Any, str]:
    """Open a sample image lazily (TIFF, Zarr, .npy via :func:`tilenorm_bmz.data.open_image`) or take an array.

    Returns an array-like of shape ``(C, *spatial)`` (indexing reads only what is asked) and a description.
    """
    if isinstance(source, np.ndarray):
        return as_sample_array(source, dims, in_channels), "array given to export_package"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"sample image {path} does not exist")
    from ..data import open_image

    image = open_image(path)
    shape = tuple(image.shape)
    if len(shape) != dims + 1 or shape[0] != in_channels:
        raise ValueError(
            f"sample image {path} has shape {shape} (channels first); a {dims}D network with {in_channels} "
            f"input channel(s) needs ({in_channels}, {', '.join('ZYX'[3 - dims:])})"
        )
    return image, str(path)


def crop_test_input(image: Any, geometry: Sequence[AxisGeometry], cap: int | None = None) -> np.ndarray:
    """The centre crop of ``image`` ``(C, *spatial)`` with the largest valid size ``<= cap`` per axis."""
    spatial = tuple(int(s) for s in image.shape[1:])
    dims = len(spatial)
    limit = cap if cap is not None else TEST_SIZE_CAP.get(dims, 64)
    slices = [slice(None)]
    for g, extent in zip(geometry, spatial, strict=True):
        size = g.largest_valid_size(min(extent, max(limit, g.min)))
        if size is None:
            raise ValueError(
                f"the sample image is too small along {g.axis}: {extent} px, the package's smallest input is "
                f"{g.min} px (2*halo {2 * g.halo} + step {g.step}); give a larger sample (--sample IMG)"
            )
        start = (extent - size) // 2
        slices.append(slice(start, start + size))
    crop = np.asarray(image[tuple(slices)])
    return np.ascontiguousarray(crop.astype(np.float32, copy=False))


class TestTensors:
    """Raw test input ``(1, C, *spatial)`` and raw, uncropped test output ``(1, C_out, *spatial)``."""

    __test__ = False  # not a pytest class

    def __init__(self, raw_input: np.ndarray, normalized: np.ndarray, output: np.ndarray) -> None:
        self.raw_input = raw_input
        self.normalized = normalized
        self.output = output

    def write(self, folder: Path) -> dict[str, Path]:
        """Write ``test_input.npy``, ``test_output.npy`` and the sample tensors (same arrays, TIFF)."""
        import tifffile

        paths = {
            "test_input": folder / "test_input.npy",
            "test_output": folder / "test_output.npy",
            "sample_input": folder / "sample_input.tif",
            "sample_output": folder / "sample_output.tif",
        }
        np.save(paths["test_input"], self.raw_input)
        np.save(paths["test_output"], self.output)
        tifffile.imwrite(paths["sample_input"], self.raw_input)
        tifffile.imwrite(paths["sample_output"], self.output)
        return paths


def make_test_tensors(
    model: nn.Module, raw_crop: np.ndarray, normalization: PackageNormalization
) -> TestTensors:
    """Normalize ``raw_crop`` ``(C, *spatial)`` as the package will and run ``model`` (eval form) on it."""
    normalized = normalization.apply(raw_crop)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(normalized[None].copy())).numpy().astype(np.float32)
    raw = raw_crop[None].astype(np.float32)
    for name, arr in (("test input", raw), ("test output", out)):
        if not np.isfinite(arr).all():
            raise ValueError(f"the {name} contains NaN or infinite values")
        if np.abs(arr).max() <= _TINY:
            raise ValueError(
                f"the {name} has all values within +-{_TINY}, which bioimage.io rejects as too small for reliable "
                "testing; choose a sample with content (--sample IMG)"
            )
    return TestTensors(raw, normalized[None], out)


def _middle_slice(a: np.ndarray) -> np.ndarray:
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    return a


def write_cover(path: Path, tensors: TestTensors, channel_names: Sequence[str]) -> Path:
    """Input | prediction overlay (middle slice in 3D), 2:1, as PNG."""
    from matplotlib.figure import Figure

    raw = _middle_slice(tensors.normalized[0, 0])
    out = tensors.output[0]
    fig = Figure(figsize=(8, 4), dpi=80)
    ax_in, ax_out = fig.subplots(1, 2)
    ax_in.imshow(raw, cmap="gray", interpolation="nearest")
    ax_in.set_title("input")
    ax_out.imshow(raw, cmap="gray", interpolation="nearest")
    colors = ["Greens", "Reds", "Blues", "Purples", "Oranges"]
    probabilities = float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    for c in range(min(out.shape[0], len(colors))):
        ch = _middle_slice(out[c])
        lo, hi = (0.0, 1.0) if probabilities else (float(ch.min()), float(ch.max()))
        alpha = np.clip((ch - lo) / (hi - lo), 0, 1) * 0.6 if hi > lo else np.zeros_like(ch)
        ax_out.imshow(ch, cmap=colors[c], alpha=alpha, interpolation="nearest")
    ax_out.set_title("prediction: " + ", ".join(channel_names[: len(colors)]))
    for ax in (ax_in, ax_out):
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
