"""The cheapest tiling plan: tile sizes that make the network process the fewest voxels.

The work of an exact tiled prediction is the voxels the network processes, ``prod(n_a * t_a)`` over the
axes (``n_a`` tiles of ``t_a`` voxels along axis ``a``), not the number of tiles. A :class:`Tiling` places
the first and last tile flush with the image, so border tiles need their halo on one side only: along a
192-voxel axis with halo 24, two tiles of 120 (inner regions 96 + 96) process 240 voxels, three of 96
process 288, one of 192 processes 192 but may not fit the memory.

:func:`plan_tiles` chooses, for an image, a halo and the largest tile volume the memory allows, the tile
size per axis (a multiple of the divisor, at least ``2 * halo + divisor``) that minimizes the processed
voxels; among plans of equal cost the one with fewer tiles wins (fewer forward calls). Per axis only the
Pareto-optimal sizes matter (the smallest tile for each tile count), so the search enumerates those for
all axes but the last and picks the largest tile of the last axis that still fits (a bisection).

With ``chunked=True`` (a Zarr output written by several blocks) every inner region must also be made of
whole output chunks; the plan then chooses per axis the chunk size that needs the fewest tiles and returns
it as :attr:`TilePlan.chunks`.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..introspect import ceil_to
from .blocks import AxisTiling, max_inner_size, min_tile_size

__all__ = ["AxisOption", "TilePlan", "axis_options", "chunk_for_tile", "plan_tiles"]


@dataclass(frozen=True)
class AxisOption:
    """One way to tile an axis: ``n`` tiles of ``tile`` voxels (inner regions of whole ``chunk`` s)."""

    tile: int
    n: int
    chunk: int | None = None

    @property
    def cost(self) -> int:
        """Voxels processed along the axis."""
        return self.n * self.tile


@dataclass(frozen=True)
class TilePlan:
    """The chosen tiling of an image (see :func:`plan_tiles`)."""

    image_shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    """The tile per axis (never larger than the padded image)."""
    grid: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...]
    chunks: tuple[int, ...] | None
    """Output chunk per axis (``chunked=True``): inner regions are unions of these."""
    fits: bool
    """False when even the smallest valid tile exceeds ``max_tile_voxels`` (the plan uses it anyway)."""

    @property
    def n_tiles(self) -> int:
        return math.prod(self.grid)

    @property
    def overhead(self) -> float:
        """Voxels processed / image voxels (1.0 is one whole-image forward)."""
        padded = (ceil_to(s, d) for s, d in zip(self.image_shape, self.divisor, strict=True))
        processed = math.prod(n * min(t, p) for n, t, p in zip(self.grid, self.tile_shape, padded, strict=True))
        return processed / math.prod(self.image_shape)

    def describe(self) -> str:
        return (
            f"{self.n_tiles} tile(s) {'x'.join(map(str, self.grid))} of {'x'.join(map(str, self.tile_shape))} "
            f"(halo {'x'.join(map(str, self.halo))}), overhead {self.overhead:.2f}x"
        )


def _count(size: int, tile: int, halo: int, divisor: int, chunk: int | None) -> int | None:
    try:
        return AxisTiling.create(size, tile, halo, divisor, chunk).n
    except ValueError:  # the chunk cannot be owned whole with this tile
        return None


def chunk_for_tile(size: int, tile: int, halo: int, divisor: int) -> AxisOption | None:
    """The output chunk (multiple of ``divisor``) with which ``tile`` needs the fewest tiles along an axis.

    Candidates: :func:`~tilenorm_bmz.tiling.blocks.max_inner_size` (works for any number of tiles) and the
    chunks that split the axis into ``k`` equal parts for the tile counts between what the unchunked
    tiling needs and what ``max_inner_size`` needs (e.g. two tiles of 120 with halo 24 own chunks of 96 of
    a 192 axis, more than ``max_inner_size`` = 72 allows for interior tiles). Ties go to the larger chunk.
    None when no chunk works.
    """
    padded = ceil_to(size, divisor)
    if tile >= padded:
        return AxisOption(padded, 1, size)
    candidates = set()
    largest = max_inner_size(tile, halo, divisor)
    if largest >= divisor:
        candidates.add(largest)
    k_lo = max(2, -(-size // max(1, tile - halo)))
    k_hi = -(-size // largest) if largest >= divisor else k_lo + 4
    for k in range(k_lo, min(k_hi, k_lo + 8) + 1):
        c = ceil_to(-(-size // k), divisor)
        if divisor <= c <= tile - halo:
            candidates.add(c)
    best: AxisOption | None = None
    for c in sorted(candidates, reverse=True):
        n = _count(size, tile, halo, divisor, c)
        if n is not None and (best is None or n < best.n):
            best = AxisOption(tile, n, c)
    return best


def axis_options(size: int, halo: int, divisor: int, *, chunked: bool = False) -> list[AxisOption]:
    """Pareto-optimal ways to tile one axis, by increasing tile: each processes fewer voxels than every
    smaller tile (the first is the smallest valid tile, the last covers the padded axis in one tile)."""
    padded = ceil_to(size, divisor)
    smallest = min_tile_size(halo, divisor)
    if padded <= smallest:  # one tile; a Tiling shrinks it to the padded axis, but it is never below this
        return [AxisOption(smallest, 1, size if chunked else None)]
    options: list[AxisOption] = []
    t = smallest
    while True:
        if chunked:
            opt = chunk_for_tile(size, t, halo, divisor)
        else:
            opt = AxisOption(t, AxisTiling.create(size, t, halo, divisor).n)
        if opt is not None and (not options or opt.cost < options[-1].cost):
            options.append(opt)
        if t >= padded:
            return options
        t = min(t + divisor, padded)


def plan_tiles(
    image_shape: Sequence[int],
    halo: Sequence[int],
    divisor: Sequence[int],
    max_tile_voxels: float,
    *,
    chunked: bool = False,
) -> TilePlan:
    """The tile shape with the fewest processed voxels whose volume is at most ``max_tile_voxels``.

    Examples
    --------
    >>> plan_tiles((192, 192, 192), (24, 24, 24), (4, 4, 4), 130**3).tile_shape
    (120, 120, 120)
    """
    shape = tuple(int(s) for s in image_shape)
    hal, div = tuple(int(h) for h in halo), tuple(int(d) for d in divisor)
    dims = len(shape)
    options = [axis_options(s, h, d, chunked=chunked) for s, h, d in zip(shape, hal, div, strict=True)]
    *head, last = options
    last_tiles = [o.tile for o in last]
    best: tuple[tuple[int, int], tuple[AxisOption, ...]] | None = None
    for combo in itertools.product(*head):
        volume = math.prod(o.tile for o in combo)
        room = max_tile_voxels / volume
        i = bisect.bisect_right(last_tiles, room) - 1  # the largest last-axis tile that fits: the cheapest
        if i < 0:
            continue
        choice = (*combo, last[i])
        key = (math.prod(o.cost for o in choice), math.prod(o.n for o in choice))
        if best is None or key < best[0]:
            best = (key, choice)
    fits = best is not None
    chosen = best[1] if best is not None else tuple(o[0] for o in options)  # the smallest valid tile
    return TilePlan(
        image_shape=shape,
        tile_shape=tuple(o.tile for o in chosen),
        grid=tuple(o.n for o in chosen),
        halo=hal,
        divisor=div,
        chunks=tuple(int(o.chunk) for o in chosen if o.chunk is not None) if chunked else None,
        fits=fits and dims > 0,
    )
