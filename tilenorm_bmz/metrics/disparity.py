"""Train/eval disparity: how much a network's prediction changes when its normalization runs in train mode.

BatchNorm trained with tiny batches learns with batch statistics but is evaluated with running
statistics that differ from them; the network then segments differently in eval mode. BatchRenorm trains
against the running statistics, so its disparity is (near) zero. Definition (exact)::

    disparity[c] = 1 - dice(P_train_c > t, P_eval_c > t)

over the same tiles, where ``P_train`` is predicted with the normalization layers (only) in train mode,
all other layers (Dropout, ...) in eval mode, under ``no_grad``. Dice is pooled over all tiles.

Which layers count: every module holding ``running_mean`` and ``running_var`` buffers, i.e. BatchNorm
(with running statistics), SyncBatchNorm, InstanceNorm with ``track_running_stats=True``,
:class:`~tilenorm_bmz.norm.BatchRenorm` and third-party renorm layers. GroupNorm, LayerNorm and
InstanceNorm without running statistics compute the same in both modes (they are listed, not measured).

State: a train-mode forward pass updates the running statistics. Every buffer of the model (running
statistics, ``num_batches_tracked``, BatchRenorm's ``r_max``/``d_max``) is snapshotted and written back,
in place, after *every* batch (so each batch sees the model's real statistics and the result does not
depend on the batch order) and every module's mode is restored at the end: the model's
``state_dict`` is bit-identical before and after. The BatchRenorm schedule step is the trainer's global
step, kept outside the model; forward passes never advance it.

TorchScript: scripted modules keep the train/eval semantics (``self.training`` is an attribute) and are
measured like any module. A *traced* module has its mode frozen at trace time: switching to train mode
changes nothing, which is detected (no running statistic moves during the train-mode pass) and reported
as not applicable rather than as a disparity of zero.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Unpack

import numpy as np
import torch
from pydantic import Field, computed_field
from torch import Tensor, nn

from ._common import (
    ArrayLike,
    MetricResult,
    RunContext,
    RunOptions,
    as_numpy,
    as_spatial_tuple,
    model_divisor,
    on_device,
    predict_batched,
    resolve_device,
    round_down,
    run_context,
    track,
)
from .dice import binarize

__all__ = [
    "DEFAULT_DISPARITY_TILE",
    "DisparityFigure",
    "DisparityResult",
    "norm_layers",
    "train_eval_disparity",
]

logger = logging.getLogger(__name__)

#: Default tile edge for sampled tiles (clipped to the image).
DEFAULT_DISPARITY_TILE = 192

_MODE_INDEPENDENT = {
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LocalResponseNorm",
    "RMSNorm",
    "BatchNorm1d",  # only when they have no running statistics (track_running_stats=False)
    "BatchNorm2d",
    "BatchNorm3d",
}


def _type_name(m: nn.Module) -> str:
    # ScriptModules keep the Python class name in ``original_name``
    return str(getattr(m, "original_name", None) or type(m).__name__)


def _has_running_stats(m: nn.Module) -> bool:
    bufs = dict(m.named_buffers(recurse=False))
    return bufs.get("running_mean") is not None and bufs.get("running_var") is not None


def norm_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(mode_dependent, mode_independent)`` normalization layers of ``model`` as ``(name, module)``.

    Mode-dependent layers hold running statistics (they normalize differently in train and eval mode);
    mode-independent ones are the usual per-sample/per-group norms, which compute the same in both.
    """
    dependent, independent = [], []
    for name, m in model.named_modules():
        if _has_running_stats(m):
            dependent.append((name, m))
        elif _type_name(m) in _MODE_INDEPENDENT:
            independent.append((name, m))
    return dependent, independent


@dataclass(frozen=True, eq=False)
class DisparityFigure:
    """2D planes of the tile with the largest disparity (for the report; not part of the JSON).

    ``input`` is ``(rows, cols)`` (first input channel); ``eval``/``train`` are ``(C_out, rows, cols)``.
    """

    input: np.ndarray
    eval: np.ndarray
    train: np.ndarray
    tile_index: int
    channel: int
    plane: str


class DisparityResult(MetricResult):
    """Result of :func:`train_eval_disparity`."""

    applicable: bool
    """False when the model has no normalization that behaves differently in train mode."""
    reason: str = ""
    """Why the measurement is not applicable (empty when it is)."""
    disparity: list[float] | None = None
    """Per output channel ``1 - dice(P_train, P_eval)``, pooled over all tiles (probability outputs), or
    ``mean |P_train - P_eval| / range(P_eval)`` (regression outputs, ``output == "regression"``)."""
    output: Literal["probability", "regression"] = "probability"
    """How the outputs were compared: binarized at ``threshold`` (Dice) or as values relative to their range."""
    max_abs_diff: float | None = None
    """``max |P_train - P_eval|`` over all tiles, channels and voxels."""
    per_tile: list[list[float]] = Field(default_factory=list)
    """``1 - dice`` (regression: the relative mean difference) per tile (outer) and channel (inner)."""
    threshold: float
    tile_shape: tuple[int, ...]
    n_tiles: int
    batch_size: int
    n_batches: int
    origins: list[tuple[int, ...]] | None = None
    """Tile starts in the image (None when the tiles were given)."""
    seed: int | None = None
    batch_composition: str
    """How the tiles were grouped into batches, in words (part of what was measured)."""
    norm_layers: dict[str, int] = Field(default_factory=dict)
    """Mode-dependent normalization layers by type (measured)."""
    mode_independent_norm_layers: dict[str, int] = Field(default_factory=dict)
    renorm_limits: list[tuple[float, float]] = Field(default_factory=list)
    """Distinct ``(r_max, d_max)`` of the BatchRenorm layers at measurement time."""
    renorm_clipped: list[float] | None = None
    """Per tile, the fraction of BatchRenorm channels (over all layers whose limits allow a correction) whose
    ``r`` or ``d`` hit its clipping limit in train mode: high when the data's statistics are far from the
    training data's (a data shift), low when only the running statistics are off. None without such layers."""
    device: str
    figure: DisparityFigure | None = Field(default=None, exclude=True, repr=False)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def max_disparity(self) -> float | None:
        """The largest per-channel disparity (None when not applicable)."""
        return max(self.disparity) if self.disparity else None


def _sample_tiles(
    image: np.ndarray, tile_shape: tuple[int, ...], n_tiles: int, seed: int
) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    rng = np.random.default_rng(seed)
    spatial = image.shape[1:]
    origins = [
        tuple(int(rng.integers(0, s - t + 1)) for s, t in zip(spatial, tile_shape, strict=True))
        for _ in range(n_tiles)
    ]
    tiles = [
        image[(slice(None), *(slice(o, o + t) for o, t in zip(org, tile_shape, strict=True)))]
        for org in origins
    ]
    return tiles, origins


def _resolve_tile_shape(
    spatial: tuple[int, ...], tile_shape: int | Sequence[int] | None, divisor: tuple[int, ...]
) -> tuple[int, ...]:
    dims = len(spatial)
    wanted = as_spatial_tuple(
        tile_shape if tile_shape is not None else DEFAULT_DISPARITY_TILE, dims, "tile_shape"
    )
    out = []
    for a, (w, s, d) in enumerate(zip(wanted, spatial, divisor, strict=True)):
        t = round_down(min(w, s), d)
        if t < 1:
            raise ValueError(f"image axis {a} has {s} voxels, fewer than the network divisor {d}")
        if t != w and tile_shape is not None:
            logger.warning(
                "disparity tile size %d on axis %d changed to %d (image size %d, divisor %d)", w, a, t, s, d
            )
        out.append(t)
    return tuple(out)


def _planes(x: np.ndarray, index: int | None) -> tuple[np.ndarray, str]:
    """``(C, *s)`` -> ``(C, rows, cols)``: 3D tiles are cut at ``index`` along the first axis."""
    if x.ndim == 2:
        return x[:, None, :], "the whole tile"
    if x.ndim == 3:
        return x, "the whole tile"
    idx = x.shape[1] // 2 if index is None else index
    sub = x[:, idx]
    while sub.ndim > 3:
        sub = sub[:, sub.shape[1] // 2]
    return sub, f"plane axis 0 = {idx}"


def train_eval_disparity(
    model: nn.Module,
    data: ArrayLike | Sequence[ArrayLike],
    *,
    batch_size: int = 1,
    n_tiles: int = 4,
    tile_shape: int | Sequence[int] | None = None,
    seed: int = 0,
    output: Literal["probability", "regression"] = "probability",
    context: RunContext | None = None,
    **options: Unpack[RunOptions],
) -> DisparityResult:
    """Measure train/eval disparity ``1 - dice(P_train, P_eval)`` per output channel.

    For a regression output (denoising, restoration: values, not probabilities) the disparity is
    ``mean |P_train - P_eval| / (max P_eval - min P_eval)`` per channel instead, over all tiles.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` (also a scripted one). It is moved to ``device`` and back; its buffers and
        modes are restored bit-identically.
    data
        Either one image ``(C, *spatial)`` from which ``n_tiles`` tiles of ``tile_shape`` are sampled
        uniformly at random (``seed``), or a sequence of tiles ``(C, *tile)`` of equal shape (pass
        ``list(stack)`` for a stacked array).
    batch_size
        Tiles per forward pass. In train mode BatchNorm normalizes with the statistics of the batch, so
        this is part of the measurement (one tile per batch by default, like 3D training with batch 1); the
        context's batch size does not change it.
    n_tiles, tile_shape, seed
        Tile sampling from an image (default tile: 192 per axis, clipped to the image, rounded down to
        the network divisor).
    output
        ``probability`` (binarized at the threshold, Dice) or ``regression`` (relative mean difference).
    context, options
        How it runs (:class:`~tilenorm_bmz.metrics.RunContext`: device, the network's size multiple per axis
        (default ``model.divisor`` or 1), the binarization threshold, a progress bar over the batches); keyword
        options override the context's fields.

    Returns
    -------
    DisparityResult
        Per-channel disparity, per-tile values, the batch composition, the layers measured.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"train_eval_disparity needs a torch.nn.Module (it switches the normalization to train mode), "
            f"got {type(model).__name__}"
        )
    ctx = run_context(context, options)
    threshold, divisor, progress = ctx.threshold, ctx.divisor, ctx.progress
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(ctx.device)

    origins: list[tuple[int, ...]] | None
    if isinstance(data, np.ndarray | Tensor):
        img = as_numpy(data, "image").astype(np.float32, copy=False)
        if img.ndim < 2:
            raise ValueError(f"image must be (C, *spatial), got shape {img.shape}")
        if n_tiles < 1:
            raise ValueError(f"n_tiles must be >= 1, got {n_tiles}")
        div = model_divisor(model, img.ndim - 1, divisor)
        tshape = _resolve_tile_shape(img.shape[1:], tile_shape, div)
        tiles, origins = _sample_tiles(img, tshape, n_tiles, seed)
        source = (
            f"{n_tiles} tile(s) sampled uniformly at random (seed {seed}) from an image of shape {img.shape}"
        )
    else:
        tiles = [as_numpy(t, "tile").astype(np.float32, copy=False) for t in data]
        if not tiles:
            raise ValueError("no tiles given")
        shapes = {t.shape for t in tiles}
        if len(shapes) != 1:
            raise ValueError(f"all tiles must have the same shape, got {sorted(shapes)}")
        tshape, origins, n_tiles = tiles[0].shape[1:], None, len(tiles)
        source = f"{n_tiles} given tile(s)"
    n_batches = -(-n_tiles // batch_size)
    last = n_tiles - (n_batches - 1) * batch_size
    composition = (
        f"{n_batches} batch(es) of {batch_size} tile(s) of shape {tuple(tshape)}"
        + (f" (the last one has {last})" if last != batch_size else "")
        + f"; {source}; running statistics restored after every batch"
    )

    dependent, independent = norm_layers(model)
    common = {
        "threshold": threshold,
        "output": output,
        "tile_shape": tuple(tshape),
        "n_tiles": n_tiles,
        "batch_size": batch_size,
        "n_batches": n_batches,
        "origins": origins,
        "seed": seed if origins is not None else None,
        "batch_composition": composition,
        "norm_layers": dict(Counter(_type_name(m) for _, m in dependent)),
        "mode_independent_norm_layers": dict(Counter(_type_name(m) for _, m in independent)),
        "renorm_limits": sorted(
            {
                (float(m.r_max), float(m.d_max))
                for _, m in dependent
                if isinstance(getattr(m, "r_max", None), Tensor)
                and isinstance(getattr(m, "d_max", None), Tensor)
            }
        ),
        "device": str(dev),
    }
    if not dependent:
        return DisparityResult(
            applicable=False,
            reason="no normalization layer with running statistics: train and eval mode compute the same",
            **common,
        )

    x = torch.from_numpy(np.ascontiguousarray(np.stack(tiles)))
    renorm = [m for _, m in dependent if _limits_allow_correction(m)]
    clipped_batches: list[float] = []
    modes = [(m, m.training) for m in model.modules()]
    inter = total = None
    per_tile: list[list[float]] = []
    max_abs = 0.0
    abs_sum: Tensor | None = None  # regression: per channel sum |P_train - P_eval|, voxel count, P_eval range
    n_voxels = 0
    lo: Tensor | None = None
    hi: Tensor | None = None
    tile_abs: list[list[float]] = []
    worst: tuple[float, float] = (-1.0, -1.0)  # (1 - dice, max |difference|) of the figure's tile
    figure: DisparityFigure | None = None
    moved = False
    with on_device(model, dev):
        # snapshot after the move: moving a module replaces its buffer tensors
        buffers = [(b, b.detach().clone()) for b in model.buffers()]

        def restore_buffers() -> None:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

        try:
            with torch.no_grad():
                for start in track(range(0, n_tiles, batch_size), "train/eval disparity", progress):
                    xb = x[start : start + batch_size]
                    model.eval()
                    p_eval = predict_batched(model, xb, batch_size, dev)
                    for _, m in dependent:
                        m.train()
                    counts: list[tuple[int, int]] = []
                    with _clip_counting(renorm, counts):
                        p_train = predict_batched(model, xb, batch_size, dev)
                    if renorm:
                        hit, seen = (sum(c[i] for c in counts) for i in (0, 1))
                        clipped_batches.extend([hit / max(1, seen)] * len(xb))
                    moved = moved or any(not torch.equal(b, saved) for b, saved in buffers)
                    restore_buffers()
                    spatial = tuple(range(2, p_eval.dim()))
                    be, bt = binarize(p_eval, threshold), binarize(p_train, threshold)
                    i_tile = (be & bt).sum(dim=spatial, dtype=torch.float64)
                    s_tile = be.sum(dim=spatial, dtype=torch.float64) + bt.sum(
                        dim=spatial, dtype=torch.float64
                    )
                    d_tile = torch.where(
                        s_tile > 0, 2 * i_tile / s_tile.clamp_min(1), torch.ones_like(s_tile)
                    )
                    inter = i_tile.sum(0) if inter is None else inter + i_tile.sum(0)
                    total = s_tile.sum(0) if total is None else total + s_tile.sum(0)
                    diff = (p_train - p_eval).abs()
                    max_abs = max(max_abs, float(diff.max()))
                    rows = (1.0 - d_tile).tolist()
                    if output == "regression":
                        mean_t = diff.mean(dim=spatial, dtype=torch.float64)  # (k, C)
                        tile_abs.extend(mean_t.tolist())
                        part = diff.sum(dim=(0, *spatial), dtype=torch.float64)
                        abs_sum = part if abs_sum is None else abs_sum + part
                        n_voxels += diff[:, 0].numel()
                        mn, mx = p_eval.amin(dim=(0, *spatial)).double(), p_eval.amax(dim=(0, *spatial)).double()
                        lo = mn if lo is None else torch.minimum(lo, mn)
                        hi = mx if hi is None else torch.maximum(hi, mx)
                        rows = mean_t.tolist()  # the figure shows the tile with the largest mean difference
                    for j, row in enumerate(rows):
                        per_tile.append(row)
                        score = (max(row), float(diff[j].max()))  # Dice first, then the raw difference
                        if score > worst:
                            worst = score
                            figure = _make_figure(
                                xb[j].numpy(), p_eval[j], p_train[j], diff[j], start + j, row
                            )
        finally:
            restore_buffers()
            for m, training in modes:
                m.training = training

    if not moved:
        return DisparityResult(
            applicable=False,
            reason=(
                "switching the normalization layers to train mode changed no running statistic: the mode is "
                "frozen (e.g. a traced TorchScript module), so train mode cannot be emulated"
            ),
            **common,
        )
    assert inter is not None and total is not None
    pooled = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    values = (1.0 - pooled).tolist()
    if output == "regression":
        assert abs_sum is not None and lo is not None and hi is not None
        span = (hi - lo).clamp_min(1e-12)
        values = (abs_sum / n_voxels / span).tolist()
        per_tile = [[v / float(r) for v, r in zip(row, span.tolist(), strict=True)] for row in tile_abs]
    return DisparityResult(
        applicable=True,
        disparity=values,
        max_abs_diff=max_abs,
        per_tile=per_tile,
        figure=figure,
        renorm_clipped=clipped_batches or None,
        **common,
    )


def _limits_allow_correction(m: nn.Module) -> bool:
    """A BatchRenorm layer whose limits let it correct the batch statistics (r_max > 1 or d_max > 0)."""
    if isinstance(m, torch.jit.ScriptModule):  # no Python hooks on compiled modules
        return False
    r, d = getattr(m, "r_max", None), getattr(m, "d_max", None)
    return isinstance(r, Tensor) and isinstance(d, Tensor) and (float(r) > 1.0 or float(d) > 0.0)


@contextlib.contextmanager
def _clip_counting(layers: Sequence[nn.Module], counts: list[tuple[int, int]]) -> Iterator[None]:
    """Count, per forward of each BatchRenorm layer in ``layers``, the channels whose ``r`` or ``d`` clip
    (computed from the layer's input as its train-mode forward does, before its running statistics move)."""
    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        sigma_r = (m.running_var.float() + m.eps).sqrt()
        r = (var + m.eps).sqrt() / sigma_r
        d = (mean - m.running_mean.float()) / sigma_r
        r_max, d_max = float(m.r_max), float(m.d_max)
        hit = (r > r_max) | (r < 1.0 / r_max) | (d.abs() > d_max)
        counts.append((int(hit.sum()), int(hit.numel())))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _make_figure(
    tile: np.ndarray, p_eval: Tensor, p_train: Tensor, diff: Tensor, index: int, row: list[float]
) -> DisparityFigure:
    channel = int(np.argmax(row)) if max(row) > 0 else int(diff.flatten(1).amax(1).argmax())
    plane_index = None
    if diff.dim() == 4:  # (C, Z, Y, X): the z plane with the largest difference
        plane_index = int(diff[channel].flatten(1).sum(1).argmax())
    inp, where = _planes(tile[:1], plane_index)
    pe, _ = _planes(p_eval.cpu().numpy(), plane_index)
    pt, _ = _planes(p_train.cpu().numpy(), plane_index)
    return DisparityFigure(
        input=np.array(inp[0]),
        eval=np.array(pe),
        train=np.array(pt),
        tile_index=index,
        channel=channel,
        plane=where,
    )
