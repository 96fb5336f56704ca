"""Random training tiles with flips, foreground rejection and a resumable, reproducible order.

Tile ``i`` of a :class:`TileSampler` is a pure function of ``(seed, i)``: every random choice for it is
drawn from ``numpy.random.default_rng([seed, i])``. The sampler's state is therefore just the index of
the next tile (:meth:`TileSampler.state_dict`), a resumed run continues the exact same sequence, and
tiles can be produced in any order or in parallel (:meth:`TileSampler.sample_at`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ..config import InputNormalization
from .io import Image, as_image
from .labels import instances_to_targets
from .normalize import FittedNormalization, fit_normalization

__all__ = [
    "Region",
    "SamplerSource",
    "Tile",
    "TileSampler",
    "split_by_image",
    "split_by_region",
]

logger = logging.getLogger(__name__)

Region = tuple[slice, ...]
"""Spatial region of an image: one ``slice(start, stop)`` per spatial axis."""

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------------
def split_by_region(shape: Sequence[int], fraction: float = 0.7, axis: int = -1) -> tuple[Region, Region]:
    """Cut a spatial ``shape`` along ``axis``: the first ``fraction`` trains, the rest validates.

    Returns ``(train, validation)`` regions (tuples of slices, one per spatial axis). The cut is at
    ``round(fraction * shape[axis])``, kept inside ``1 .. shape[axis] - 1``.

    >>> train, val = split_by_region((60, 256, 256), 0.7, axis=-1)
    >>> train[-1], val[-1]
    (slice(0, 179, None), slice(179, 256, None))
    """
    shape = tuple(int(s) for s in shape)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction is the training share, strictly between 0 and 1; got {fraction}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is not a spatial axis of shape {shape}")
    axis %= len(shape)
    n = shape[axis]
    if n < 2:
        raise ValueError(
            f"cannot split an axis of size {n} (shape {shape}, axis {axis}); choose another axis"
        )
    cut = min(max(round(fraction * n), 1), n - 1)
    full = [slice(0, s) for s in shape]
    train, val = list(full), list(full)
    train[axis] = slice(0, cut)
    val[axis] = slice(cut, n)
    return tuple(train), tuple(val)


def split_by_image(items: Sequence[T], fraction: float = 0.7) -> tuple[list[T], list[T]]:
    """The first ``round(fraction * n)`` items train, the rest validate (order kept; at least one each)."""
    n = len(items)
    if n < 2:
        raise ValueError(
            f"a split by image needs at least 2 images, got {n}; split one image by region instead "
            f"(split_by_region / split: {{by: region}})"
        )
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction is the training share, strictly between 0 and 1; got {fraction}")
    k = min(max(round(fraction * n), 1), n - 1)
    return list(items[:k]), list(items[k:])


# ------------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------------
@dataclass
class SamplerSource:
    """One image/label pair, optionally restricted to a spatial ``region`` (default: all of it).

    ``image`` is ``(C, *spatial)`` (an :class:`Image`, an array or a path); ``labels`` are instance ids
    ``spatial`` (an :class:`Image` from :func:`open_labels`, an array or a path). ``targets`` may hold
    precomputed :func:`instances_to_targets` of the whole label image (``(K, *spatial)``) to share them.
    """

    image: Image | np.ndarray | str
    labels: Image | np.ndarray | str
    region: Region | None = None
    name: str = ""
    targets: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Tile:
    """One training tile. ``image`` ``(C, *tile)`` float32 normalized, ``target`` ``(K, *tile)``.

    ``slices`` locate it in the source image (before flips); ``flipped`` lists the spatial axes it was
    flipped along; ``foreground`` is its fraction of object voxels; ``tries`` how many positions were drawn.
    """

    image: np.ndarray
    target: np.ndarray
    index: int
    source: int
    slices: Region
    flipped: tuple[int, ...]
    foreground: float
    tries: int


class TileSampler:
    """Random tiles from several image/label pairs, normalized, with targets and flips.

    Parameters
    ----------
    sources
        :class:`SamplerSource` items (all with the same number of channels and spatial dimensionality).
    tile_shape
        Spatial tile shape; it must fit inside every source's region.
    normalization
        Input normalization. ``global``/``fixed``: fitted once per source on its whole image (as at
        inference, so the validation part is normalized the same way); ``tilewise``: per tile.
    boundary_width, background, fill_holes
        Target settings (:func:`~tilenorm_bmz.data.labels.instances_to_targets`). Targets are computed on
        the whole label image when it has at most ``precompute_max_voxels`` voxels; otherwise per tile
        from the labels read with a margin of ``boundary_width`` (boundaries exact; holes are filled
        within the tile and margin only).
    flips
        Flip each spatial axis with probability 0.5 (image and target together).
    min_foreground
        Reject tiles whose fraction of object voxels is below this; after ``max_tries`` positions the one
        with the most foreground is used.
    seed
        Non-negative; tile ``i`` uses ``numpy.random.default_rng([seed, i])``.
    target_dtype
        dtype of the targets (``uint8``; ``float32`` to feed a loss directly).

    Sources are chosen with probability proportional to their region's voxel count.
    """

    def __init__(
        self,
        sources: Sequence[SamplerSource],
        tile_shape: Sequence[int],
        *,
        normalization: InputNormalization | None = None,
        boundary_width: int = 1,
        background: bool = False,
        fill_holes: bool = True,
        flips: bool = True,
        min_foreground: float = 0.0,
        max_tries: int = 20,
        seed: int = 0,
        target_dtype: Any = np.uint8,
        precompute_max_voxels: int = 2**27,
        fitted: Sequence[FittedNormalization] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("TileSampler needs at least one image/label pair")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"min_foreground is a fraction in [0, 1], got {min_foreground}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.tile_shape = tuple(int(t) for t in tile_shape)
        self.normalization = normalization or InputNormalization()
        self.boundary_width = boundary_width
        self.background = background
        self.fill_holes = fill_holes
        self.flips = flips
        self.min_foreground = float(min_foreground)
        self.max_tries = int(max_tries)
        self.seed = int(seed)
        self.target_dtype = np.dtype(target_dtype)
        self.index = 0
        self.images: list[Image] = []
        self.labels: list[Image] = []
        self.regions: list[Region] = []
        self.names: list[str] = []
        self._targets: list[np.ndarray | None] = []
        for k, src in enumerate(sources):
            self._add(k, src, precompute_max_voxels)
        channels = {img.n_channels for img in self.images}
        if len(channels) > 1:
            raise ValueError(
                f"all training images need the same number of channels; got {sorted(channels)} "
                f"({', '.join(f'{n}: {i.n_channels}' for n, i in zip(self.names, self.images, strict=True))})"
            )
        if fitted is not None:
            if len(fitted) != len(self.images):
                raise ValueError(f"fitted has {len(fitted)} entries for {len(self.images)} sources")
            self.fitted = list(fitted)
        else:
            self.fitted = [fit_normalization(self.normalization, img) for img in self.images]
        sizes = np.array([math.prod(s.stop - s.start for s in r) for r in self.regions], dtype=np.float64)
        self._p = sizes / sizes.sum()

    def _add(self, k: int, src: SamplerSource, precompute_max_voxels: int) -> None:
        img = as_image(src.image)
        lab = as_image(src.labels, labels=True)
        name = src.name or (str(img.path) if img.path is not None else f"source {k}")
        if img.spatial_shape != lab.spatial_shape:
            raise ValueError(
                f"{name}: image spatial shape {img.spatial_shape} differs from its labels {lab.spatial_shape}"
            )
        if len(self.tile_shape) != img.spatial_ndim:
            raise ValueError(
                f"{name}: tile_shape {self.tile_shape} has {len(self.tile_shape)} axes but the image is "
                f"{img.spatial_ndim}D (shape {img.shape}, axes {img.axes!r})"
            )
        region = src.region or tuple(slice(0, s) for s in img.spatial_shape)
        region = tuple(slice(*r.indices(s)[:2]) for r, s in zip(region, img.spatial_shape, strict=True))
        rshape = tuple(r.stop - r.start for r in region)
        small = [a for a, (t, s) in enumerate(zip(self.tile_shape, rshape, strict=True)) if t > s]
        if small:
            raise ValueError(
                f"{name}: tile_shape {self.tile_shape} does not fit the training region {rshape} along "
                f"axis {small}; choose a smaller tile_shape (or split along another axis)"
            )
        targets = src.targets
        if targets is not None and targets.shape[1:] != img.spatial_shape:
            raise ValueError(
                f"{name}: precomputed targets {targets.shape} do not match the image {img.shape}"
            )
        if targets is None and math.prod(lab.spatial_shape) <= precompute_max_voxels:
            targets = instances_to_targets(
                lab.read(),
                boundary_width=self.boundary_width,
                background=self.background,
                fill_holes=self.fill_holes,
                dtype=np.uint8,
            )
        self.images.append(img)
        self.labels.append(lab)
        self.regions.append(region)
        self.names.append(name)
        self._targets.append(targets)

    # -- properties -----------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.images[0].n_channels

    @property
    def out_channels(self) -> int:
        return 3 if self.background else 2

    def __repr__(self) -> str:
        return (
            f"TileSampler({len(self.images)} source(s), tile {self.tile_shape}, "
            f"normalization {self.normalization.mode}, seed {self.seed}, next index {self.index})"
        )

    # -- sampling -------------------------------------------------------------------------------------
    def _target_tile(self, k: int, sl: Region) -> np.ndarray:
        full = self._targets[k]
        if full is not None:
            return full[(slice(None), *sl)]
        lab = self.labels[k]
        m = self.boundary_width
        outer = tuple(
            slice(max(0, s.start - m), min(n, s.stop + m)) for s, n in zip(sl, lab.spatial_shape, strict=True)
        )
        t = instances_to_targets(
            lab[outer],
            boundary_width=m,
            background=self.background,
            fill_holes=self.fill_holes,
            dtype=np.uint8,
        )
        inner = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sl, outer, strict=True))
        return t[(slice(None), *inner)]

    def sample_at(self, index: int) -> Tile:
        """Tile number ``index`` (does not change the sampler's position)."""
        rng = np.random.default_rng([self.seed, int(index)])
        best: tuple[float, int, Region, np.ndarray] | None = None
        tries = 0
        for tries in range(1, self.max_tries + 1):  # noqa: B007 - the count is reported
            k = int(rng.choice(len(self.images), p=self._p))
            region = self.regions[k]
            starts = [
                int(rng.integers(r.start, r.stop - t + 1))
                for r, t in zip(region, self.tile_shape, strict=True)
            ]
            sl = tuple(slice(a, a + t) for a, t in zip(starts, self.tile_shape, strict=True))
            target = self._target_tile(k, sl)
            fg = float(np.count_nonzero(target[0] | target[1])) / target[0].size
            if best is None or fg > best[0]:
                best = (fg, k, sl, target)
            if fg >= self.min_foreground:
                break
        assert best is not None
        fg, k, sl, target = best
        if fg < self.min_foreground:
            logger.debug(
                "tile %d: no position with foreground >= %s in %d tries", index, self.min_foreground, tries
            )
        flipped = tuple(a for a in range(len(self.tile_shape)) if rng.random() < 0.5) if self.flips else ()
        raw = self.images[k][(slice(None), *sl)]
        image = self.fitted[k].apply(raw)
        target = target.astype(self.target_dtype, copy=False)
        if flipped:
            axes = tuple(a + 1 for a in flipped)
            image = np.flip(image, axes)
            target = np.flip(target, axes)
        return Tile(
            image=np.ascontiguousarray(image),
            target=np.ascontiguousarray(target),
            index=int(index),
            source=k,
            slices=sl,
            flipped=flipped,
            foreground=fg,
            tries=tries,
        )

    def sample(self) -> Tile:
        """The next tile; advances the position."""
        tile = self.sample_at(self.index)
        self.index += 1
        return tile

    def __iter__(self) -> Iterator[Tile]:
        """Endless stream of tiles from the current position."""
        while True:
            yield self.sample()

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``size`` tiles stacked: images ``(B, C, *tile)`` float32, targets ``(B, K, *tile)``."""
        tiles = [self.sample() for _ in range(size)]
        return np.stack([t.image for t in tiles]), np.stack([t.target for t in tiles])

    # -- state ----------------------------------------------------------------------------------------
    def _fingerprint(self) -> list[list[Any]]:
        return [
            [list(img.shape), [[r.start, r.stop] for r in reg]]
            for img, reg in zip(self.images, self.regions, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: ``seed``, ``index`` (next tile) and a fingerprint of the sources."""
        return {
            "seed": self.seed,
            "index": self.index,
            "tile_shape": list(self.tile_shape),
            "sources": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the same seed is required, changed data is warned about."""
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"the sampler state was saved with seed {state['seed']} but this sampler uses seed "
                f"{self.seed}; use the same data.seed to resume"
            )
        if list(state.get("tile_shape", self.tile_shape)) != list(self.tile_shape):
            raise ValueError(
                f"the sampler state was saved with tile_shape {state['tile_shape']}, this sampler uses "
                f"{list(self.tile_shape)}; resume with the same data.tile_shape"
            )
        if "sources" in state and state["sources"] != self._fingerprint():
            logger.warning("resuming a sampler whose images or regions changed: the tile sequence differs")
        self.index = int(state["index"])
