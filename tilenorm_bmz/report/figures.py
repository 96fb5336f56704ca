"""Report figures as PNG bytes (matplotlib, Agg canvas, no pyplot global state).

Each function takes a metric result (or its figure payload) and returns PNG bytes ready to be inlined
into the HTML report as a base64 ``data:`` URI.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..metrics import DisparityResult, SweepResult, TiledVsWholeResult, TileMismatchResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

    from ..tiling import RFReport

__all__ = [
    "disparity_figure",
    "receptive_field_figure",
    "seam_figure",
    "sweep_figure",
    "tile_mismatch_figure",
]

_DPI = 100
_TILE1 = "#1f77b4"
_TILE2 = "#ff7f0e"
_VALID = "#2ca02c"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _prob_range(*arrays: np.ndarray) -> tuple[float, float]:
    lo = min(float(np.min(a)) for a in arrays)
    hi = max(float(np.max(a)) for a in arrays)
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1.0


def _diff_image(ax: Axes, diff: np.ndarray, **kwargs: object) -> AxesImage:
    top = float(diff.max()) if diff.size else 0.0
    im = ax.imshow(
        diff, cmap="magma", vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="nearest", **kwargs
    )
    if top == 0.0:
        ax.text(
            0.5,
            0.5,
            "identical (difference 0)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="white",
            fontsize=10,
            fontweight="bold",
        )
    return im


def tile_mismatch_figure(result: TileMismatchResult) -> bytes | None:
    """The worst crop: input with both tiles, ``|O1 - O2|`` in the overlap, and both tile predictions.

    Every panel is in crop coordinates (x: the long axis), so each tile's prediction sits where it was cut.
    """
    f = result.figure
    if f is None:
        return None
    c = f.channel
    rows, width = f.input.shape
    tile = f.tile1.shape[-1]
    off, (v0, v1) = f.offset, f.valid
    panel_w = 4.6
    panel_h = float(np.clip(panel_w * rows / max(width, 1), 0.8, 4.0))
    fig = _new_figure(2 * panel_w + 1.4, 2 * panel_h + 1.4)
    top, bottom = fig.subfigures(2, 1)
    # top: the crop and the (narrower) overlap at the same scale; bottom: the two tiles side by side
    ax_in, ax_diff = top.subplots(1, 2, width_ratios=[width, max(tile - off, width // 3)])
    ax_t1, ax_t2 = bottom.subplots(1, 2)
    extent_rows = (rows, 0)
    vmin, vmax = _prob_range(f.tile1[c], f.tile2[c])

    im = ax_in.imshow(f.input, cmap="gray", extent=(0, width, *extent_rows), interpolation="nearest")
    ax_in.add_patch(Rectangle((0.5, 0.5), tile - 1, rows - 1, fill=False, ec=_TILE1, lw=2, label="tile 1"))
    ax_in.add_patch(
        Rectangle((off + 0.5, 1.5), tile - 1, rows - 3, fill=False, ec=_TILE2, lw=2, ls="--", label="tile 2")
    )
    ax_in.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax_in.set_title(f"input crop at {tuple(f.crop_origin)}", fontsize=10)
    fig.colorbar(im, ax=ax_in, shrink=0.9)

    diff = f.overlap_difference[c]
    valid_max = float(diff[:, v0 - off : v1 - off].max()) if v1 > v0 else 0.0
    im = _diff_image(ax_diff, diff, extent=(off, tile, *extent_rows))
    for x in (v0, v1):
        ax_diff.axvline(x, color=_VALID, ls="--", lw=1.5)
    ax_diff.set_xlim(off, tile)
    ax_diff.set_title(
        f"|tile 1 - tile 2|, channel {c}\noverlap max {float(diff.max()):.3g}\n"
        f"compared (dashed) max {valid_max:.3g}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax_diff, shrink=0.9)

    for ax, pred, start, name, color in (
        (ax_t1, f.tile1, 0, "tile 1", _TILE1),
        (ax_t2, f.tile2, off, "tile 2", _TILE2),
    ):
        im = ax.imshow(
            pred[c],
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            extent=(start, start + tile, *extent_rows),
            interpolation="nearest",
        )
        ax.set_xlim(0, width)
        ax.set_title(f"{name} prediction, channel {c}", fontsize=10, color=color)
        fig.colorbar(im, ax=ax, shrink=0.9)
    for ax in (ax_in, ax_diff, ax_t1, ax_t2):
        ax.tick_params(labelsize=8)
        ax.set_xlabel(f"crop voxel along axis {result.geometry.long_axis}", fontsize=8)
    if f.plane != "the whole crop":
        fig.suptitle(f.plane, fontsize=9)
    return _png(fig)


def disparity_figure(result: DisparityResult) -> bytes | None:
    """Input, eval and train-mode predictions of the tile with the largest disparity, and their difference."""
    f = result.figure
    if f is None:
        return None
    c = f.channel
    rows, cols = f.input.shape
    panel_w = 3.0
    fig = _new_figure(4 * panel_w + 1.0, float(np.clip(panel_w * rows / max(cols, 1), 1.2, 4.0)) + 0.9)
    axes = fig.subplots(1, 4)
    vmin, vmax = _prob_range(f.eval[c], f.train[c])
    axes[0].imshow(f.input, cmap="gray", interpolation="nearest")
    axes[0].set_title(f"input tile {f.tile_index}", fontsize=10)
    axes[1].imshow(f.eval[c], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    axes[1].set_title(f"eval mode, channel {c}", fontsize=10)
    im = axes[2].imshow(f.train[c], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    axes[2].set_title(f"train-mode normalization, channel {c}", fontsize=10)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    diff = np.abs(f.train[c] - f.eval[c])
    im = _diff_image(axes[3], diff)
    axes[3].set_title(f"|train - eval| (max {float(diff.max()):.3g})", fontsize=10)
    fig.colorbar(im, ax=axes[3], shrink=0.8)
    for a in axes:
        a.tick_params(labelsize=7)
    tile_value = result.per_tile[f.tile_index][c] if result.per_tile else float("nan")
    where = "" if f.plane == "the whole tile" else f" ({f.plane})"
    fig.suptitle(f"tile {f.tile_index}{where}: 1 - Dice of channel {c} = {tile_value:.3g}", fontsize=10)
    return _png(fig)


def seam_figure(results: Mapping[str, TiledVsWholeResult]) -> bytes | None:
    """One row per predictor: the seam map ``max_c |tiled - whole|``, the tiled and the whole prediction."""
    rows = [(name, r) for name, r in results.items() if r.figure is not None]
    if not rows:
        return None
    first = rows[0][1].figure
    assert first is not None
    h, w = first.seam_map.shape
    panel_w = 3.6
    panel_h = float(np.clip(panel_w * h / max(w, 1), 1.0, 4.0))
    fig = _new_figure(3 * panel_w + 1.2, len(rows) * (panel_h + 0.6) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    for i, (name, r) in enumerate(rows):
        f = r.figure
        assert f is not None
        im = _diff_image(axes[i, 0], f.seam_map)
        axes[i, 0].set_title(f"{name}\nseam map (max {r.max_abs_diff:.3g})", fontsize=9)
        fig.colorbar(im, ax=axes[i, 0], shrink=0.8)
        vmin, vmax = _prob_range(f.tiled, f.whole)
        axes[i, 1].imshow(f.tiled, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[i, 1].set_title(f"tiled, channel {f.channel}", fontsize=9)
        axes[i, 2].imshow(f.whole, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[i, 2].set_title(f"whole image, channel {f.channel}", fontsize=9)
        for a in axes[i]:
            a.tick_params(labelsize=7)
    if first.projection not in ("the whole image", "the whole (1D) image"):
        fig.suptitle(first.projection, fontsize=9)
    return _png(fig)


def _size_axis(shapes: Sequence[tuple[int, ...]]) -> tuple[list[float], str]:
    if all(len(set(s)) == 1 for s in shapes):
        return [float(s[0]) for s in shapes], "tile edge (voxels)"
    return [float(np.prod(s)) ** (1.0 / len(s)) for s in shapes], "tile size (geometric mean edge, voxels)"


def sweep_figure(result: SweepResult) -> bytes | None:
    """Score per channel over the tile size (the paper's Fig. 6) and the difference to the largest tile."""
    if not result.points:
        return None
    shapes = [p.tile_shape for p in result.points]
    x, xlabel = _size_axis(shapes)
    scores = np.array([p.score for p in result.points], dtype=float)
    fig = _new_figure(10.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for c in range(scores.shape[1]):
        ax1.plot(x, scores[:, c], marker="o", label=f"channel {c}")
    ax1.set_ylabel(f"Dice against {result.reference}", fontsize=9)
    low = float(min(scores.min(), 0.9))
    ax1.set_ylim(max(0.0, low - 0.02), 1.005)
    ax1.legend(fontsize=8)
    ax1.set_title("segmentation vs tile size", fontsize=10)
    diffs = [p.max_abs_diff_to_largest for p in result.points]
    ax2.plot(x, diffs, marker="s", color="#d62728")
    ax2.set_yscale("symlog", linthresh=1e-7)
    ax2.set_ylim(bottom=0.0)
    ax2.set_ylabel("max |p - p_largest tile|", fontsize=9)
    ax2.set_title("difference to the largest tile", fontsize=10)
    labels = ["x".join(map(str, s)) if len(set(s)) > 1 else str(s[0]) for s in shapes]
    for a in (ax1, ax2):
        a.set_xticks(x, labels, fontsize=8, rotation=30 if len(x) > 6 else 0)
        a.set_xlabel(xlabel, fontsize=9)
        a.grid(alpha=0.3)
    return _png(fig)


def receptive_field_figure(rf: RFReport, declared_halo: Sequence[int] | None = None) -> bytes | None:
    """``log10`` mean |d y_centre / d x| (the paper's Fig. 4) with the TRF, ERF and halo marked."""
    if getattr(rf, "mean_abs_gradient", None) is None or rf.dims < 2:
        return None
    img = rf.log_gradient()
    g = np.asarray(rf.mean_abs_gradient, dtype=np.float64)
    while g.ndim > 2:  # the plane log_gradient() shows
        g = g[g.shape[0] // 2]
    finite = img[g > 0]
    vmin = float(finite.min()) if finite.size else -30.0
    vmax = float(finite.max()) if finite.size else 0.0
    centre = [(s // 2 // d) * d for s, d in zip(rf.input_shape, rf.divisor, strict=True)]
    cy, cx = centre[-2], centre[-1]
    fig = _new_figure(10.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(np.clip(img, vmin, None), cmap="inferno", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax1, shrink=0.85, label="log10 mean |dy/dx|")

    def box(ax: Axes, r: Sequence[int], color: str, label: str, ls: str = "-") -> None:
        ry, rx = r[-2], r[-1]
        ax.add_patch(
            Rectangle(
                (cx - rx - 0.5, cy - ry - 0.5),
                2 * rx + 1,
                2 * ry + 1,
                fill=False,
                ec=color,
                lw=1.5,
                ls=ls,
                label=label,
            )
        )

    if rf.theoretical is not None:
        box(ax1, rf.theoretical, "white", f"TRF (one-sided {'x'.join(map(str, rf.theoretical))})")
    box(ax1, rf.erf99, "#17becf", f"ERF 99% (radius {'x'.join(map(str, rf.erf99))})", ls=":")
    if declared_halo is not None:
        box(ax1, declared_halo, "#2ca02c", f"declared halo {'x'.join(map(str, declared_halo))}", ls="--")
    ax1.legend(loc="lower left", fontsize=7, framealpha=0.8)
    plane = "" if rf.dims == 2 else f" (central plane of {rf.axes[0]})"
    ax1.set_title(f"log mean gradient of the centre voxel{plane}", fontsize=10)

    profile = img[cy]
    ax2.plot(np.arange(profile.size) - cx, profile, color="black", lw=1)
    ax2.set_ylim(vmin - 0.5, vmax + 0.5)
    if rf.theoretical is not None:
        for s in (-1, 1):
            ax2.axvline(s * rf.theoretical[-1], color="gray", ls="-", lw=1, label="TRF" if s == 1 else None)
    if declared_halo is not None:
        for s in (-1, 1):
            ax2.axvline(
                s * declared_halo[-1],
                color="#2ca02c",
                ls="--",
                lw=1,
                label="declared halo" if s == 1 else None,
            )
    ax2.set_xlabel(f"offset from the centre along {rf.axes[-1]} (voxels)", fontsize=9)
    ax2.set_title("log10 mean |dy/dx| through the centre", fontsize=10)
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    if rf.normalization_couples_tile:
        fig.suptitle(
            "normalization couples the tile: the gradient reaches the whole input", fontsize=10, color="#b00"
        )
    return _png(fig)
