"""The validation gate: does a model tile seamlessly, behave the same in train and eval mode, and pass the
bioimage.io tests? :func:`validate_package` measures it and accepts or rejects with the evidence.

Checks (each one a :class:`~tilenorm_bmz.report.Check` row with what was measured, the threshold and what to
do; thresholds in :class:`~tilenorm_bmz.config.GateConfig`):

``bioimage.io test``
    ``bioimageio.core.test_model`` (format validation, reproduction of the test outputs with every weight
    format, inference at several sizes), offline, full determinism. Not applicable to checkpoints.
``tile mismatch``
    Two overlapping tiles predicted on their own agree in their valid overlap (paper Fig. 3), ``max_dist``.
``train/eval disparity``
    ``1 - Dice(P_train, P_eval)`` per channel with the normalization layers in train mode (where a train mode
    exists: state-dict weights, scripted TorchScript; not for traced modules or networks without running
    statistics).
``tiled vs whole`` and ``seams in <consumer>``
    ``max |tiled - whole|`` as :class:`~tilenorm_bmz.tiling.TiledPredictor`, bioimageio.core's blocked
    prediction and ilastik run the package (:mod:`~tilenorm_bmz.bmz.consumers`).
``halo sufficiency``
    The halo the package declares (checkpoints: the one the gate tiles with) covers the measured one-sided
    receptive field; "normalization couples the tile" for InstanceNorm/GroupNorm networks.
``tile-size sweep``, ``Dice against labels``
    Segmentation vs tile size (paper Fig. 6), and Dice against labels when they are given (informational
    unless ``max_sweep_range`` / ``min_dice`` are set).

Data: raw images (the package's preprocessing is applied as it declares it, on the whole image); without
data the package's own test input is used, with a warning (real, larger data finds more).

Labels: an array of the image's spatial shape is an instance (or binary) label image: for a network with one
output channel its foreground (``labels > 0``) is the target; for two or three output channels it becomes
foreground/boundary[/background] targets (:func:`tilenorm_bmz.data.instances_to_targets`, the training
targets). An array ``(C_out, *spatial)`` holds one semantic mask per output channel (``> 0``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

from .._version import __version__
from ..config import GATE_CONSUMERS, GateConfig
from ..errors import IntegrityError
from ..introspect import ceil_to
from ..metrics import (
    DisparityResult,
    HaloSufficiencyResult,
    RunContext,
    SweepResult,
    TileMismatchResult,
    eval_mode,
    halo_sufficiency,
    norm_layers,
    tile_mismatch,
    tile_size_sweep,
    train_eval_disparity,
)
from ..report import (
    Check,
    DataInfo,
    check_disparity,
    check_halo,
    check_sweep,
    check_tile_mismatch,
    check_tiled_vs_whole,
    write_report,
)
from .consumers import (
    CONSUMER_LABELS,
    EMULATIONS,
    ConsumerSeams,
    central_region,
    per_tile_statistics,
    tiled_predictor_region,
    tiled_predictor_tile,
)
from .modeltest import PackageTestSummary, run_model_test
from .subject import GateInputError, GateSubject, load_subject

__all__ = ["GateImage", "GateInputError", "GateReport", "validate_package"]

logger = logging.getLogger(__name__)

ArrayOrPath = np.ndarray | str | os.PathLike[str]

_FIXED_NORM_FIX = (
    "export the package with fixed normalization, identical for every tile: `tilenorm-bmz package CHECKPOINT "
    "--input-norm fixed` (for a package from elsewhere: `tilenorm-bmz convert PACKAGE -o model.pt` first)"
)


class ReceivedInput(BaseModel):
    """What the network received from one image: its preprocessed range, what the preprocessing clipped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    raw_min: list[float]
    raw_max: list[float]
    """Per channel, the raw image's range."""
    min: list[float]
    max: list[float]
    """Per channel, the range after the preprocessing (what the network receives)."""
    clipped_low: list[float]
    clipped_high: list[float]
    """Per channel, the fraction of voxels the preprocessing pushed onto the bottom / top of its range: voxels
    at the preprocessed minimum (maximum) beyond those already at the raw minimum (maximum), less the share the
    percentiles of a percentile normalization clip by design."""
    constant: bool
    """Every channel is (numerically) constant after preprocessing."""

    def describe(self) -> str:
        """One line: what the network received from this image."""
        def span(lo: list[float], hi: list[float]) -> str:
            return ", ".join(f"{a:.4g}..{b:.4g}" for a, b in zip(lo, hi, strict=True))

        return (f"raw {span(self.raw_min, self.raw_max)} -> network input {span(self.min, self.max)}; clipped "
                f"{max(self.clipped_low):.1%} to the bottom, {max(self.clipped_high):.1%} to the top"
                + ("; constant" if self.constant else ""))

    @property
    def worst_clipped(self) -> float:
        return max([*self.clipped_low, *self.clipped_high], default=0.0)

    def problem(self, max_clipped: float) -> str | None:
        """Why a measurement on this input would be noise (None: it is not degenerate)."""
        if self.constant:
            return "the network receives a constant image (every voxel has the same value after preprocessing)"
        if self.worst_clipped > max_clipped:
            side = "top" if max(self.clipped_high) >= max(self.clipped_low) else "bottom"
            return (f"the preprocessing clips {self.worst_clipped:.1%} of the voxels to the {side} of its range "
                    f"(more than {max_clipped:.0%})")
        return None


class GateImage(BaseModel):
    """What the gate measured on one image (the report's figures show the worst image per metric)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: tuple[int, ...]
    """Raw image shape ``(C, *spatial)``."""
    received: ReceivedInput | None = None
    """What the network received (range, fraction clipped, constant or not)."""
    region: tuple[tuple[int, int], ...] | None = None
    """``[start, stop)`` per spatial axis of the region the tile-size sweep ran on (the consumers record theirs)."""
    max_dist: float | None = None
    mismatch: list[float] | None = None
    disparity: list[float] | None = None
    seams: dict[str, float | None] = Field(default_factory=dict)
    """``max |tiled - whole|`` per consumer."""
    sweep_range: list[float] | None = None
    dice: list[float] | None = None
    """Dice against the labels per output channel (largest sweep tile)."""


class GateReport(BaseModel):
    """The gate's decision with every measurement it is based on."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    subject: str
    """The validated source (path)."""
    kind: Literal["package", "checkpoint"]
    name: str
    weights_format: str
    accepted: bool
    checks: list[Check]
    warnings: list[str] = Field(default_factory=list)
    data: list[DataInfo] = Field(default_factory=list)
    images: list[GateImage] = Field(default_factory=list)
    config: GateConfig
    device: str
    bioimageio_test: PackageTestSummary | None = None
    tile_mismatch: TileMismatchResult | None = None
    disparity: DisparityResult | None = None
    consumers: list[ConsumerSeams] = Field(default_factory=list)
    halo: HaloSufficiencyResult | None = None
    sweep: SweepResult | None = None
    receptive_field: Any = None
    """The :class:`~tilenorm_bmz.tiling.RFReport` of the network."""
    halo_used: tuple[int, ...] | None = None
    """The halo the metrics tiled with (the package's declared halo; for checkpoints the measured one)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per step."""
    report_json: Path | None = None
    report_html: Path | None = None
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 accepted, 1 rejected (the CLI maps inputs the gate cannot run on to 2)."""
        return 0 if self.accepted else 1

    def summary(self) -> str:
        """One line: the decision and the failed checks."""
        if self.accepted:
            return f"accepted: {len(self.checks)} checks, none failed"
        return f"rejected: {', '.join(self.failed_checks)} failed"

    def figures(self) -> dict[str, Any]:
        """The figures recorded in a package's ``config.tilenorm_bmz.gate`` (``--record``); JSON-ready."""
        seams: dict[str, float | None] = {}
        for c in self.consumers:
            seams[c.consumer] = c.max_abs_diff if c.applicable else None
        out: dict[str, Any] = {
            "status": "accepted" if self.accepted else "rejected",
            "tool": "tilenorm-bmz",
            "tool_version": __version__,
            "validated": self.created,
            "weights": self.weights_format,
            "device": self.device,
            "data": [f"{d.name} {list(d.shape)}" for d in self.data if d.role == "image"],
            "thresholds": {"max_dist": self.config.max_dist, "max_disparity": self.config.max_disparity,
                           "max_seam": self.config.max_seam},
            "checks": {c.name: c.status for c in self.checks},
            "tile_mismatch": None if self.tile_mismatch is None else {
                "max_dist": self.tile_mismatch.max_dist, "mismatch": self.tile_mismatch.mismatch,
                "verdict": self.tile_mismatch.verdict},
            "train_eval_disparity": None if self.disparity is None or not self.disparity.applicable else {
                "disparity": self.disparity.disparity, "batch_composition": self.disparity.batch_composition},
            "seams": seams,
            "halo": None if self.halo is None else {
                "declared": dict(zip(self.halo.axes, self.halo.declared_halo, strict=True)),
                "receptive_field": self.halo.measured, "sufficient": self.halo.sufficient},
        }
        import json

        return json.loads(json.dumps(out, default=str))


# -- data -------------------------------------------------------------------------------------------------
def _as_list(value: ArrayOrPath | Sequence[ArrayOrPath] | None) -> list[ArrayOrPath]:
    if value is None:
        return []
    if isinstance(value, np.ndarray | str | os.PathLike):
        return [value]
    return list(value)


def _read_image(item: ArrayOrPath, axes: str | None) -> tuple[str, np.ndarray]:
    if isinstance(item, np.ndarray):
        return f"array {tuple(item.shape)}", item
    from ..data import open_image

    path = Path(item)
    if not path.exists():
        raise GateInputError(f"data image {path} does not exist")
    return str(path), np.asarray(open_image(path, axes=axes).read())


def _channels_first(name: str, a: np.ndarray, subject: GateSubject, channels: int | None = None) -> np.ndarray:
    dims, c = subject.dims, subject.in_channels if channels is None else channels
    if a.ndim == dims and c == 1:
        a = a[None]
    if a.ndim == dims + 2 and a.shape[0] == 1:  # a stored length-1 axis in front (e.g. a 2D image read as zyx)
        a = a[0]
    axes = ", ".join("ZYX"[3 - dims:])
    if a.ndim != dims + 1:
        raise GateInputError(
            f"{name} has shape {a.shape}: the model is {dims}D and needs ({c}, {axes}) (channels first); give "
            f"--axes when the file's axes are not recorded (e.g. --axes {'cyx' if dims == 2 else 'czyx'})"
        )
    if a.shape[0] != c:
        raise GateInputError(
            f"{name} has {a.shape[0]} channel(s) (shape {a.shape}, channels first) but the model expects {c} input "
            f"channel(s)"
        )
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise GateInputError(f"{name} has dtype {a.dtype}; expected real numbers")
    return np.ascontiguousarray(a, dtype=np.float32)


def _one_sample(items: Sequence[tuple[str, np.ndarray, str]], subject: GateSubject) -> tuple[str, np.ndarray, str]:
    """A package with several inputs: one ``--data`` per input, in the package's order, make one image (its
    inputs' channels one after the other, as the gate's canonical network takes them)."""
    assert subject.package_axes is not None and subject.descr is not None
    names = [str(t.id) for t in subject.descr.inputs]
    channels = subject.package_axes.input_channels
    if len(items) != len(names):
        raise GateInputError(f"the package has {len(names)} inputs ({', '.join(names)}): give one --data per input, "
                             f"in this order (got {len(items)})")
    parts = [_channels_first(f"{label} ({n})", arr, subject, c)
             for (label, arr, _), n, c in zip(items, names, channels, strict=True)]
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise GateInputError(f"the inputs' images have the spatial shapes {sorted(shapes)}: give images of one size")
    return " + ".join(label for label, _, _ in items), np.concatenate(parts, axis=0), ""


def _default_data(subject: GateSubject, warnings: list[str]) -> list[tuple[str, np.ndarray, str]]:
    if subject.is_package:
        if subject.test_input is None:
            raise GateInputError(f"{subject.source.name} has no readable test input: give images with --data IMG")
        note = "the package's own test input: validate on real, larger data (--data IMG) for a stronger check"
        warnings.append(f"no data given: using {note}")
        logger.warning(warnings[-1])
        return [("package test input", subject.test_input, note)]
    from .export import _sample_source

    try:
        source = _sample_source(None, subject.checkpoint_info)
    except (ValueError, FileNotFoundError) as e:
        raise GateInputError(f"no data to validate on: give images with --data IMG ({e})") from e
    note = "the checkpoint's validation data"
    warnings.append(f"no data given: using {note}")
    logger.warning(warnings[-1])
    if isinstance(source, np.ndarray):
        return [(note, source, note)]
    name, arr = _read_image(source, None)
    return [(name, arr, note)]


def _targets(item: ArrayOrPath, spatial: tuple[int, ...], n_out: int, dims: int) -> tuple[str, np.ndarray]:
    """Labels -> boolean targets ``(C_out, *spatial)`` by the rule in the module docstring."""
    from ..data import instances_to_targets

    name, a = _read_image(item, None) if not isinstance(item, np.ndarray) else (f"labels {item.shape}", item)
    a = np.asarray(a)
    while a.ndim > dims + 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == dims + 1 and a.shape[0] == 1 and n_out != 1:
        a = a[0]
    if a.shape[-dims:] != spatial:
        raise GateInputError(f"{name} has spatial shape {a.shape[-dims:]} but its image has {spatial}")
    if a.ndim == dims + 1:
        if a.shape[0] != n_out:
            raise GateInputError(
                f"{name} holds {a.shape[0]} semantic mask(s) but the network predicts {n_out} channel(s): give one "
                "mask per output channel, or an instance label image"
            )
        return name, a > 0
    if a.ndim != dims:
        raise GateInputError(f"{name} has shape {a.shape}; labels are {dims}D instance labels or (C, *spatial) masks")
    if n_out == 1:
        return name, (a > 0)[None]
    if n_out not in (2, 3):
        raise GateInputError(
            f"the network predicts {n_out} channels: instance labels become foreground/boundary[/background] "
            f"targets (2 or 3 channels); give {n_out} semantic masks (C, *spatial) instead"
        )
    if not np.issubdtype(a.dtype, np.integer) and not np.all(a == np.round(a)):
        raise GateInputError(f"{name} is not an integer label image")
    return name, instances_to_targets(a.astype(np.int64), background=n_out == 3).astype(bool)


# -- the gate ---------------------------------------------------------------------------------------------
class _Timer:
    """Calls a step and adds its wall time to ``seconds[name]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        logger.info("gate: %s", name)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _worst(items: Sequence[Any], key: Callable[[Any], float | None]) -> Any:
    scored = [(key(x), i) for i, x in enumerate(items) if x is not None and key(x) is not None]
    if not scored:
        return next((x for x in items if x is not None), None)
    return items[max(scored)[1]]


def _with(check: Check, **update: Any) -> Check:
    return Check.model_validate({**check.model_dump(exclude={"status"}), **update})


def _bioimageio_check(test: PackageTestSummary | None, subject: GateSubject, config: GateConfig) -> Check | None:
    if not subject.is_package:
        return Check(name="bioimage.io test", measured=None, passed=None,
                     advice="not applicable: a checkpoint; `tilenorm-bmz package` tests the package it writes")
    if test is None:
        return None
    failed = test.failed_checks
    advice = "" if test.passed else "; ".join(
        f"{c.name}: {c.errors[0] if c.errors else 'failed'}" for c in failed[:3]) + (" ..." if len(failed) > 3 else "")
    return Check(
        name="bioimage.io test", measured=test.status, threshold="passed", passed=test.passed,
        advice=advice[:2000], details=f"{len(test.checks)} checks, format {test.format_version}",
        informational=not config.require_bioimageio_test,
    )


def _libtorch_check(source: Path) -> Check | None:
    """deepImageJ (libtorch 2.0) can load the package's TorchScript file (informational; :mod:`.libtorch`)."""
    from .compat import check_torchscript_operators
    from .libtorch import LIBTORCH_REFERENCE

    c = check_torchscript_operators(source)
    if c is None:
        return None  # no TorchScript weights
    return Check(name="deepImageJ loads the TorchScript", measured=c.status,
                 threshold=f"operators of libtorch {LIBTORCH_REFERENCE}", passed=c.status == "pass", advice=c.fix,
                 details=c.detail, informational=True)


def seam_cause(network: Any, rf: Any, halo: Sequence[int]) -> str:
    """What the measurements say makes tiles disagree: the layers that couple the tile (by name), a halo below the
    measured receptive field, or, when neither, what else to inspect (padding, global operations)."""
    from torch import nn

    from ..tiling import tile_coupling_layers

    coupling = tile_coupling_layers(network)
    if coupling and any("traced in train mode" in why for _, why in coupling):
        names = "; ".join(f"{name}: {why}" for name, why in coupling[:4])
        return (f"{names}. Export the TorchScript again from the network in eval mode (`model.eval()` before "
                "`torch.jit.trace`; bioimageio.core 0.11's weight converter traces without it)")
    if coupling:
        names = "; ".join(f"{name}: {why}" for name, why in coupling[:4]) + (" ..." if len(coupling) > 4 else "")
        return (f"{len(coupling)} layer(s) couple the tile ({names}). Convert the network to BatchRenorm with "
                "`tilenorm-bmz convert` (no halo makes such a network seamless)")
    trf = getattr(rf, "theoretical", None)
    if trf is not None and any(h < t for h, t in zip(halo, trf, strict=True)):
        return (f"no layer normalizes per tile, but the halo {tuple(halo)} is below the measured one-sided "
                f"receptive field {tuple(trf)}: give the package a halo of at least {tuple(trf)} "
                f"(`tilenorm-bmz package --halo`, or the output axes' halo)")
    padded = [name for name, m in network.named_modules()
              if isinstance(m, nn.modules.conv._ConvNd) and getattr(m, "padding_mode", "zeros") != "zeros"]
    if padded:
        return (f"no layer normalizes per tile and the halo covers the receptive field; the convolutions "
                f"{', '.join(padded[:4])} pad with {network.get_submodule(padded[0]).padding_mode!r}, and an "
                "operation over the whole tile (global pooling, attention) would also explain it: inspect them")
    if trf is None:
        return ("no layer normalizes per tile, and the receptive field could not be measured, so the halo could "
                "not be checked against it; an operation over the whole tile (global pooling, attention) or a "
                "halo below the receptive field would explain it")
    return ("no layer normalizes per tile and the halo covers the receptive field: an operation over the whole tile "
            "(global pooling, attention, a data-dependent step) must couple it; inspect the network")


def _seam_value(c: ConsumerSeams | None, relative: bool) -> float | None:
    if c is None or c.result is None:
        return None
    return c.result.relative_max_diff if relative else c.result.max_abs_diff


def _consumer_check(c: ConsumerSeams, config: GateConfig, ours: ConsumerSeams | None, subject: GateSubject,
                    warnings: list[str], cause: str | None = None, relative: bool = False) -> Check:
    name = "tiled vs whole (tilenorm-bmz)" if c.consumer == "tilenorm-bmz" else f"seams in {c.consumer}"
    gating = c.consumer in config.gating_consumers
    if not c.applicable or c.result is None:
        return Check(name=name, measured=None, threshold=f"<= {config.max_seam:g}", passed=None, advice=c.reason)
    check = check_tiled_vs_whole(c.result, config.max_seam, name=name, cause=cause, relative=relative)
    details = f"{c.description}; {check.details}"
    advice = check.advice
    ours_ok = ours is not None and ours.applicable and (_seam_value(ours, relative) or 0.0) <= config.max_seam
    if check.passed is False and c.consumer != "tilenorm-bmz" and ours_ok:
        cause = ""
        if c.consumer == "ilastik":
            stats = per_tile_statistics(subject)
            if stats:
                cause = (f"ilastik applies the package's preprocessing to every tile, so the {', '.join(stats)} "
                         f"statistics differ between tiles: {_FIXED_NORM_FIX}")
            else:
                cause = ("ilastik extends border tiles to its tile shape around the block, which can shift them "
                         "off the network's pooling grid; a package whose min and 2 * halo are multiples of the "
                         "step keeps interior tiles exact")
        else:
            cause = "check the package's halo, its padding mode and its preprocessing"
        advice = (f"seamless in tilenorm-bmz's TiledPredictor but not in {c.consumer} (up to "
                  f"{c.result.max_abs_diff:.3g}): {cause}")
        warnings.append(advice)
    return _with(check, details=details, advice=advice, informational=not gating)


def _dice_check(images: Sequence[GateImage], config: GateConfig) -> Check | None:
    scores = [im.dice for im in images if im.dice is not None]
    if not scores:
        return None
    worst = np.min(np.array(scores), axis=0).tolist()
    passed = None if config.min_dice is None else min(worst) >= config.min_dice
    advice = ""
    if passed is False:
        advice = (f"the segmentation reaches Dice {min(worst):.3g} against the labels (threshold "
                  f"{config.min_dice:g}): train longer, on more data, or check the labels and the normalization")
    return Check(
        name="Dice against labels", measured=worst,
        threshold=None if config.min_dice is None else f">= {config.min_dice:g} per channel",
        passed=passed, advice=advice, informational=config.min_dice is None,
        details=f"per output channel, largest sweep tile; worst over {len(scores)} image(s)",
    )


def _invalid_package_report(subject: GateSubject, config: GateConfig, out_dir: Path | None,
                            device: str, timer: _Timer, name: str | None, trust_code: bool) -> GateReport:
    from .package_io import untrusted_test_plan

    runs, fmt = untrusted_test_plan(subject.source, trust_code)  # never the package's code without trust
    test = timer("bioimage.io test", run_model_test, subject.source, fmt) \
        if "bioimageio" in config.checks and runs else None
    checks = [Check(name="bioimage.io format", measured="invalid", threshold="valid", passed=False,
                    advice=f"the package's description is invalid: {subject.format_error}"[:2000])]
    bio = _bioimageio_check(test, subject, config)
    if bio is not None:
        checks.append(bio)
    report = GateReport(subject=name or str(subject.source), kind="package", name=subject.name, weights_format="none",
                        accepted=False, checks=checks, config=config, device=device, bioimageio_test=test,
                        timings=timer.seconds)
    return _write(report, out_dir)


@dataclass(eq=False)
class _ImageMeasurement:
    record: GateImage
    mismatch: TileMismatchResult | None = None
    disparity: DisparityResult | None = None
    consumers: list[ConsumerSeams] = field(default_factory=list)
    sweep: SweepResult | None = None
    not_run: dict[str, str] = field(default_factory=dict)


def _sweep_sizes(region: Sequence[int], halo: Sequence[int], divisor: Sequence[int]) -> list[tuple[int, ...]]:
    """Default sweep: tiles giving 1 to 4 (2D) / 1 to 2 (3D) tiles per axis of the region, and the seam test's."""
    ks = (1, 2, 3, 4) if len(region) == 2 else (1, 2)
    out = {tuple(ceil_to(-(-r // k) + 2 * h, d) for r, h, d in zip(region, halo, divisor, strict=True)) for k in ks}
    out.add(tiled_predictor_tile(halo, divisor))
    return sorted(out)


def _whole_tile(spatial: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(d, s // d * d) for s, d in zip(spatial, divisor, strict=True))


def _expected_clip(normalization: dict[str, Any] | None) -> tuple[float, float]:
    """The share of voxels a percentile normalization clips by design (bottom, top); none for fixed values."""
    if not normalization or normalization.get("mode") not in ("global", "tilewise") or not normalization.get(
            "clip", True):
        return 0.0, 0.0
    return float(normalization.get("lower", 0.0)), 1.0 - float(normalization.get("upper", 1.0))


def received_input(raw: np.ndarray, image: np.ndarray, normalization: dict[str, Any] | None) -> ReceivedInput:
    """Describe what the network receives from ``raw`` ``(C, *spatial)`` once preprocessed to ``image``."""
    low_share, high_share = _expected_clip(normalization)
    stats: dict[str, list[float]] = {k: [] for k in ("raw_min", "raw_max", "min", "max", "clipped_low",
                                                      "clipped_high")}
    constant = True
    for r, x in zip(raw.reshape(raw.shape[0], -1), image.reshape(image.shape[0], -1), strict=True):
        rmin, rmax, xmin, xmax = float(r.min()), float(r.max()), float(x.min()), float(x.max())
        constant &= (xmax - xmin) <= 1e-6 * max(1.0, abs(xmax), abs(xmin))
        at_low = float(np.mean(x == xmin)) - float(np.mean(r == rmin)) - low_share
        at_high = float(np.mean(x == xmax)) - float(np.mean(r == rmax)) - high_share
        for key, value in (("raw_min", rmin), ("raw_max", rmax), ("min", xmin), ("max", xmax),
                           ("clipped_low", max(0.0, at_low)), ("clipped_high", max(0.0, at_high))):
            stats[key].append(value)
    return ReceivedInput(constant=bool(constant), **stats)


def _degenerate_fix(subject: GateSubject, raw: np.ndarray) -> str:
    norm = subject.normalization or {}
    if norm.get("mode") == "fixed" and norm.get("low") is not None:
        low, high = norm["low"], norm.get("high")
        flat = raw.reshape(raw.shape[0], -1)
        span = ", ".join(f"{np.nanmin(c):g}..{np.nanmax(c):g}" for c in flat)
        return (f"this data (range {span}) is outside the model's fixed normalization range {low}..{high}: export "
                "with percentile normalization (`tilenorm-bmz package --input-norm percentile`) or refit the fixed "
                "values on your data")
    return ("check that the image has the bit depth, intensity range and channels the model expects, and that "
            "its preprocessing suits it")


def _check_received(subject: GateSubject, cfg: GateConfig, name: str, raw: np.ndarray,
                    image: np.ndarray) -> ReceivedInput:
    """No verdict from a degenerate input: non-finite, constant or mostly clipped after preprocessing."""
    bad = ~np.isfinite(raw)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.reshape(-1))), bad.shape))
        raise GateInputError(f"no verdict: {name} has {int(bad.sum())} NaN/Inf voxel(s), the first at {first} "
                             "(c, *spatial): a measurement on it is meaningless; repair the image or fill them")
    if not np.isfinite(image).all():
        raise GateInputError(f"no verdict: the preprocessing turns {name} into NaN/Inf values (e.g. a constant "
                             f"image under percentile normalization): {_degenerate_fix(subject, raw)}")
    received = received_input(raw, image, subject.normalization)
    problem = received.problem(cfg.max_clipped)
    if problem is not None:
        raise GateInputError(f"no verdict on {name}: {problem}, so every measurement on it would be noise; "
                             f"{_degenerate_fix(subject, raw)}")
    return received


@dataclass(eq=False)
class GateRun:
    """What every part of one gate run shares: the subject, the settings, the halo and receptive field, how the
    metrics run (one :class:`~tilenorm_bmz.metrics.RunContext`), the timer, the warnings, and the parts' worst
    results for the report."""

    subject: GateSubject
    config: GateConfig
    halo: tuple[int, ...]
    rf: Any
    metrics: RunContext
    timer: _Timer
    warnings: list[str]
    output_kind: str
    progress: bool
    image_names: list[str]
    test: PackageTestSummary | None = None
    halo_result: HaloSufficiencyResult | None = None
    worst: dict[str, Any] = field(default_factory=dict)
    """Each part's worst result over the images (``tile_mismatch``, ``disparity``, ``sweep``, ``consumers``)."""
    not_run: dict[str, str] = field(default_factory=dict)
    """Why a measurement did not run, by measurement (the last image's reason)."""

    @property
    def on(self) -> set[str]:
        return set(self.config.checks)

    @property
    def relative(self) -> bool:
        """Regression outputs: values compared relative to the output range."""
        return self.output_kind == "regression"

    def where(self, index: int, check: Check) -> Check:
        """The check, naming the worst image when there are several."""
        if len(self.image_names) < 2:
            return check
        return _with(check, details=f"{check.details} (worst image: {self.image_names[index]})")

    @functools.cached_property
    def cause(self) -> str:
        """What the measurements say makes tiles disagree (:func:`seam_cause`; the tile-mismatch and consumer
        checks both name it)."""
        return seam_cause(self.subject.network, self.rf, self.halo)

    @functools.cached_property
    def has_train_mode(self) -> bool:
        """The network has normalization layers that behave differently in train mode."""
        return bool(norm_layers(self.subject.network)[0])


@dataclass(frozen=True, eq=False)
class GateInput:
    """One image as the parts measure it: raw, preprocessed, its targets, what the network received."""

    name: str
    raw: np.ndarray
    image: np.ndarray
    target: tuple[str, np.ndarray] | None
    received: ReceivedInput


class GatePart(Protocol):
    """One part of the gate: what it measures on every image, and the checks it decides from all of them."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None: ...

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]: ...


class _BioimageioPart:
    """The package's own bioimage.io test (run once, before the images)."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        return None

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        check = _bioimageio_check(run.test, run.subject, run.config)
        return [] if check is None else [check]


class _TileMismatchPart:
    """Two overlapping tiles agree in their valid overlap (paper Fig. 3)."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        if "tile_mismatch" not in run.on:
            return
        cfg, subject = run.config, run.subject
        try:
            out.mismatch = run.timer(
                "tile mismatch", tile_mismatch, subject.network, item.image, halo=run.halo, crop_shape=cfg.crop_shape,
                stride=cfg.stride, tile=cfg.tile, offset=cfg.offset, max_crops=cfg.max_crops, context=run.metrics,
                tile_shape=subject.fixed_shape)  # a fixed size: both tiles have exactly it
            out.record.max_dist, out.record.mismatch = out.mismatch.max_dist, out.mismatch.mismatch
        except ValueError as e:
            out.not_run["tile mismatch"] = f"{item.name}: {e}"
            logger.warning("tile mismatch not measured on %s: %s", item.name, e)

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        results = [m.mismatch for m in measured]
        worst = run.worst["tile_mismatch"] = _worst(
            results, lambda r: r.relative_max_dist if run.relative else r.max_dist)
        if "tile_mismatch" not in run.on:
            return []
        if worst is None:
            return [Check(name="tile mismatch", measured=None, threshold=f"max_dist <= {run.config.max_dist:g}",
                          passed=None, advice=run.not_run.get("tile mismatch", ""))]
        return [run.where(results.index(worst), check_tile_mismatch(worst, run.config.max_dist, run.cause,
                                                                    relative=run.relative))]


class _DisparityPart:
    """Train/eval disparity of the normalization layers (where a train mode exists)."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        if "disparity" not in run.on:
            return
        cfg, subject, raw = run.config, run.subject, item.raw
        edge: int | tuple[int, ...] = subject.fixed_shape or cfg.disparity_tile or (192 if subject.dims == 2 else 64)
        edges = edge if isinstance(edge, tuple) else (edge,) * subject.dims
        # tiles as large as the image are all the same tile: measure it once
        n_tiles = 1 if all(e >= s for e, s in zip(edges, raw.shape[1:], strict=True)) else cfg.disparity_tiles
        whole = subject.fixed_shape if subject.fixed_shape else _whole_tile(raw.shape[1:], subject.divisor)
        try:
            if subject.fixed_shape and any(s < e for s, e in zip(raw.shape[1:], edges, strict=True)):
                raise ValueError(f"the image {raw.shape[1:]} is smaller than the network's fixed input {edges}")
            out.disparity = run.timer(
                "train/eval disparity", train_eval_disparity, subject.network, item.image,
                batch_size=cfg.disparity_batch_size, n_tiles=n_tiles, tile_shape=whole if n_tiles == 1 else edge,
                context=run.metrics, output="regression" if run.relative else "probability")
            out.record.disparity = out.disparity.disparity
        except ValueError as e:  # e.g. an image too small for train-mode statistics
            out.not_run["train/eval disparity"] = f"{item.name}: {' '.join(str(e).split())}"
            logger.warning("train/eval disparity not measured on %s: %s", item.name, e)

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        results = [m.disparity for m in measured]
        worst = run.worst["disparity"] = _worst(results, lambda r: r.max_disparity)
        if worst is None:
            return []
        check = check_disparity(worst, run.config.max_disparity)
        if not worst.applicable and not run.has_train_mode:
            check = _with(check, advice=f"not applicable: {worst.reason}")
        return [run.where(results.index(worst), check)]


class _ConsumersPart:
    """Seams as each registered consumer (:mod:`.consumers`) tiles the package; tilenorm-bmz's own is the
    "tiled vs whole" check."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        subject = run.subject
        for consumer in (c for c in GATE_CONSUMERS if c in EMULATIONS):
            if ("tiled_vs_whole" if consumer == "tilenorm-bmz" else "consumers") not in run.on:
                continue
            step = "tiled vs whole" if consumer == "tilenorm-bmz" else f"seams in {consumer}"
            try:
                out.consumers.append(run.timer(step, EMULATIONS[consumer], subject, item.raw, halo=run.halo,
                                               config=run.config, device=str(run.metrics.device),
                                               progress=run.progress))
            except (ValueError, RuntimeError) as e:  # the consumer cannot run this package: said, not a crash
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]  # TorchScript: the cause is last
                reason = f"{consumer} could not run the package: {(lines[-1] if lines else type(e).__name__)[:400]}"
                logger.warning("%s: %s", step, reason)
                out.consumers.append(ConsumerSeams(consumer=consumer, applicable=False, reason=reason))
        for r in out.consumers:
            out.record.seams[r.consumer] = r.max_abs_diff
            if not r.applicable and subject.is_package:
                run.warnings.append(f"{r.consumer} not emulated on {item.name}: {r.reason}")

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        by_consumer: dict[str, list[ConsumerSeams]] = {}
        for m in measured:
            for r in m.consumers:
                by_consumer.setdefault(r.consumer, []).append(r)
        run.worst["consumers"] = [_worst(runs, lambda r: r.max_abs_diff) for runs in by_consumer.values()]
        ours = _worst(by_consumer.get("tilenorm-bmz", []), lambda r: r.max_abs_diff)
        checks = []
        for consumer in GATE_CONSUMERS:
            runs = by_consumer.get(consumer)
            if runs:
                worst = _worst(runs, lambda r: r.max_abs_diff)
                checks.append(run.where(runs.index(worst), _consumer_check(
                    worst, run.config, ours, run.subject, run.warnings, run.cause, relative=run.relative)))
        return checks


class _HaloPart:
    """The declared halo covers the measured receptive field (measured once, before the images)."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        return None

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        if run.halo_result is None:
            return []
        check = check_halo(run.halo_result)
        return [check if run.config.require_sufficient_halo else _with(check, informational=True)]


class _SweepPart:
    """Segmentation vs tile size (paper Fig. 6) on the central region, and Dice against labels at its largest
    tile."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        subject, cfg, on, raw, target = run.subject, run.config, run.on, item.raw, item.target
        if subject.fixed_shape is not None and "sweep" in on:
            out.not_run["tile-size sweep"] = (f"the package's input has one size "
                                              f"({'x'.join(map(str, subject.fixed_shape))}): every consumer tiles with it")
            return
        if not ("sweep" in on or (target is not None and "dice" in on)):
            return
        spatial = tuple(raw.shape[1:])
        sizes_r = tiled_predictor_region(spatial, run.halo, subject.divisor, cfg.region_voxels)
        raw_r, region = central_region(raw, sizes_r)
        out.record.region = tuple((a, b) for a, b in region)
        target_r = None if target is None else target[1][(slice(None), *(slice(a, b) for a, b in region))]
        sizes: list[Any] = list(cfg.sweep_sizes or _sweep_sizes(sizes_r, run.halo, subject.divisor))
        if "sweep" not in on:
            sizes = [tuple(sizes_r)]
        try:
            sweep = run.timer("tile-size sweep", tile_size_sweep, subject.network, subject.preprocess(raw_r), target_r,
                              halo=run.halo, tile_sizes=sizes, context=run.metrics)
        except ValueError as e:
            out.not_run["tile-size sweep"] = f"{item.name}: {e}"
            logger.warning("tile-size sweep not run on %s: %s", item.name, e)
            return
        if "sweep" in on:
            out.sweep, out.record.sweep_range = sweep, sweep.score_range
        if target is not None:
            out.record.dice = sweep.points[-1].dice_to_labels

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        results = [m.sweep for m in measured]
        worst = run.worst["sweep"] = _worst(results, lambda r: max(r.score_range) if r.score_range else None)
        if worst is not None:
            return [run.where(results.index(worst), check_sweep(worst, run.config.max_sweep_range))]
        if "sweep" in run.on and "tile-size sweep" in run.not_run:
            return [Check(name="tile-size sweep", measured=None, passed=None, advice=run.not_run["tile-size sweep"],
                          informational=True)]
        return []


class _DicePart:
    """Dice against the labels, when they are given (measured by the sweep part)."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        return None

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        check = _dice_check([m.record for m in measured], run.config) if "dice" in run.on else None
        return [] if check is None else [check]


class _DeepImageJOperatorsPart:
    """deepImageJ's libtorch 2.0 knows every operator of the TorchScript (informational)."""

    def measure(self, run: GateRun, item: GateInput, out: _ImageMeasurement) -> None:
        return None

    def decide(self, run: GateRun, measured: Sequence[_ImageMeasurement]) -> list[Check]:
        if not run.subject.is_package:
            return []
        check = run.timer("deepImageJ operators", _libtorch_check, run.subject.source)
        return [] if check is None else [check]


#: The gate's parts, in the order they measure each image and in which their checks appear in the report.
#: Adding a check: a part with ``measure`` and ``decide``, one entry here (and its name in ``GateCheck`` when
#: it can be skipped).
GATE_PARTS: tuple[GatePart, ...] = (
    _BioimageioPart(), _TileMismatchPart(), _DisparityPart(), _ConsumersPart(), _HaloPart(), _SweepPart(),
    _DicePart(), _DeepImageJOperatorsPart(),
)


def _measure_image(run: GateRun, item: GateInput) -> _ImageMeasurement:
    """Every part's measurement on one image."""
    out = _ImageMeasurement(record=GateImage(name=item.name, shape=tuple(item.raw.shape), received=item.received))
    for part in GATE_PARTS:
        part.measure(run, item, out)
    return out


def _integrity_report(source: Path, error: IntegrityError, config: GateConfig, out_dir: Path | None, device: str,
                      timer: _Timer, name: str | None) -> GateReport:
    """A package that fails its integrity checks is rejected on that alone: nothing else of it is run."""
    check = Check(name="package integrity", measured="failed", threshold="safe members, sizes, sha256",
                  passed=False, advice=f"{error}"[:2000])
    report = GateReport(subject=name or str(source), kind="package", name=source.name, weights_format="none",
                        accepted=False, checks=[check], config=config, device=device, timings=timer.seconds)
    return _write(report, out_dir)


def validate_package(
    model_source: str | os.PathLike[str],
    data: ArrayOrPath | Sequence[ArrayOrPath] | None = None,
    labels: ArrayOrPath | Sequence[ArrayOrPath] | None = None,
    *,
    config: GateConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    data_axes: str | None = None,
    name: str | None = None,
    trust_code: bool = False,
    progress: bool = False,
) -> GateReport:
    """Validate a bioimage.io package (or a tilenorm-bmz checkpoint) and accept or reject it.

    Parameters
    ----------
    model_source
        A package (zip, folder or rdf.yaml; format 0.4 or 0.5; ``pytorch_state_dict`` or ``torchscript``
        weights) or a tilenorm-bmz checkpoint. Never modified.
    data
        Raw images (paths: TIFF, Zarr, .npy; or arrays ``(C, *spatial)``); default: the package's own test
        input (checkpoints: their recorded validation data), with a warning.
    labels
        One label image per image (see the module docstring for the rule), for Dice and the sweep.
    config
        Thresholds and settings (:class:`~tilenorm_bmz.config.GateConfig`; default: the project's rule).
    out_dir
        Write ``report.json`` and a self-contained ``report.html`` here (None: no files).
    data_axes
        Axes of the data files when they do not record them (e.g. ``cyx``).
    name
        How the report names the model (default: the source path).
    progress
        Show progress bars (rich) for the long steps.

    Returns
    -------
    GateReport
        ``accepted``, every check (measured, threshold, what to do), the metric results, the report paths.

    Raises
    ------
    GateInputError
        The gate cannot run: missing or corrupt input, a package without PyTorch weights, unsupported axes, data
        with the wrong channel count or dimensionality, labels that do not fit. (Exit code 2 in the CLI.)
    """
    cfg = config or GateConfig()
    from ..introspect import resolve_device
    from ..tiling import receptive_field

    dev = resolve_device(cfg.device)
    device = str(dev)
    timer = _Timer()
    out = Path(out_dir) if out_dir is not None else None
    try:
        subject: GateSubject = timer("load", load_subject, model_source, cfg, trust_code=trust_code)
    except IntegrityError as e:
        return _integrity_report(Path(model_source), e, cfg, out, device, timer, name)
    if subject.format_error is not None:
        return _invalid_package_report(subject, cfg, out, device, timer, name, trust_code)
    warnings = list(subject.notes)
    items = [(*_read_image(d, data_axes), "") for d in _as_list(data)] or _default_data(subject, warnings)
    if subject.package_axes is not None and subject.package_axes.inputs and _as_list(data):
        images = [_one_sample(items, subject)]
    else:
        images = [(label, _channels_first(label, arr, subject), note) for label, arr, note in items]
    label_items = _as_list(labels)
    if label_items and len(label_items) != len(images):
        raise GateInputError(f"{len(label_items)} label image(s) for {len(images)} image(s): give one per image, "
                             "in the same order")
    targets: list[tuple[str, np.ndarray] | None] = [None] * len(images)
    if label_items:
        n_out = _out_channels(subject)
        targets = [_targets(lab, im.shape[1:], n_out, subject.dims)
                   for lab, (_, im, _) in zip(label_items, images, strict=True)]
    data_info = [DataInfo.from_array(label, im, note=note) for label, im, note in images]
    data_info += [DataInfo.from_array(t[0], t[1], role="labels (targets)") for t in targets if t is not None]
    net, checks_on = subject.network, set(cfg.checks)

    # the package's own test --------------------------------------------------------------------------------
    test = None
    if subject.is_package and "bioimageio" in checks_on:
        test = timer("bioimage.io test", run_model_test, subject.source, subject.tested_format)

    # receptive field and halo ---------------------------------------------------------------------------------
    # a network that runs only at its fixed size is measured at that size (no larger probe exists)
    rf = timer("receptive field", receptive_field, net, subject.dims, divisor=subject.divisor,
               in_channels=subject.in_channels, device=dev, n_samples=2,
               input_shape=None if subject.free_sizes else subject.fixed_shape)
    if subject.declared_halo is not None:
        halo = tuple(subject.declared_halo)
    elif cfg.halo is not None:
        halo = (cfg.halo,) * subject.dims if isinstance(cfg.halo, int) else tuple(cfg.halo)
        if len(halo) != subject.dims:
            raise GateInputError(f"halo {cfg.halo} has {len(halo)} values for a {subject.dims}D model")
    else:
        halo = tuple(int(h) for h in rf.recommended_halo)
    halo_result = halo_sufficiency(halo, rf) if "halo" in checks_on else None

    # per image ----------------------------------------------------------------------------------------------
    prepared = []  # every image is checked before anything is measured: no verdict from a degenerate input
    for label, raw, _ in images:
        image = timer("preprocessing", subject.preprocess, raw)
        prepared.append((image, _check_received(subject, cfg, label, raw, image)))
    data_info = [d.model_copy(update={"note": "; ".join(x for x in (d.note, f"received: {received.describe()}") if x)})
                 for d, (_, received) in zip(data_info, prepared, strict=False)] + data_info[len(prepared):]
    output_kind = timer("output kind", _output_kind, subject, cfg, prepared[0][0], halo)
    if output_kind == "regression":
        warnings.append("the outputs are not probabilities (values outside [0, 1]): tile mismatch, seams and "
                        "disparity are judged relative to the output range, not binarized")
    run = GateRun(subject=subject, config=cfg, halo=halo, rf=rf, timer=timer, warnings=warnings,
                  output_kind=output_kind, progress=progress, image_names=[label for label, _, _ in images],
                  test=test, halo_result=halo_result,
                  metrics=RunContext(device=dev, batch_size=cfg.batch_size, divisor=subject.divisor,
                                     threshold=cfg.threshold, progress=progress))
    measured = [
        _measure_image(run, GateInput(name=label, raw=raw, image=image, target=target, received=received))
        for (label, raw, _), (image, received), target in zip(images, prepared, targets, strict=True)
    ]
    for m in measured:
        run.not_run.update(m.not_run)

    # decide -------------------------------------------------------------------------------------------------
    checks = [check for part in GATE_PARTS for check in part.decide(run, measured)]
    mm_worst, disp_worst, not_run = run.worst.get("tile_mismatch"), run.worst.get("disparity"), run.not_run
    has_train_mode = run.has_train_mode
    missing = _missing_decisive(subject, cfg, checks_on, mm_worst, disp_worst, has_train_mode, not_run, halo, images)
    if missing is not None:
        # on the package's own test input alone (no data given) the package cannot be judged: not applicable
        raise GateInputError(missing, not_applicable=not _as_list(data) and subject.fixed_shape is not None)
    accepted = not any(c.status == "failed" for c in checks)
    consumers = run.worst.get("consumers", [])
    sw_worst = run.worst.get("sweep")
    per_image = [m.record for m in measured]
    report = GateReport(
        subject=name or str(subject.source), kind=subject.kind, name=subject.name,
        weights_format=subject.weights_format,
        accepted=accepted, checks=checks, warnings=warnings, data=data_info, images=per_image, config=cfg,
        device=device, bioimageio_test=test, tile_mismatch=mm_worst, disparity=disp_worst, consumers=consumers,
        halo=halo_result, sweep=sw_worst, receptive_field=rf, halo_used=halo, timings=timer.seconds,
    )
    logger.info("%s: %s", subject.source, report.summary())
    return _write(report, out)


def _missing_decisive(subject: GateSubject, cfg: GateConfig, checks_on: set[str], mismatch: Any, disparity: Any,
                      has_train_mode: bool, not_run: dict[str, str], halo: Sequence[int],
                      images: Sequence[tuple[str, np.ndarray, str]]) -> str | None:
    """Why no verdict can be given (a decisive check asked for could not run), with the data that would do."""
    if "tile_mismatch" in checks_on and mismatch is None and subject.fixed_shape is not None:
        fixed = subject.fixed_shape
        return (f"no verdict: tile mismatch could not be measured ({not_run.get('tile mismatch', 'not run')}); "
                f"the package runs tiles of exactly {'x'.join(map(str, fixed))}: give an image larger than that "
                f"(--data IMG), e.g. {'x'.join(str(f + (f // 2 if a == 0 else 0)) for a, f in enumerate(fixed))}")
    if "tile_mismatch" in checks_on and mismatch is None:
        need = [ceil_to(2 * h + 3 * d, d) for h, d in zip(halo, subject.divisor, strict=True)]
        largest = max(max(im.shape[1:]) for _, im, _ in images)
        return (f"no verdict: tile mismatch could not be measured ({not_run.get('tile mismatch', 'not run')}); "
                f"give an image of at least {max(need)} voxels along its longest axis and {max(subject.divisor)} "
                f"along the others (halo {tuple(halo)}, size divisor {subject.divisor}; the largest given has "
                f"{largest})")
    if "disparity" in checks_on and has_train_mode and disparity is None:
        return ("no verdict: the network has normalization layers with running statistics but their train/eval "
                f"disparity was not measured ({not_run.get('train/eval disparity', 'no image measured it')})")
    return None


def _output_kind(subject: GateSubject, cfg: GateConfig, image: np.ndarray, halo: Sequence[int]) -> str:
    """``probability`` or ``regression`` (``GateConfig.output_kind``; auto: from the package's postprocessing, else
    from the range of one forward pass of a central tile of ``image``)."""
    import torch

    if cfg.output_kind != "auto":
        return cfg.output_kind
    if subject.descr is not None:
        ids = [str(p.id) for p in subject.descr.outputs[0].postprocessing if str(p.id) != "ensure_dtype"]
        if ids and ids[-1] in ("sigmoid", "softmax"):
            return "probability"
    tile = subject.fixed_shape or tiled_predictor_tile(halo, subject.divisor)
    size = tuple(min(t, s // d * d) if subject.free_sizes else t
                 for t, s, d in zip(tile, image.shape[1:], subject.divisor, strict=True))
    if any(s < 1 for s in size) or any(s > i for s, i in zip(size, image.shape[1:], strict=True)):
        return "probability"  # too small to look: the metrics will say so
    crop, _ = central_region(image, size)
    with torch.no_grad(), eval_mode(subject.network):
        y = subject.network(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None])
    lo, hi = float(y.min()), float(y.max())
    return "probability" if lo >= -1e-6 and hi <= 1 + 1e-6 else "regression"


def _out_channels(subject: GateSubject) -> int:
    """The network's output channel count (its ``out_channels``, else one forward pass of a small input)."""
    import torch

    value = getattr(subject.network, "out_channels", None)
    if isinstance(value, int):
        return value
    sizes = subject.size_min or subject.divisor
    probe = torch.zeros((1, subject.in_channels, *(max(d, s) for d, s in zip(subject.divisor, sizes, strict=True))))
    with torch.no_grad():
        return int(subject.network.cpu()(probe).shape[1])


def _write(report: GateReport, out: Path | None) -> GateReport:
    if out is None:
        return report
    seams = {CONSUMER_LABELS[c.consumer]: c.result for c in report.consumers if c.result is not None}
    extra: dict[str, Any] = {
        "gate": {
            "kind": report.kind, "name": report.name, "weights": report.weights_format,
            "halo_used": report.halo_used, "warnings": report.warnings, "timings_s": report.timings,
            "images": [im.model_dump(mode="json") for im in report.images],
            "consumers": [c.model_dump(mode="json", exclude={"result"}) for c in report.consumers],
            "config": report.config.model_dump(mode="json"),
        }
    }
    if report.bioimageio_test is not None:
        extra["bioimageio_test"] = report.bioimageio_test.model_dump(mode="json", exclude={"markdown"})
    paths = write_report(
        out, checks=report.checks, accepted=report.accepted, title="tilenorm-bmz validation gate",
        subject=f"{report.subject} ({report.kind}, {report.weights_format} weights)", data=report.data,
        tile_mismatch=report.tile_mismatch, disparity=report.disparity, seams=seams, halo=report.halo,
        sweep=report.sweep, receptive_field=report.receptive_field, extra=extra, device=report.device,
    )
    report.report_json, report.report_html = paths.json, paths.html
    return report



def gate_hook(
    config: GateConfig | None = None,
    data: ArrayOrPath | Sequence[ArrayOrPath] | None = None,
    labels: ArrayOrPath | Sequence[ArrayOrPath] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    repeat_bioimageio_test: bool = False,
    progress: bool = False,
) -> Callable[[Path], GateReport]:
    """A gate for ``export_package(gate=...)``: validates the tested candidate before it gets its final name.

    The export has just run the bioimage.io test on the candidate, so the gate does not repeat it unless
    ``repeat_bioimageio_test``. ``data``/``labels`` as in :func:`validate_package` (``None``: the package's own
    test input, with a warning that real data is better).
    """
    cfg = config or GateConfig()
    if not repeat_bioimageio_test:
        cfg = cfg.model_copy(update={"checks": [c for c in cfg.checks if c != "bioimageio"]})

    def gate(candidate: Path) -> GateReport:
        return validate_package(candidate, data, labels, config=cfg, out_dir=out_dir, name=name, progress=progress)

    return gate
