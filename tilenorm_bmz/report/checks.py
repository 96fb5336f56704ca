"""Checks: one measured value against one threshold, with what to do when it fails.

A :class:`Check` is the generic row of a report's summary table; a gate decides by its checks. The
``check_*`` helpers turn metric results into checks with the default thresholds of the gate
(``max_dist <= 1e-4``, disparity <= 0.05 per channel, declared halo >= measured receptive field).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from ..metrics import (
    DisparityResult,
    HaloSufficiencyResult,
    SweepResult,
    TiledVsWholeResult,
    TileMismatchResult,
)

__all__ = [
    "Check",
    "CheckStatus",
    "check_disparity",
    "check_halo",
    "check_sweep",
    "check_tile_mismatch",
    "check_tiled_vs_whole",
]

CheckStatus = Literal["passed", "failed", "not-applicable", "info"]

Measured = float | int | str | list[float] | None


class Check(BaseModel):
    """One row of the summary: what was measured, the threshold, pass/fail, what to do.

    ``passed`` is None when the check does not apply (e.g. train/eval disparity of a network without
    running statistics) or is informational (``informational=True``: shown, never decides).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    measured: Measured
    threshold: float | str | None = None
    passed: bool | None
    advice: str = ""
    """What to do when the check fails (or why it does not apply)."""
    details: str = ""
    """Further context (per-channel values, where the worst case was, ...)."""
    informational: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> CheckStatus:
        if self.informational:
            return "info"
        if self.passed is None:
            return "not-applicable"
        return "passed" if self.passed else "failed"


def _shape(values: Sequence[int]) -> str:
    return "x".join(map(str, values))


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def check_tile_mismatch(result: TileMismatchResult, max_dist: float = 1e-4, cause: str | None = None,
                        relative: bool = False) -> Check:
    """``result.max_dist <= max_dist`` (0 is the paper's "no tile mismatch"); ``cause``: what the measurements
    say makes the tiles disagree (the advice then names it instead of the usual suspects). ``relative``: a
    regression output, judged by ``max_dist / output range`` (its Dice is not meaningful)."""
    g = result.geometry
    value = result.relative_max_dist if relative and result.relative_max_dist is not None else result.max_dist
    passed = value <= max_dist
    where = (f"{len(g.origins)} crop(s) of {_shape(g.crop_shape)}, tiles of {g.tile} offset by {g.offset} "
             f"along axis {g.long_axis}, halo {g.halo}")
    details = (
        f"tile mismatch: {result.verdict}; 1 - Dice per channel: {_fmt(result.mismatch)}; {where}" if not relative
        else f"tile mismatch: {result.verdict}; regression output: max |O1 - O2| {result.max_dist:.3g} over the "
             f"output range {_fmt(result.output_range or [])}; {where}"
    )
    if g.scaled_down:
        details += " (sizes scaled down to fit the image)"
    advice = ""
    if not passed:
        advice = (
            f"two overlapping tiles disagree by up to {result.max_dist:.3g}"
            + (f" ({value:.3g} of the output range)" if relative else "") + " (worst at voxel "
            f"{result.worst_voxel}, channel {result.worst_channel}): "
            + (cause or "the network normalizes per tile. Convert it to BatchRenorm with `tilenorm-bmz convert` "
               "(InstanceNorm/GroupNorm/BatchNorm in train mode), and make sure the input is normalized globally "
               "and the halo covers the receptive field")
        )
    return Check(
        name="tile mismatch",
        measured=value,
        threshold=f"max_dist / output range <= {max_dist:g}" if relative else f"max_dist <= {max_dist:g}",
        passed=passed,
        advice=advice,
        details=details,
    )


DATA_SHIFT_CLIPPED = 0.05
"""Mean fraction of BatchRenorm channels at a clip limit (over the tiles) from which a disparity is put down to
the data (outside the training statistics) rather than to the running statistics. A network trained with its
limits needs no more correction than they allow on data like its training data (none clip there), and a shift
is mostly absorbed by the first layers, so a few percent of all channels already say "data shift"."""


def check_disparity(result: DisparityResult, max_disparity: float = 0.05) -> Check:
    """Every channel's ``1 - dice(P_train, P_eval) <= max_disparity`` (n/a without running statistics)."""
    if not result.applicable or result.disparity is None:
        return Check(
            name="train/eval disparity",
            measured=None,
            threshold=f"<= {max_disparity:g} per channel",
            passed=None,
            advice=result.reason,
            details=result.batch_composition,
        )
    worst = max(result.disparity)
    passed = worst <= max_disparity
    what = "1 - Dice" if result.output == "probability" else "mean |P_train - P_eval| / output range"
    clipped = result.renorm_clipped
    shift = clipped is not None and sum(clipped) / len(clipped) >= DATA_SHIFT_CLIPPED
    advice = ""
    if not passed and shift:
        assert clipped is not None
        advice = (
            f"the prediction changes when the normalization runs in train mode ({what} up to {worst:.3g}), and "
            f"BatchRenorm clips r or d in {sum(clipped) / len(clipped):.0%} of its channels on this data: the input "
            "is outside the training statistics (a data shift), not a mismatch of the running statistics. Normalize "
            "the data as the model was trained (its bit depth, range, preprocessing), or fine-tune on such data "
            "(`tilenorm-bmz convert --finetune CONFIG`)"
        )
    elif not passed:
        advice = (
            f"the prediction changes when the normalization runs in train mode ({what} up to {worst:.3g}): "
            "the running statistics do not match the statistics the network was trained with. Convert to "
            "BatchRenorm and fine-tune (`tilenorm-bmz convert --finetune CONFIG`), or recalibrate the "
            "running statistics on data (`tilenorm-bmz convert --calibrate IMAGE`)"
        )
    details = f"{result.batch_composition}; max |P_train - P_eval| = {result.max_abs_diff:.3g}"
    if clipped is not None:
        details += (f"; BatchRenorm channels with r or d at the clip limit: {_fmt(clipped)} per tile "
                    f"(limits {result.renorm_limits})")
    return Check(
        name="train/eval disparity",
        measured=result.disparity,
        threshold=f"{what} <= {max_disparity:g} per channel",
        passed=passed,
        advice=advice,
        details=details,
    )


def check_tiled_vs_whole(
    result: TiledVsWholeResult, max_abs_diff: float = 1e-4, name: str = "tiled vs whole", cause: str | None = None,
    relative: bool = False,
) -> Check:
    """``max |tiled - whole| <= max_abs_diff``; not applicable when the whole image did not fit. ``cause`` and
    ``relative`` (judged relative to the output range) as in :func:`check_tile_mismatch`."""
    if result.skipped or result.max_abs_diff is None:
        return Check(
            name=name,
            measured=None,
            threshold=f"<= {max_abs_diff:g}",
            passed=None,
            advice=result.reason,
        )
    value = result.relative_max_diff if relative and result.relative_max_diff is not None else result.max_abs_diff
    passed = value <= max_abs_diff
    advice = ""
    if not passed:
        advice = (
            f"the tiled prediction differs from the whole-image prediction by up to "
            f"{result.max_abs_diff:.3g}" + (f" ({value:.3g} of the output range)" if relative else "")
            + f" (at voxel {result.worst_voxel}): seams. "
            + (cause[:1].upper() + cause[1:] if cause else "Use a halo of at least the receptive field, global input "
               "normalization, and a network without tile-wise normalization (`tilenorm-bmz convert`)")
        )
    details = f"mean |difference| {result.mean_abs_diff:.3g} on an image of {_shape(result.image_shape)}"
    if relative:
        details += f"; regression output, range {_fmt(result.output_range or [])}"
    return Check(
        name=name,
        measured=value,
        threshold=f"max |tiled - whole| / output range <= {max_abs_diff:g}" if relative else f"<= {max_abs_diff:g}",
        passed=passed,
        advice=advice,
        details=details,
    )


def check_halo(result: HaloSufficiencyResult) -> Check:
    """Declared halo >= one-sided receptive field (fails when normalization couples the tile)."""
    return Check(
        name="halo sufficiency",
        measured=result.measured,
        threshold=f"declared halo {_shape(result.declared_halo)} >= one-sided receptive field",
        passed=result.sufficient,
        advice="" if result.sufficient else result.message,
        details=f"recommended halo {_shape(result.recommended_halo)} ({result.method} receptive field)",
    )


def check_sweep(result: SweepResult, max_range: float | None = None) -> Check:
    """Spread of the sweep score over tile sizes; informational unless ``max_range`` is given."""
    spread = result.score_range
    worst = max(spread) if spread else 0.0
    sizes = ", ".join(_shape(p.tile_shape) for p in result.points)
    passed = None if max_range is None else worst <= max_range
    advice = ""
    if passed is False:
        advice = (
            f"the segmentation changes with the tile size (score range {worst:.3g}): tile-wise "
            "normalization; convert the network to BatchRenorm with `tilenorm-bmz convert`"
        )
    return Check(
        name="tile-size sweep",
        measured=spread,
        threshold=None if max_range is None else f"score range <= {max_range:g}",
        passed=passed,
        advice=advice,
        details=f"Dice against {result.reference} over tile sizes {sizes}",
        informational=max_range is None,
    )
