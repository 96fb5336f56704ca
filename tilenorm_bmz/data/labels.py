"""Instance labels -> semantic training targets, and cleaning of instance label images.

Targets (:func:`instances_to_targets`), per voxel, for an instance label image ``L`` (0 = background)::

    boundary   = L > 0 and some voxel within face-connected distance boundary_width has another label
                 (another object or background); the image edge is not a boundary (objects continue)
    foreground = L > 0 and not boundary
    background = L == 0                                   (optional, last channel)

With the background channel the three channels partition the image (one-hot). Because every object
gets its own inner boundary, two touching objects are separated by two boundary layers and their
foregrounds never touch. Holes inside an object (background voxels enclosed by one label) are filled
with that label first; voxels of other labels inside an object are kept.

Example (``boundary_width=1``; ``f`` foreground, ``b`` boundary, ``.`` background)::

    labels          targets
    . . . . . .     . . . . . .
    . 1 1 2 2 .     . b b b b .
    . 1 1 2 2 .     . b b b b .
    . 1 1 2 2 .     . b b b b .
    . . . . . .     . . . . . .

    . . . . . . .   . . . . . . .
    . 1 1 1 1 1 .   . b b b b b .
    . 1 1 1 1 1 .   . b f f f b .
    . 1 1 0 1 1 .   . b f f f b .     (the hole is filled first)
    . 1 1 1 1 1 .   . b f f f b .
    . 1 1 1 1 1 .   . b b b b b .
    . . . . . . .   . . . . . . .
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "clean_labels",
    "fill_label_holes",
    "instances_to_targets",
    "target_channel_names",
]

logger = logging.getLogger(__name__)


def target_channel_names(background: bool = False) -> list[str]:
    """Names of the channels :func:`instances_to_targets` returns, in order."""
    return ["foreground", "boundary"] + (["background"] if background else [])


def _check_labels(labels: Any) -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim not in (2, 3):
        raise ValueError(f"instance labels must be 2D (y, x) or 3D (z, y, x); got shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.uint8)
    if a.dtype.kind not in "iu":
        raise ValueError(f"instance labels must have an integer dtype (ids, 0 = background); got {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError("instance labels must be >= 0 (0 = background)")
    return a


def _diamond(ndim: int, radius: int) -> np.ndarray:
    """Face-connected neighbourhood of ``radius`` steps (an L1 ball)."""
    return ndi.iterate_structure(ndi.generate_binary_structure(ndim, 1), radius)


def fill_label_holes(labels: Any, *, slicewise: bool = False) -> np.ndarray:
    """Fill the holes of every object with its label (a new array; the input is not modified).

    A hole is a background region that the object encloses in N-d (in 3D: a cavity). With
    ``slicewise`` (3D only) holes are also filled in every 2D slice along axis 0, which closes gaps
    that annotators left open in z. Only background voxels are filled; other labels inside an object stay.
    """
    labels = _check_labels(labels)
    out = labels.copy()
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = out[sl]
        mask = crop == lab
        filled = ndi.binary_fill_holes(mask)
        if slicewise and mask.ndim == 3:
            for z in range(mask.shape[0]):
                filled[z] |= ndi.binary_fill_holes(mask[z])
        new = filled & (crop == 0)
        if new.any():
            crop[new] = lab
    return out


def instances_to_targets(
    labels: Any,
    *,
    boundary_width: int = 1,
    background: bool = False,
    fill_holes: bool = True,
    dtype: Any = np.uint8,
) -> np.ndarray:
    """Foreground / boundary (/ background) targets ``(K, *spatial)`` from an instance label image.

    Parameters
    ----------
    labels
        Instance ids, 2D or 3D, 0 = background.
    boundary_width
        Thickness of the inner boundary in voxels (face-connected distance).
    background
        Add a background channel (last); the channels then sum to 1 everywhere.
    fill_holes
        Fill holes per label first (:func:`fill_label_holes`).
    dtype
        Output dtype (``uint8`` by default; ``float32`` for losses).

    Returns
    -------
    numpy.ndarray
        ``(2 or 3, *labels.shape)``: foreground, boundary, [background]. The edge of the array counts as
        the object continuing, so compute targets on the whole label image (or a crop with a margin of
        ``boundary_width``) rather than on tiles cut without margin.
    """
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be >= 1, got {boundary_width}")
    labels = _check_labels(labels)
    if fill_holes:
        labels = fill_label_holes(labels)
    fp = _diamond(labels.ndim, boundary_width)
    lo = ndi.minimum_filter(labels, footprint=fp, mode="nearest")
    hi = ndi.maximum_filter(labels, footprint=fp, mode="nearest")
    obj = labels > 0
    boundary = obj & ((lo != labels) | (hi != labels))
    channels = [obj & ~boundary, boundary]
    if background:
        channels.append(~obj)
    return np.stack(channels).astype(dtype)


def clean_labels(
    labels: Any,
    *,
    fill_holes: bool = True,
    slicewise_holes: bool = False,
    connectivity: int = 1,
    min_size: int = 0,
) -> np.ndarray:
    """Fill holes per label, give every connected piece of an id its own id, relabel 1..N.

    Parameters
    ----------
    labels
        Instance ids, 2D or 3D.
    fill_holes, slicewise_holes
        Fill holes per label (:func:`fill_label_holes`), in N-d and, with ``slicewise_holes``, per 2D slice.
    connectivity
        Neighbourhood that connects voxels of one object: 1 = faces only (the definition the boundary
        targets use), up to ``ndim`` = faces, edges and corners.
    min_size
        Pieces with fewer voxels are removed (set to background); 0 keeps everything.

    Returns
    -------
    numpy.ndarray
        Labels with ids ``1..N`` in the order of the original ids (pieces of one id get
        consecutive new ids, largest piece first); same dtype as the input when ``N`` fits, else uint32.
    """
    labels = _check_labels(labels)
    if not 1 <= connectivity <= labels.ndim:
        raise ValueError(f"connectivity must be in 1..{labels.ndim}, got {connectivity}")
    work = fill_label_holes(labels, slicewise=slicewise_holes) if fill_holes else labels
    structure = ndi.generate_binary_structure(labels.ndim, connectivity)
    out = np.zeros(labels.shape, dtype=np.uint32)
    next_id = 1
    n_split = n_removed = 0
    for lab, sl in enumerate(ndi.find_objects(work), start=1):
        if sl is None:
            continue
        mask = work[sl] == lab
        comp, n = ndi.label(mask, structure=structure)
        sizes = np.bincount(comp.ravel())[1:]
        order = np.argsort(-sizes, kind="stable")
        kept = [k for k in order if sizes[k] >= min_size]
        n_removed += n - len(kept)
        n_split += len(kept) > 1
        view = out[sl]
        for k in kept:
            view[comp == k + 1] = next_id
            next_id += 1
    n_ids = next_id - 1
    if n_split or n_removed:
        logger.info(
            "clean_labels: %d id(s) split into pieces, %d piece(s) below min_size removed", n_split, n_removed
        )
    dtype = labels.dtype if (labels.dtype.kind in "iu" and np.iinfo(labels.dtype).max >= n_ids) else np.uint32
    return out.astype(dtype, copy=False)
