"""Tile mismatch (Buglakova et al. 2025, Fig. 3): do two overlapping tiles agree where they overlap?

Protocol (exact; see ``ARCHITECTURE.md``, "Metrics")::

    crop (grid over the image, stride 64)         long axis ->
    |<------------------------- tile + offset ------------------------->|
    |<---------------- tile 1 ---------------->|
                         |<---------------- tile 2 ---------------->|
                         |<----- overlap ----->|
                         | halo |  valid | halo|

Each crop is split along its long axis into two tiles of ``tile`` voxels whose starts differ by
``offset``. Each tile is predicted on its own, in eval mode. In the overlap, ``halo`` voxels next to
each tile's inner border are dropped; on the rest (the *valid* overlap) the two predictions are compared:

- ``max_dist = max |O1 - O2|`` over all crops, channels and voxels;
- ``mismatch[c] = mean over crops of (1 - dice(O1_c > t, O2_c > t))``.

A tile-local network (BatchNorm/BatchRenorm in eval mode, halo >= its receptive field) gives
``max_dist == 0``: the paper reports "no" tile mismatch. Tile-wise normalization (InstanceNorm,
GroupNorm, per-tile input normalization) gives ``max_dist > 0``. The metric is only meaningful on an
image normalized globally (the same normalization for both tiles).

Defaults are the paper's: crops of 192 x 192 x 288 (3D) or 192 x 288 (2D), stride 64, tiles of 192 with
offset 96, the long axis being the image's largest axis. Sizes are rounded down to the network's
divisor and scaled down (with a warning and ``geometry.scaled_down``) when the image is smaller.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import torch
from pydantic import Field, computed_field

from ._common import (
    ArrayLike,
    MetricResult,
    Predictor,
    RunContext,
    RunOptions,
    as_numpy,
    as_spatial_tuple,
    ceil_to,
    eval_mode,
    model_divisor,
    on_device,
    predict_batched,
    resolve_device,
    round_down,
    run_context,
    track,
)
from .dice import binarize, dice_torch

__all__ = [
    "DEFAULT_STRIDE",
    "DEFAULT_TILE",
    "MismatchFigure",
    "MismatchGeometry",
    "TileMismatchResult",
    "mismatch_geometry",
    "tile_mismatch",
]

logger = logging.getLogger(__name__)

#: The paper's tile length (both tiles) and crop extent on the short axes.
DEFAULT_TILE = 192
#: The paper's crop grid stride.
DEFAULT_STRIDE = 64


class MismatchGeometry(MetricResult):
    """Where the crops and tiles of a tile-mismatch measurement are (all in voxels)."""

    image_shape: tuple[int, ...]
    """Spatial shape of the image."""
    crop_shape: tuple[int, ...]
    """Spatial shape of every crop (``tile + offset`` on the long axis)."""
    long_axis: int
    """Spatial axis along which each crop is split into two tiles."""
    tile: int
    """Length of both tiles along the long axis."""
    offset: int
    """Start of tile 2 relative to tile 1 along the long axis (a multiple of the divisor)."""
    halo: int
    """Voxels dropped next to each tile's inner border inside the overlap."""
    divisor: tuple[int, ...]
    stride: tuple[int, ...]
    valid: tuple[int, int]
    """``[start, stop)`` of the compared (valid) overlap along the long axis, in crop coordinates."""
    origins: list[tuple[int, ...]]
    """Start of every crop that is measured."""
    n_crops_grid: int
    """Crops of the full grid (more than ``len(origins)`` when ``max_crops`` thinned it)."""
    scaled_down: bool
    """The paper's default sizes did not fit the image and were reduced."""
    adjustments: list[str]
    """Every change made to the requested sizes, in words (also logged as warnings)."""

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """Spatial shape of each of the two tiles."""
        shape = list(self.crop_shape)
        shape[self.long_axis] = self.tile
        return tuple(shape)


@dataclass(frozen=True, eq=False)
class MismatchFigure:
    """2D planes through the crop with the largest mismatch (for the report; not part of the JSON).

    Arrays have the long axis last: ``input`` is ``(rows, tile + offset)`` (first input channel),
    ``tile1``/``tile2`` are ``(C_out, rows, tile)``; tile 2 starts at ``offset`` in crop coordinates.
    """

    input: np.ndarray
    tile1: np.ndarray
    tile2: np.ndarray
    offset: int
    valid: tuple[int, int]
    channel: int
    crop_origin: tuple[int, ...]
    plane: str
    """Which plane of the crop is shown, in words."""

    @property
    def overlap_difference(self) -> np.ndarray:
        """``|tile1 - tile2|`` over the whole overlap, ``(C_out, rows, tile - offset)``."""
        width = self.tile1.shape[-1] - self.offset
        return np.abs(self.tile1[..., self.offset :] - self.tile2[..., :width])


class TileMismatchResult(MetricResult):
    """Result of :func:`tile_mismatch`."""

    geometry: MismatchGeometry
    threshold: float
    max_dist: float
    """``max |O1 - O2|`` over all crops, channels and valid overlap voxels."""
    mismatch: list[float]
    """Per output channel: mean over crops of ``1 - dice(O1_c, O2_c)``."""
    max_dist_per_channel: list[float]
    output_range: list[float] | None = None
    """Per output channel, ``max - min`` of both tiles' predictions over the valid overlaps (the scale of a
    regression output)."""
    crop_max_dist: list[float]
    """``max |O1 - O2|`` of every crop, in the order of ``geometry.origins``."""
    worst_crop: tuple[int, ...]
    """Origin of the crop with the largest difference (the first crop when all are 0)."""
    worst_voxel: tuple[int, ...]
    """Image coordinates (spatial) of the largest difference."""
    worst_channel: int
    device: str
    batch_size: int
    figure: MismatchFigure | None = Field(default=None, exclude=True, repr=False)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def seamless(self) -> bool:
        """``max_dist == 0``: the paper's "no" tile mismatch."""
        return self.max_dist == 0.0

    @property
    def relative_max_dist(self) -> float | None:
        """``max |O1 - O2| / output range`` over channels (regression outputs are judged by it)."""
        if self.output_range is None:
            return None
        return max(d / max(r, 1e-12) for d, r in zip(self.max_dist_per_channel, self.output_range, strict=True))

    @property
    def verdict(self) -> str:
        """``"no"`` when seamless, else ``"yes"`` (tile mismatch present), as the paper's tables say."""
        return "no" if self.seamless else "yes"


def _last_argmax(values: Sequence[int]) -> int:
    best = max(values)
    return max(i for i, v in enumerate(values) if v == best)


def mismatch_geometry(
    image_shape: Sequence[int],
    *,
    halo: int | Sequence[int],
    divisor: int | Sequence[int] = 1,
    crop_shape: Sequence[int] | None = None,
    stride: int | Sequence[int] = DEFAULT_STRIDE,
    tile: int | None = None,
    offset: int | None = None,
    max_crops: int | None = None,
    tile_shape: Sequence[int] | None = None,
) -> MismatchGeometry:
    """Resolve the crops and tiles of :func:`tile_mismatch` for an image of spatial shape ``image_shape``.

    Parameters
    ----------
    image_shape
        Spatial shape of the image (no channel axis).
    halo
        Voxels dropped next to each tile's inner border (int or one per axis; the long axis' entry is used).
    divisor
        The network's size multiple per axis; tile, offset and crop sizes are rounded down to it.
    crop_shape
        Crop shape; its largest axis (the last of equal ones) is the long axis, split into ``tile`` and
        ``offset`` (default two thirds / one third). Default: ``tile`` on every axis and ``tile + offset``
        on the image's largest axis (192 x 192 x 288 in 3D, 192 x 288 in 2D).
    stride
        Grid stride between crops (int or one per axis).
    tile, offset
        Tile length and tile 2's start along the long axis (default 192 and ``tile // 2``). When neither
        ``tile`` nor ``crop_shape`` is given and the halo leaves no valid overlap, the tile is enlarged.
    max_crops
        Measure at most this many crops, evenly spread over the grid (all when None).
    tile_shape
        For a network that runs at one input size (a package's fixed size): both tiles have exactly this shape,
        nothing is scaled or rounded, and only the offset (default ``tile // 2`` along the axis with the most
        room beyond the tile) shrinks to fit the image, in multiples of the divisor. ``crop_shape`` and ``tile``
        are then not used.

    Raises
    ------
    ValueError
        When the image is too small for a valid overlap, or the sizes are inconsistent; the message says
        which sizes would work.
    """
    shape = tuple(int(s) for s in image_shape)
    dims = len(shape)
    if dims < 1 or min(shape) < 1:
        raise ValueError(f"image_shape must be a non-empty spatial shape, got {shape}")
    div = as_spatial_tuple(divisor, dims, "divisor")
    halos = as_spatial_tuple(halo, dims, "halo")
    if min(div) < 1:
        raise ValueError(f"divisor must be >= 1, got {div}")
    if min(halos) < 0:
        raise ValueError(f"halo must be >= 0, got {halos}")
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        logger.warning("tile mismatch: %s", msg)

    if tile_shape is not None:
        return _exact_geometry(shape, tuple(int(t) for t in tile_shape), halos, div, offset, stride, max_crops)
    user_sized = crop_shape is not None or tile is not None
    if crop_shape is not None:
        crop = list(as_spatial_tuple(crop_shape, dims, "crop_shape"))
        long_axis = _last_argmax(crop)
        length = crop[long_axis]
        if tile is None and offset is None:
            tile = round(2 * length / 3)
            offset = length - tile
        elif tile is None:
            tile = length - int(offset)  # type: ignore[arg-type]
        elif offset is None:
            offset = length - tile
        elif tile + offset != length:
            raise ValueError(
                f"crop_shape {tuple(crop)} has {length} voxels on its long axis but tile + offset = "
                f"{tile} + {offset} = {tile + offset}: give consistent values or only one of them"
            )
    else:
        long_axis = _last_argmax(shape)
        tile = DEFAULT_TILE if tile is None else int(tile)
        offset = tile // 2 if offset is None else int(offset)
        crop = [tile] * dims
    tile, offset = int(tile), int(offset)
    if not 0 < offset < tile:
        raise ValueError(
            f"need 0 < offset < tile so that the two tiles overlap, got tile={tile}, offset={offset}"
        )
    d, h = div[long_axis], halos[long_axis]

    # sizes the network accepts
    t, o = round_down(tile, d), max(round_down(offset, d), d)
    if (t, o) != (tile, offset):
        note(f"tile/offset {tile}/{offset} rounded to {t}/{o}: multiples of the network divisor {d}")
        tile, offset = t, o
    if not offset < tile:
        raise ValueError(
            f"tile {tile} leaves no overlap at offset {offset} with divisor {d}: use a tile >= {2 * d}"
        )
    for a in range(dims):
        if a != long_axis and crop[a] % div[a]:
            c = max(round_down(crop[a], div[a]), div[a])
            note(
                f"crop extent {crop[a]} on axis {a} rounded to {c}: a multiple of the network divisor "
                f"{div[a]}"
            )
            crop[a] = c

    # the valid overlap must not be empty
    if tile - offset - 2 * h < 1 and not user_sized:
        grown = ceil_to(2 * (2 * h + d), d)
        note(f"halo {h} leaves no valid overlap in tiles of {tile}: tile enlarged to {grown}")
        tile, offset = grown, max(round_down(grown // 2, d), d)

    # fit the image
    scaled = False
    for a in range(dims):
        if a != long_axis and crop[a] > shape[a]:
            c = round_down(shape[a], div[a])
            if c < 1:
                raise ValueError(
                    f"image axis {a} has {shape[a]} voxels, fewer than the network divisor {div[a]}"
                )
            note(f"crop extent {crop[a]} on axis {a} reduced to {c} to fit the image ({shape[a]} voxels)")
            crop[a], scaled = c, True
    if tile + offset > shape[long_axis]:
        f = shape[long_axis] / (tile + offset)
        t, o = round_down(int(tile * f), d), max(round_down(int(offset * f), d), d)
        if t - o - 2 * h < 1:
            # keeping the 2:1 ratio leaves no valid overlap: shrink the offset instead, keeping a valid
            # overlap of one divisor step
            o = round_down((shape[long_axis] - 2 * h - d) // 2, d)
            t = round_down(shape[long_axis] - o, d)
            if o < d or t - o - 2 * h < 1:
                need = 2 * h + 3 * d
                raise ValueError(
                    f"the image has {shape[long_axis]} voxels along axis {long_axis}, too few to measure "
                    f"tile mismatch with halo {h} and divisor {d}: two tiles offset by {d} with a valid "
                    f"overlap need >= {need} voxels; use a larger image or a smaller halo"
                )
        note(
            f"tiles {tile}/offset {offset} do not fit the image ({shape[long_axis]} voxels along axis "
            f"{long_axis}): scaled down to {t}/{o}"
        )
        tile, offset, scaled = t, o, True
    crop[long_axis] = tile + offset
    valid = (offset + h, tile - h)
    if valid[1] - valid[0] < 1:
        raise ValueError(
            f"halo {h} leaves no valid overlap between tiles of {tile} offset by {offset} (overlap "
            f"{tile - offset}): use tile >= {ceil_to(2 * (2 * h + d), d)} with offset = tile / 2, "
            "or a smaller halo"
        )

    return _grid(shape, crop, long_axis, tile, offset, h, div, stride, max_crops, valid, scaled, notes)


def _exact_geometry(shape: tuple[int, ...], tiles: tuple[int, ...], halos: tuple[int, ...], div: tuple[int, ...],
                    offset: int | None, stride: int | Sequence[int], max_crops: int | None) -> MismatchGeometry:
    """:func:`mismatch_geometry` for tiles of one fixed shape (see its ``tile_shape``)."""
    dims = len(shape)
    if len(tiles) != dims:
        raise ValueError(f"tile_shape {tiles} must have {dims} entries, one per spatial axis")
    room = [s - t for s, t in zip(shape, tiles, strict=True)]
    long_axis = _last_argmax(room)
    t, h, d = tiles[long_axis], halos[long_axis], div[long_axis]
    need = t + max(d, ceil_to(2 * h + 1, d))  # the smallest image with a valid overlap along the long axis
    if min(room) < 0 or room[long_axis] < need - t:
        size = "x".join(map(str, tiles))
        raise ValueError(
            f"the network runs on tiles of exactly {size}: two overlapping tiles (halo {h}, offset a multiple of "
            f"{d}) need an image of at least {need} voxels along one axis and the tile's size along the others, "
            f"got {'x'.join(map(str, shape))}"
        )
    want = round_down(t // 2 if offset is None else int(offset), d)
    o = max(d, min(want, round_down(room[long_axis], d), round_down(t - 2 * h - 1, d)))
    notes = [] if o == want else [f"offset {want} reduced to {o} to fit the image and leave a valid overlap"]
    crop = list(tiles)
    crop[long_axis] = t + o
    return _grid(shape, crop, long_axis, t, o, h, div, stride, max_crops, (o + h, t - h), False, notes)


def _grid(shape: tuple[int, ...], crop: list[int], long_axis: int, tile: int, offset: int, h: int,
          div: tuple[int, ...], stride: int | Sequence[int], max_crops: int | None, valid: tuple[int, int],
          scaled: bool, notes: list[str]) -> MismatchGeometry:
    dims = len(shape)
    strides = as_spatial_tuple(stride, dims, "stride")
    if min(strides) < 1:
        raise ValueError(f"stride must be >= 1, got {strides}")
    axes = [range(0, shape[a] - crop[a] + 1, strides[a]) for a in range(dims)]
    origins = [tuple(o_) for o_ in itertools.product(*axes)]
    n_grid = len(origins)
    if max_crops is not None:
        if max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {max_crops}")
        if n_grid > max_crops:
            idx = np.unique(np.linspace(0, n_grid - 1, max_crops).round().astype(int))
            origins = [origins[i] for i in idx]
            notes.append(f"measured {len(origins)} of {n_grid} crops (max_crops={max_crops}), evenly spread")
    return MismatchGeometry(
        image_shape=shape,
        crop_shape=tuple(crop),
        long_axis=long_axis,
        tile=tile,
        offset=offset,
        halo=h,
        divisor=div,
        stride=strides,
        valid=valid,
        origins=origins,
        n_crops_grid=n_grid,
        scaled_down=scaled,
        adjustments=notes,
    )


def _plane(arr: np.ndarray, long_axis: int, pos: Sequence[int]) -> tuple[np.ndarray, str]:
    """``(C, *s)`` -> ``(C, rows, long)``: for 3D the plane through ``pos`` on the first other axis."""
    moved = np.moveaxis(arr, long_axis + 1, -1)
    others = [a for a in range(arr.ndim - 1) if a != long_axis]
    if len(others) == 0:
        return moved[:, None, :], "the whole crop"
    if len(others) == 1:
        return moved, "the whole crop"
    # 3D (or more): fix every other axis but the last one at the position of the largest difference
    index = tuple(pos[a] for a in others[:-1])
    sub = moved[(slice(None), *index)]
    return sub, "plane " + ", ".join(f"axis {a} = {pos[a]}" for a in others[:-1])


def tile_mismatch(
    model: Predictor,
    image: ArrayLike,
    *,
    halo: int | Sequence[int],
    crop_shape: Sequence[int] | None = None,
    stride: int | Sequence[int] = DEFAULT_STRIDE,
    tile: int | None = None,
    offset: int | None = None,
    max_crops: int | None = None,
    tile_shape: Sequence[int] | None = None,
    context: RunContext | None = None,
    **options: Unpack[RunOptions],
) -> TileMismatchResult:
    """Measure tile mismatch as in the paper's Fig. 3.

    Parameters
    ----------
    model
        An ``nn.Module`` (run in eval mode on ``device``; its modes and device are restored afterwards) or
        a callable mapping a float32 tensor ``(N, C, *tile)`` to ``(N, C_out, *tile)``.
    image
        Globally normalized image ``(C, *spatial)`` (float32; numpy array or tensor).
    halo
        Voxels dropped next to each tile's inner border (the halo the network is tiled with).
    crop_shape, stride, tile, offset, max_crops
        Crop grid and tile split; see :func:`mismatch_geometry` (defaults: the paper's).
    tile_shape
        Tiles of exactly this shape, for a network that runs at one size (see :func:`mismatch_geometry`).
    context, options
        How it runs (:class:`~tilenorm_bmz.metrics.RunContext`: device, tiles per forward pass (default 2;
        tiles are independent in eval mode, so only speed and memory depend on it), the network's divisor
        (default ``model.divisor`` or 1), the Dice threshold, a progress bar over the crops); keyword options
        override the context's fields.

    Returns
    -------
    TileMismatchResult
        ``max_dist``, per-channel ``mismatch``, where the worst crop was, and a figure payload.

    Examples
    --------
    >>> from tilenorm_bmz.models import UNet
    >>> net = UNet(dims=2, features=4, depth=2, norm="batchnorm")
    >>> img = np.random.rand(1, 128, 256).astype("float32")
    >>> r = tile_mismatch(net, img, halo=24, tile=128, stride=128)
    >>> r.seamless
    True
    """
    ctx = run_context(context, options)
    batch_size, threshold, progress = ctx.batch(2), ctx.threshold, ctx.progress
    img = as_numpy(image, "image")
    if img.ndim < 2:
        raise ValueError(f"image must be (C, *spatial), got shape {img.shape}")
    if img.dtype != np.float32:
        img = img.astype(np.float32)
    dims = img.ndim - 1
    dev = resolve_device(ctx.device)
    geometry = mismatch_geometry(
        img.shape[1:],
        halo=halo,
        divisor=model_divisor(model, dims, ctx.divisor),
        crop_shape=crop_shape,
        stride=stride,
        tile=tile,
        offset=offset,
        max_crops=max_crops,
        tile_shape=tile_shape,
    )
    g = geometry
    la, tl, off = g.long_axis, g.tile, g.offset
    v0, v1 = g.valid
    spatial = tuple(range(2, dims + 2))
    x_all = torch.from_numpy(np.ascontiguousarray(img))

    crops_per_batch = max(1, batch_size // 2)
    groups = [g.origins[i : i + crops_per_batch] for i in range(0, len(g.origins), crops_per_batch)]
    crop_max: list[float] = []
    one_minus_dice: torch.Tensor | None = None
    chan_max: torch.Tensor | None = None
    out_lo: torch.Tensor | None = None
    out_hi: torch.Tensor | None = None
    worst: tuple[float, int] = (-1.0, 0)
    figure: MismatchFigure | None = None
    worst_voxel: tuple[int, ...] = ()
    worst_channel = 0

    with eval_mode(model), on_device(model, dev):
        for group in track(groups, "tile mismatch", progress):
            tiles = []
            for origin in group:
                sl = [slice(o, o + c) for o, c in zip(origin, g.crop_shape, strict=True)]
                crop = x_all[(slice(None), *sl)]
                tiles.append(crop.narrow(la + 1, 0, tl))
                tiles.append(crop.narrow(la + 1, off, tl))
            y = predict_batched(model, torch.stack(tiles), batch_size, dev)
            y1, y2 = y[0::2], y[1::2]
            a = y1.narrow(la + 2, v0, v1 - v0)
            b = y2.narrow(la + 2, v0 - off, v1 - v0)
            diff = (a - b).abs()
            per_chan = diff.amax(dim=spatial).double()  # (k, C)
            one_m_d = (1.0 - dice_torch(binarize(a, threshold), binarize(b, threshold), spatial)).sum(0)
            one_minus_dice = one_m_d if one_minus_dice is None else one_minus_dice + one_m_d
            cm = per_chan.amax(0)
            chan_max = cm if chan_max is None else torch.maximum(chan_max, cm)
            both = torch.cat([a, b])
            mn, mx = both.amin(dim=(0, *spatial)).double(), both.amax(dim=(0, *spatial)).double()
            out_lo = mn if out_lo is None else torch.minimum(out_lo, mn)
            out_hi = mx if out_hi is None else torch.maximum(out_hi, mx)
            for j, value in enumerate(per_chan.amax(1).tolist()):
                crop_max.append(value)
                if value > worst[0]:
                    worst = (value, len(crop_max) - 1)
                    flat = int(diff[j].argmax())
                    c, *pos = np.unravel_index(flat, tuple(diff[j].shape))
                    pos[la] += v0
                    origin = group[j]
                    worst_channel = int(c)
                    worst_voxel = tuple(int(o + p) for o, p in zip(origin, pos, strict=True))
                    figure = _make_figure(
                        x_all, origin, g, y1[j].cpu().numpy(), y2[j].cpu().numpy(), pos, worst_channel
                    )

    assert one_minus_dice is not None and chan_max is not None  # at least one crop always exists
    n = len(g.origins)
    return TileMismatchResult(
        geometry=g,
        threshold=threshold,
        max_dist=float(max(crop_max)),
        mismatch=(one_minus_dice / n).tolist(),
        max_dist_per_channel=chan_max.tolist(),
        output_range=None if out_lo is None or out_hi is None else (out_hi - out_lo).tolist(),
        crop_max_dist=crop_max,
        worst_crop=g.origins[worst[1]],
        worst_voxel=worst_voxel,
        worst_channel=worst_channel,
        device=str(dev),
        batch_size=batch_size,
        figure=figure,
    )


def _make_figure(
    x_all: torch.Tensor,
    origin: tuple[int, ...],
    g: MismatchGeometry,
    out1: np.ndarray,
    out2: np.ndarray,
    pos: Sequence[int],
    channel: int,
) -> MismatchFigure:
    sl = [slice(o, o + c) for o, c in zip(origin, g.crop_shape, strict=True)]
    crop_in = x_all[(slice(0, 1), *sl)].numpy()
    inp, where = _plane(crop_in, g.long_axis, pos)
    t1, _ = _plane(out1, g.long_axis, pos)
    t2, _ = _plane(out2, g.long_axis, pos)
    return MismatchFigure(
        input=np.array(inp[0]),
        tile1=np.array(t1),
        tile2=np.array(t2),
        offset=g.offset,
        valid=g.valid,
        channel=channel,
        crop_origin=tuple(origin),
        plane=where,
    )
