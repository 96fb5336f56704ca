"""Block geometry of a tiling: where each tile reads and which output region it owns.

A :class:`Tiling` splits an N-d image into :class:`Block` s. Every block reads one *tile* (the network's
input, ``tile_shape``) and owns an *inner* region of the output; the inner regions partition the image
exactly, and each one lies at least ``halo`` voxels inside its tile, except where the tile edge is the
image edge. Along one axis (``S`` image size, ``P`` padded size, ``T`` tile, ``H`` halo)::

    image   0                                                          S   P
            |==========================================================|:::|   ::: global zero padding
    tile 0  [-------------------- T ------------------]                        (to a multiple of the divisor,
    owned   [########## inner 0 ###########)                                    applied once, at the end)
    tile 1                         [-------------------- T ------------------]
                                   |<- H ->[## inner 1 ##)<- >= H ->|
    tile 2                                        [-------------------- T ---------|
                                                         |<- H ->[### inner 2 #####)   last tile flush
                                                                                        with P (nnU-Net)

* Tiles lie inside the padded image (``0 <= start``, ``start + T <= P``): the first tile is flush with the
  image origin and the last with the (padded) end, so a tile edge that meets the image edge sees exactly
  the zero padding of the whole-image forward pass. No tile ever reads padding that the whole-image
  forward would not see.
* Tile starts are multiples of the network's size ``divisor`` (the product of its pooling factors):
  a U-Net is only shift-equivariant for shifts by multiples of it, so every tile sees the pooling grid of
  the whole image.
* The image is padded once, globally, with zeros at the end, only to the next multiple of the divisor.
  An image smaller than a tile (along an axis) is not padded to the tile: the tile shrinks to the padded
  image along that axis (one tile covers it), which is exactly the whole-image forward there.
* With ``chunks`` the inner regions are unions of whole chunks (boundaries at multiples of ``chunks``,
  the last ending at the image end): each block then writes whole chunks of a Zarr output, so blocks can
  be written concurrently (dask) without two writers touching the same chunk.

For a network whose output at a voxel depends only on inputs within ``halo`` of it (the one-sided
theoretical receptive field) and that normalizes features with fixed statistics, cropping each tile to its
inner region reproduces the whole-image prediction exactly.

Coordinates: ``Block.outer`` (the tile) is in padded-image coordinates, ``Block.inner`` (the owned output)
in image coordinates (the same origin), ``Block.local`` is the inner region within the tile's output.
``Block.read`` is the part of the tile inside the unpadded image and ``Block.pad`` the zeros to append
after reading it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..introspect import ceil_to

__all__ = ["AxisTiling", "Block", "Tiling", "min_tile_size", "max_inner_size"]

_AXIS_NAMES = "ZYX"


def min_tile_size(halo: int, divisor: int) -> int:
    """The smallest valid tile along an axis: a multiple of ``divisor`` that is >= ``2*halo + divisor``."""
    return ceil_to(2 * halo + divisor, divisor)


def max_inner_size(tile: int, halo: int, divisor: int) -> int:
    """The largest inner (owned) size that a regular chunk grid can use for this tile along an axis.

    A tile starts at a multiple of ``divisor``; when an inner region starts at a multiple of ``divisor``
    the tile starts ``ceil_to(halo, divisor)`` before it and must still reach ``halo`` past its end, so
    ``inner <= tile - halo - ceil_to(halo, divisor)``, rounded down to a multiple of ``divisor``.
    Returns 0 when no chunk-aligned inner region fits.
    """
    size = tile - halo - ceil_to(halo, divisor)
    return max(0, (size // divisor) * divisor)


def _axis_name(axis: int, ndim: int) -> str:
    return _AXIS_NAMES[3 - ndim + axis] if ndim <= 3 else f"axis {axis}"


def _as_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * ndim
    t = tuple(int(v) for v in value)
    if len(t) != ndim:
        raise ValueError(f"{name} has {len(t)} axes {t} but the image has {ndim} spatial axes")
    return t


@dataclass(frozen=True)
class AxisTiling:
    """The tiling of one axis.

    Attributes
    ----------
    size
        Image size along the axis.
    padded_size
        ``size`` rounded up to a multiple of the divisor (the globally padded image).
    tile
        Tile size actually used: the requested tile, or ``padded_size`` when the image is smaller.
    starts
        Start of each tile in padded coordinates (multiples of the divisor, ``start + tile <= padded_size``).
    bounds
        ``len(starts) + 1`` boundaries of the owned (inner) regions:
        ``0 = bounds[0] < ... < bounds[-1] = size``.
    """

    size: int
    padded_size: int
    tile: int
    starts: tuple[int, ...]
    bounds: tuple[int, ...]

    @classmethod
    def create(cls, size: int, tile: int, halo: int, divisor: int, chunk: int | None = None) -> AxisTiling:
        """Place tiles along one axis (the first at 0, the last flush with the padded end).

        Greedy: the tile owning ``[a, b)`` starts at ``a - halo`` rounded down to a multiple of ``divisor``
        (at least 0, at most ``padded_size - tile``) and owns up to ``halo`` before its end (or to the image
        end when it reaches the padded end); with ``chunk`` the end is rounded down to a multiple of it.
        """
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        padded = ceil_to(size, divisor)
        t = min(tile, padded)
        if t == padded:  # one tile covers the axis: the whole-image forward along it
            return cls(size, padded, t, (0,), (0, size))
        starts: list[int] = []
        bounds = [0]
        a = 0
        while a < size:
            s = min(max(0, ((a - halo) // divisor) * divisor), padded - t)
            if s + t >= padded:
                b = size
            else:
                b = s + t - halo
                if chunk is not None:
                    b = (b // chunk) * chunk
                b = min(b, size)
            if b <= a:
                raise ValueError(
                    f"tile {tile} with halo {halo} cannot own whole chunks of {chunk}: use chunks that are a "
                    f"multiple of the divisor {divisor} and at most {max_inner_size(tile, halo, divisor)}, "
                    "or a larger tile"
                )
            starts.append(s)
            bounds.append(b)
            a = b
        return cls(size, padded, t, tuple(starts), tuple(bounds))

    @property
    def n(self) -> int:
        """Number of tiles along the axis."""
        return len(self.starts)

    def inner(self, i: int) -> tuple[int, int]:
        """Owned region ``[start, stop)`` of tile ``i`` in image coordinates."""
        return self.bounds[i], self.bounds[i + 1]


@dataclass(frozen=True)
class Block:
    """One tile of a :class:`Tiling`: what it reads and which output it owns (see the module figure).

    Attributes
    ----------
    index
        Position in the block grid (one entry per spatial axis).
    outer
        The tile: slices into the globally padded image (what the network sees).
    inner
        The owned output region: slices into the image (inner regions of all blocks partition it).
    local
        ``inner`` relative to the tile (slices into the network's output for this tile).
    read
        ``outer`` clipped to the unpadded image (what to read from the input).
    pad
        ``(before, after)`` zeros per axis to append to ``read`` to get the tile (``before`` is always 0).
    """

    index: tuple[int, ...]
    outer: tuple[slice, ...]
    inner: tuple[slice, ...]
    local: tuple[slice, ...] = field(init=False)
    read: tuple[slice, ...] = field(init=False)
    pad: tuple[tuple[int, int], ...] = field(init=False)
    image_shape: tuple[int, ...] = field(repr=False, default=())

    def __post_init__(self) -> None:
        local = tuple(
            slice(i.start - o.start, i.stop - o.start) for i, o in zip(self.inner, self.outer, strict=True)
        )
        shape = self.image_shape or tuple(o.stop for o in self.outer)
        read = tuple(slice(o.start, min(o.stop, s)) for o, s in zip(self.outer, shape, strict=True))
        pad = tuple((0, o.stop - r.stop) for o, r in zip(self.outer, read, strict=True))
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "read", read)
        object.__setattr__(self, "pad", pad)

    def __hash__(self) -> int:  # slices are unhashable before Python 3.12
        return hash((self.index, tuple((s.start, s.stop) for s in self.outer + self.inner)))

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """Spatial shape of the tile (``outer``)."""
        return tuple(s.stop - s.start for s in self.outer)

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """Spatial shape of the owned region (``inner``)."""
        return tuple(s.stop - s.start for s in self.inner)

    @property
    def halo(self) -> tuple[tuple[int, int], ...]:
        """Context actually present on each side of the inner region, per axis ``(before, after)``."""
        return tuple(
            (i.start - o.start, o.stop - i.stop) for i, o in zip(self.inner, self.outer, strict=True)
        )


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile_shape`` covering an image of ``image_shape`` with ``halo`` context per side.

    Parameters
    ----------
    image_shape
        Spatial shape of the image (no channel axis).
    tile_shape
        Spatial shape of a tile (the network input); a multiple of ``divisor`` and at least
        ``2 * halo + divisor`` along every axis. Along axes where the (padded) image is smaller, the tile
        shrinks to the padded image.
    halo
        Context needed on each side of an output voxel (>= the one-sided theoretical receptive field for
        exact stitching); an int for every axis or one per axis.
    divisor
        The network's size divisor (product of its pooling factors); tile starts are multiples of it and
        the image is padded to a multiple of it.
    chunks
        Optional output chunk shape: inner regions are made of whole chunks (for concurrent writes). Chunks
        that are multiples of the divisor and at most :func:`max_inner_size` always work.

    Examples
    --------
    >>> t = Tiling((100, 130), tile_shape=64, halo=16, divisor=4)
    >>> t.grid_shape, t.padded_shape, len(t)
    ((3, 4), (100, 132), 12)
    >>> b = t.blocks()[0]
    >>> b.outer, b.inner
    ((slice(0, 64, None), slice(0, 64, None)), (slice(0, 48, None), slice(0, 48, None)))
    """

    image_shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...] = ()
    chunks: tuple[int, ...] | None = None
    axes: tuple[AxisTiling, ...] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        image_shape: Sequence[int],
        tile_shape: int | Sequence[int],
        halo: int | Sequence[int],
        divisor: int | Sequence[int] = 1,
        chunks: int | Sequence[int] | None = None,
    ) -> None:
        shape = tuple(int(s) for s in image_shape)
        ndim = len(shape)
        if ndim < 1:
            raise ValueError("image_shape must have at least one spatial axis")
        tile = _as_tuple(tile_shape, ndim, "tile_shape")
        hal = _as_tuple(halo, ndim, "halo")
        div = _as_tuple(divisor, ndim, "divisor")
        chk = None if chunks is None else _as_tuple(chunks, ndim, "chunks")
        _check_geometry(shape, tile, hal, div, chk)
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "tile_shape", tile)
        object.__setattr__(self, "halo", hal)
        object.__setattr__(self, "divisor", div)
        object.__setattr__(self, "chunks", chk)
        axes = tuple(
            AxisTiling.create(s, t, h, d, None if chk is None else c)
            for s, t, h, d, c in zip(shape, tile, hal, div, chk or (None,) * ndim, strict=True)
        )
        object.__setattr__(self, "axes", axes)

    # -- shape --------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.image_shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """The image shape padded (once, at the end) to a multiple of the divisor."""
        return tuple(a.padded_size for a in self.axes)

    @property
    def pad_width(self) -> tuple[tuple[int, int], ...]:
        """``(0, padded - size)`` per axis: the global zero padding."""
        return tuple((0, a.padded_size - a.size) for a in self.axes)

    @property
    def effective_tile_shape(self) -> tuple[int, ...]:
        """The tile shape used (the requested one, shrunk to the padded image where it is smaller)."""
        return tuple(a.tile for a in self.axes)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of tiles along each axis."""
        return tuple(a.n for a in self.axes)

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    # -- blocks -------------------------------------------------------------------------------------
    def block(self, index: Sequence[int]) -> Block:
        """The block at grid position ``index``."""
        idx = tuple(int(i) for i in index)
        if len(idx) != self.ndim or any(not 0 <= i < a.n for i, a in zip(idx, self.axes, strict=True)):
            raise IndexError(f"block index {idx} outside the grid {self.grid_shape}")
        outer = tuple(slice(a.starts[i], a.starts[i] + a.tile) for i, a in zip(idx, self.axes, strict=True))
        inner = tuple(slice(*a.inner(i)) for i, a in zip(idx, self.axes, strict=True))
        return Block(idx, outer, inner, image_shape=self.image_shape)

    def __iter__(self) -> Iterator[Block]:
        for idx in itertools.product(*(range(a.n) for a in self.axes)):
            yield self.block(idx)

    def blocks(self) -> list[Block]:
        """All blocks in C order of the grid."""
        return list(self)

    # -- cost ---------------------------------------------------------------------------------------
    @property
    def overhead(self) -> float:
        """Voxels the network processes / image voxels (1.0 is one whole-image forward)."""
        tile = math.prod(self.effective_tile_shape)
        return len(self) * tile / math.prod(self.image_shape)

    @property
    def theoretical_overhead(self) -> float:
        """``prod(tile / (tile - 2*halo))`` over axes that are tiled (more than one tile): the cost of
        the halo on an infinite image."""
        r = 1.0
        for a, h in zip(self.axes, self.halo, strict=True):
            if a.n > 1:
                r *= a.tile / (a.tile - 2 * h)
        return r

    def describe(self) -> str:
        """One line: grid, tile, halo, padding and overhead."""
        return (
            f"{len(self)} tile(s) {'x'.join(map(str, self.grid_shape))} of "
            f"{'x'.join(map(str, self.effective_tile_shape))}, "
            f"halo {'x'.join(map(str, self.halo))}, image {'x'.join(map(str, self.image_shape))} padded to "
            f"{'x'.join(map(str, self.padded_shape))}, overhead {self.overhead:.2f}x"
        )


def _check_geometry(
    shape: tuple[int, ...],
    tile: tuple[int, ...],
    halo: tuple[int, ...],
    divisor: tuple[int, ...],
    chunks: tuple[int, ...] | None,
) -> None:
    ndim = len(shape)
    for a in range(ndim):
        name = _axis_name(a, ndim)
        s, t, h, d = shape[a], tile[a], halo[a], divisor[a]
        if s < 1:
            raise ValueError(f"image size along {name} must be >= 1, got {s}")
        if d < 1:
            raise ValueError(f"divisor along {name} must be >= 1, got {d}")
        if h < 0:
            raise ValueError(f"halo along {name} must be >= 0, got {h}")
        if t % d:
            lo, hi = max(d, (t // d) * d), ceil_to(t, d)
            raise ValueError(
                f"tile {t} along {name} is not a multiple of the network's size divisor {d}: use {lo} or {hi}"
            )
        if t < 2 * h + d:
            raise ValueError(
                f"tile {t} along {name} is smaller than 2*halo + divisor = 2*{h} + {d} = {2 * h + d}: "
                f"use a tile of at least {min_tile_size(h, d)} or a smaller halo"
            )
        if chunks is not None and chunks[a] < 1:
            raise ValueError(f"chunk size along {name} must be >= 1, got {chunks[a]}")
