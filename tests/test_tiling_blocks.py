"""Block geometry: inner regions partition the image, tiles lie inside it on the divisor grid."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tilenorm_bmz.tiling import Tiling, max_inner_size, min_tile_size


def _configs(n: int, seed: int = 0) -> list[tuple]:
    """Random geometries, 1-3D, odd sizes, images smaller and larger than a tile, with and without chunks."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ndim = 1 + i % 3
        div = tuple(int(rng.choice([1, 2, 4, 8])) for _ in range(ndim))
        halo = tuple(int(rng.integers(0, 20)) for _ in range(ndim))
        tile = tuple(
            min_tile_size(h, d) + d * int(rng.integers(0, 6)) for h, d in zip(halo, div, strict=True)
        )
        shape = tuple(int(rng.integers(1, 3 * t + 7)) for t in tile)
        chunks = None
        if i % 2:
            inner = [max_inner_size(t, h, d) for t, h, d in zip(tile, halo, div, strict=True)]
            if min(inner) > 0:  # multiples of the divisor up to the largest inner size
                chunks = tuple(d * int(rng.integers(1, c // d + 1)) for c, d in zip(inner, div, strict=True))
        out.append((shape, tile, halo, div, chunks))
    return out


CONFIGS = _configs(300)


def _check_axis_invariants(t: Tiling) -> None:
    for a, ax in enumerate(t.axes):
        d, h, s, p = t.divisor[a], t.halo[a], t.image_shape[a], t.padded_shape[a]
        assert p % d == 0 and s <= p < s + d
        assert ax.tile == min(t.tile_shape[a], p)
        assert ax.bounds[0] == 0 and ax.bounds[-1] == s
        assert all(lo < hi for lo, hi in zip(ax.bounds, ax.bounds[1:], strict=False))
        assert len(set(ax.starts)) == len(ax.starts), f"duplicate tiles: {ax}"
        for i, start in enumerate(ax.starts):
            lo, hi = ax.inner(i)
            assert start % d == 0 and 0 <= start and start + ax.tile <= p
            assert start <= lo and hi <= start + ax.tile
            assert lo - start >= h or start == 0, "left halo missing away from the image border"
            assert start + ax.tile - hi >= h or start + ax.tile == p, (
                "right halo missing away from the border"
            )
            if t.chunks is not None:
                assert lo % t.chunks[a] == 0 and (hi % t.chunks[a] == 0 or hi == s)


@pytest.mark.parametrize("shape, tile, halo, div, chunks", CONFIGS)
def test_inner_regions_partition_the_image(shape, tile, halo, div, chunks):
    t = Tiling(shape, tile, halo, div, chunks)
    _check_axis_invariants(t)
    count = np.zeros(shape, dtype=np.int32)
    for b in t:
        count[b.inner] += 1
        assert b.tile_shape == t.effective_tile_shape
        # the local slice addresses the inner region inside the tile's output
        assert tuple(sl.stop - sl.start for sl in b.local) == b.inner_shape
        assert all(0 <= sl.start and sl.stop <= n for sl, n in zip(b.local, b.tile_shape, strict=True))
        # reading stays inside the image; padding completes the tile
        for r, (before, after), o, n in zip(b.read, b.pad, b.outer, shape, strict=True):
            assert before == 0 and 0 <= r.start < r.stop <= n
            assert (r.stop - r.start) + after == o.stop - o.start
    assert count.min() == 1 and count.max() == 1
    assert len(t) == math.prod(t.grid_shape) == len(t.blocks())


@pytest.mark.parametrize("size", [1, 7, 64, 65, 127, 128, 129, 300, 1001])
@pytest.mark.parametrize("tile, halo, div", [(64, 16, 4), (96, 24, 8), (48, 20, 4), (32, 0, 1)])
def test_fewest_tiles_when_halo_is_on_the_divisor_grid(size, tile, halo, div):
    """With halo a multiple of the divisor every interior tile owns tile - 2*halo: the minimal count."""
    t = Tiling((size,), tile, halo, div)
    padded = -(-size // div) * div
    expected = 1 if padded <= tile else 1 + math.ceil((padded - tile) / (tile - 2 * halo))
    assert len(t) == expected


def test_image_smaller_than_tile_is_one_tile_of_the_padded_image():
    t = Tiling((30, 41), 64, 24, 4)
    assert len(t) == 1
    (b,) = t.blocks()
    assert t.padded_shape == (32, 44) and b.tile_shape == (32, 44)
    assert b.inner == (slice(0, 30), slice(0, 41)) and b.pad == ((0, 2), (0, 3))


def test_last_tile_is_flush_with_the_padded_border():
    t = Tiling((130,), 64, 16, 4)
    assert t.axes[0].starts[-1] + 64 == t.padded_shape[0] == 132
    assert t.axes[0].starts[0] == 0


def test_chunked_inner_regions_are_whole_chunks():
    t = Tiling((256, 300), 128, 22, 4, chunks=(80, 40))
    for b in t:
        for sl, c, n in zip(b.inner, (80, 40), (256, 300), strict=True):
            assert sl.start % c == 0 and (sl.stop % c == 0 or sl.stop == n)


def test_chunk_too_large_for_the_tile_says_the_limit():
    with pytest.raises(ValueError, match=r"multiple of the divisor 4 and at most 80"):
        Tiling((400,), 128, 22, 4, chunks=96)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(tile_shape=62, halo=8, divisor=4),
            r"not a multiple of the network's size divisor 4: use 60 or 64",
        ),
        (
            dict(tile_shape=44, halo=22, divisor=4),
            r"smaller than 2\*halo \+ divisor = 2\*22 \+ 4 = 48: use a tile of at least 48",
        ),
        (dict(tile_shape=64, halo=-1, divisor=4), r"halo along Y must be >= 0"),
        (dict(tile_shape=(64, 64, 64), halo=8, divisor=4), r"tile_shape has 3 axes"),
    ],
)
def test_bad_geometry_says_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tiling((100, 100), **kwargs)


def test_smallest_valid_tile():
    assert min_tile_size(22, 4) == 48
    t = Tiling((100, 100), 48, 22, 4)  # exactly 2 * halo + divisor: every interior tile owns 4 voxels
    assert all(b.inner_shape[0] >= 1 for b in t)


def test_value_objects_are_frozen_hashable_and_pickle():
    t = Tiling((100, 130), 64, 16, 4)
    b = t.block((1, 2))
    with pytest.raises(AttributeError):
        t.halo = (0, 0)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        b.index = (0, 0)  # type: ignore[misc]
    assert hash(t) == hash(Tiling((100, 130), 64, 16, 4)) and t == Tiling((100, 130), 64, 16, 4)
    assert len({b, t.block((1, 2))}) == 1
    t2 = pickle.loads(pickle.dumps(t))
    assert t2 == t and t2.blocks() == t.blocks()


def test_overhead():
    t = Tiling((1000,), 100, 10, 4)
    assert t.theoretical_overhead == pytest.approx(100 / 80)
    assert t.overhead == pytest.approx(len(t) * 100 / 1000)
    assert Tiling((50, 50), 64, 8, 4).theoretical_overhead == 1.0  # one tile: no halo cost
