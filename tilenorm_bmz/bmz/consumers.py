"""Consumer emulation: predict an image the way each consumer really runs a package, and measure the seams.

A package can be seamless in one predictor and not in another: the consumers differ in where they apply the
preprocessing, how they pad the image border and how they cut the tiles. Each emulation below predicts the
image tiled and compares it with the same consumer's prediction of the whole image at once
(:func:`tilenorm_bmz.metrics.tiled_vs_whole`: ``max |tiled - whole|`` and a seam map), so what is measured is
the seam the tiling adds, not a difference between consumers.

``tilenorm-bmz`` (:class:`~tilenorm_bmz.tiling.TiledPredictor`)
    The package's preprocessing on the whole image (its per-image statistics once), tiles inside the image
    starting at multiples of the size step, zero padding at the image end, the halo cropped. Reference: one
    forward pass of the whole (zero-padded) image.
``bioimageio.core`` (0.11, ``predict(..., blocksize_parameter=n)``; by default the smallest ``n`` whose block
    is at least four halos, the cheapest one that still gives two blocks per axis; any ``n`` runs the same code)
    Its own blocked prediction (:meth:`PredictionPipeline.predict_sample_with_blocking`): preprocessing up to
    the last sample-wise operator on the whole sample, blocks of ``min + n * step`` (input halo included),
    the package's padding mode at the image border (``symmetric`` when it declares none), outputs cropped by
    the halo. Traps handled: ``n = 0`` is passed as a mapping (an int 0 becomes the default 10), ``n`` is
    reduced until the block fits the image (a larger block raises), and the sample is wrapped in a
    :class:`~bioimageio.core.Sample` with explicit axes (no axis-permutation guessing). Reference: the same
    preprocessing on the whole sample, then ``predict_sample_without_blocking`` (symmetric halo padding).
``ilastik`` (Neural Network workflow -> tiktorch -> bioimageio.core), pinned to the release it models:
    ilastik 1.4.2 with tiktorch 26.5 and bioimageio.core 0.10.2 (``ILASTIK_RELEASE``, named in the reports).
    Weights: TorchScript first, then the state dict. Tile: the smallest ``n`` such that some spatial axis of
    ``min + n * step`` reaches 512 (2D) / 64 (3D) (``InputAxisUtils.get_best_tile_shape``); blocks of
    ``tile - 2 * halo`` on a grid from the image origin, clipped to the image; each block's region plus the
    halo is extended to the tile shape (``(a + 1) // 2`` voxels before, ``a // 2`` after), reflect-padded
    outside the image, and predicted on its own with the package's **whole** preprocessing applied to that
    tile (tiktorch calls ``predict_sample_without_blocking`` per tile: per-image percentiles become per-tile
    percentiles); the block is cropped out of the tile output (lazyflow ``OpTikTorchClassifierPredict``).
    Reference: the preprocessing on the whole image, reflect padding by the halo, one forward pass.

``deepImageJ`` (JDLL ``TileCalculator`` / ``TileMaker``)
    The package's preprocessing on the whole image, then tiles of the image plus the halo on both sides rounded
    down to a valid size (a fixed size as it is; at most ``DEEPIMAGEJ_MAX_PIXELS`` voxels), on a grid of
    ``tile - 2 * halo`` from the image origin, mirror padding outside the image, the halo cropped. It runs the
    gate's network (TorchScript where the package has it). Reference: mirror padding by the halo, one forward
    pass. A parameterized package runs regions of the gate's size in one tile (not applicable: no seams there).

Each emulation runs on the central region of the image that holds two of its tiles (blocks) per axis, so its
cost does not grow with the image, and every seam position is still crossed on every axis; for a package the
region is a size bioimageio.core accepts as a whole sample (``size + 2 * halo = min + n * step``) and at most
``max_voxels`` voxels. The region is recorded in ``settings["region"]``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from ..config import GateConfig, GateConsumer
from ..introspect import ceil_to, resolve_device
from ..metrics import MetricResult, TiledVsWholeResult, tiled_vs_whole
from ..progress import track
from .subject import GateSubject, reorder_back

__all__ = [
    "CONSUMER_LABELS",
    "ILASTIK_MIN_SIZE",
    "ILASTIK_RELEASE",
    "ConsumerSeams",
    "DEEPIMAGEJ_MAX_PIXELS",
    "EMULATIONS",
    "Emulation",
    "deepimagej_tile_shape",
    "emulate_bioimageio_core",
    "emulate_deepimagej",
    "emulate_ilastik",
    "emulate_tiled_predictor",
    "ilastik_tile_shape",
    "per_tile_statistics",
    "tiled_predictor_region",
    "tiled_predictor_tile",
]

logger = logging.getLogger(__name__)

#: ilastik's tile target per dimensionality (``InputAxisUtils.MIN_SIZE_2D`` / ``MIN_SIZE_3D``).
ILASTIK_MIN_SIZE = {2: 512, 3: 64}
#: deepImageJ's largest tile in voxels (JDLL ``TileFactory.OPTIMAL_MAX_NUMBER_PIXELS``).
DEEPIMAGEJ_MAX_PIXELS = 4096 * 4096 * 3
#: The ilastik release the emulation follows (its tiktorch and bioimageio.core).
ILASTIK_RELEASE = "ilastik 1.4.2 (tiktorch 26.5, bioimageio.core 0.10.2)"
#: How each consumer is named in reports (the ``seams`` keys).
CONSUMER_LABELS: dict[str, str] = {
    "tilenorm-bmz": "tilenorm-bmz TiledPredictor",
    "bioimageio.core": "bioimageio.core blocked prediction",
    "ilastik": f"{ILASTIK_RELEASE}, emulated",
    "deepImageJ": "deepImageJ (JDLL tiling), emulated",
}


class ConsumerSeams(MetricResult):
    """The seams one consumer's tiling adds to a prediction (or why they could not be measured)."""

    consumer: GateConsumer
    applicable: bool
    reason: str = ""
    """Why the emulation did not run (empty when it did)."""
    description: str = ""
    """How the consumer ran, in words (tile/block shape, padding, where the preprocessing was applied)."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The numbers behind ``description`` (tile shape, halo, block size parameter, weights, ...)."""
    result: TiledVsWholeResult | None = None

    @property
    def label(self) -> str:
        return CONSUMER_LABELS[self.consumer]

    @property
    def max_abs_diff(self) -> float | None:
        return None if self.result is None else self.result.max_abs_diff


# -- geometry ---------------------------------------------------------------------------------------------
class _WholeSizes:
    """Sizes bioimageio.core accepts as a whole sample of a package, per spatial axis:
    ``size + 2 * halo = min + n * step``, i.e. ``size = low + k * step`` with ``low = min - 2 * halo``."""

    def __init__(self, subject: GateSubject) -> None:
        assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
        self.low = [m - 2 * h for m, h in zip(subject.size_min, subject.declared_halo, strict=True)]
        # a fixed size (step 0): the reference runs the network at other multiples of its divisor (free_sizes)
        self.step = [s if s > 0 else max(1, d) for s, d in zip(subject.size_step, subject.divisor, strict=True)]

    def fits(self, spatial: Sequence[int]) -> bool:
        return all(lo >= 1 and s >= lo for s, lo in zip(spatial, self.low, strict=True))

    def largest(self, a: int, limit: int) -> int:
        """The largest valid size <= ``limit`` (``limit >= low`` is the caller's to check)."""
        return self.low[a] + (limit - self.low[a]) // self.step[a] * self.step[a]

    def smallest(self, a: int, at_least: int) -> int:
        """The smallest valid size >= ``at_least``."""
        return self.low[a] + max(0, -(-(at_least - self.low[a]) // self.step[a])) * self.step[a]


def _cap(sizes: list[int], lower: Sequence[int], steps: Sequence[int], max_voxels: int | None) -> list[int]:
    """Shrink the largest axes by ``steps`` (not below ``lower``) until there are at most ``max_voxels``."""
    while max_voxels is not None and math.prod(sizes) > max_voxels:
        for a in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            if sizes[a] - steps[a] >= lower[a]:
                sizes[a] -= steps[a]
                break
        else:
            break
    return sizes


def _centre(raw: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, list[list[int]]]:
    """The central ``sizes`` region of ``raw`` ``(C, *spatial)`` and its ``[start, stop)`` per axis."""
    region = [[(s - r) // 2, (s - r) // 2 + r] for s, r in zip(raw.shape[1:], sizes, strict=True)]
    crop = raw[(slice(None), *(slice(a, b) for a, b in region))]
    return np.ascontiguousarray(crop), region


def tiled_predictor_tile(halo: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """The tile of the TiledPredictor emulation: an inner part of about one halo (at least 16 voxels in 3D,
    64 in 2D) plus the halo on both sides, a multiple of the divisor."""
    floor = 16 if len(halo) == 3 else 64
    return tuple(ceil_to(ceil_to(max(h, floor), d) + 2 * h, d) for h, d in zip(halo, divisor, strict=True))


def tiled_predictor_region(
    spatial: Sequence[int], halo: Sequence[int], divisor: Sequence[int], max_voxels: int | None = None
) -> tuple[int, ...]:
    """The region size that gives :func:`tiled_predictor_tile` two tiles per axis (seams to find), clipped to
    the image and to ``max_voxels``."""
    tile = tiled_predictor_tile(halo, divisor)
    sizes = [min(s, 2 * t - 2 * h) for s, t, h in zip(spatial, tile, halo, strict=True)]
    return tuple(_cap(sizes, [max(d, 1) for d in divisor], list(divisor), max_voxels))


def ilastik_tile_shape(size_min: Sequence[int], size_step: Sequence[int], dims: int) -> tuple[int, ...]:
    """ilastik's tile: ``min + n * step`` with the smallest per-axis ``n`` that makes an axis reach 512 / 64."""
    target = ILASTIK_MIN_SIZE[dims]
    factors = [max(0, math.ceil((target - m) / s)) for m, s in zip(size_min, size_step, strict=True) if s]
    n = min(factors, default=0)  # fixed sizes (step 0) stay as they are
    return tuple(m + n * s for m, s in zip(size_min, size_step, strict=True))


# -- helpers around a bioimageio.core pipeline ------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """bioimageio.core draws a tqdm bar (one line per update when stderr is not a terminal) for blocked
    prediction, with no switch to turn it off; its output is swallowed (errors still raise)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


class _Pipeline:
    """A bioimageio.core prediction pipeline of the subject's package, fed with canonical numpy arrays."""

    def __init__(self, subject: GateSubject, weights_format: str, device: str) -> None:
        from bioimageio.core import create_prediction_pipeline
        from bioimageio.core.axis import AxisId

        assert subject.descr is not None and subject.package_axes is not None
        self.subject = subject
        self.axes = subject.package_axes
        self.members = [t.id for t in subject.descr.inputs]
        self.out_members = [t.id for t in subject.descr.outputs]
        self.dims = [tuple(AxisId(a) for a in order) for order in self.axes.all_inputs]
        self.out_dims = [[AxisId(a) for a in order] for order in self.axes.all_outputs]
        self.weights_format = weights_format
        self.pp = create_prediction_pipeline(subject.descr, weights_format=weights_format,  # type: ignore[arg-type]
                                             devices=[device])

    def sample(self, image: np.ndarray) -> Any:
        """A canonical ``(C, *spatial)`` image (every input's channels one after the other) as a core Sample."""
        from bioimageio.core import Sample, Tensor

        xs = self.axes.split(np.ascontiguousarray(image, dtype=np.float32)[None])
        return Sample(members={m: Tensor(x, dims=d) for m, x, d in zip(self.members, xs, self.dims, strict=True)},
                      stat={}, id="gate")

    def output(self, sample: Any) -> np.ndarray:
        ys = [sample.members[m].transpose(d).to_numpy() for m, d in zip(self.out_members, self.out_dims,
                                                                          strict=True)]
        return np.asarray(self.axes.join(ys)[0], dtype=np.float32)

    def preprocessed(self, raw: np.ndarray) -> np.ndarray:
        """The whole image through the package's preprocessing (canonical ``(C, *spatial)``)."""
        s = self.sample(raw)
        self.pp.apply_preprocessing(s)
        parts = [reorder_back(s.members[m].transpose(list(d)).to_numpy(), order, self.axes.canonical)[0]
                 for m, d, order in zip(self.members, self.dims, self.axes.all_inputs, strict=True)]
        return np.asarray(np.concatenate(parts, axis=0), dtype=np.float32)

    def forward_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """Network + postprocessing of an already preprocessed input, no padding or cropping."""
        out = self.pp.predict_sample_without_blocking(
            self.sample(x), skip_preprocessing=True, skip_input_padding=True, skip_output_cropping=True
        )
        return self.output(out)

    def __enter__(self) -> _Pipeline:
        self.pp.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pp.__exit__(*exc)


def _no_reference(subject: GateSubject) -> str | None:
    """Why a tiled prediction of the subject has no whole-image prediction to be compared with (None: it has)."""
    if subject.free_sizes:
        return None
    return (f"the network runs only at its fixed input size {_shape(subject.fixed_shape or ())}: there is no "
            "whole-image prediction to compare the tiles with (tile mismatch compares overlapping tiles instead)")


def _not_applicable(consumer: GateConsumer, reason: str) -> ConsumerSeams:
    logger.warning("%s emulation not run: %s", CONSUMER_LABELS[consumer], reason)
    return ConsumerSeams(consumer=consumer, applicable=False, reason=reason)


def _weights(subject: GateSubject, preference: Sequence[str]) -> str:
    """The weight format a consumer runs: the only one the trust policy allows, else its first preference."""
    if subject.tested_format:
        return subject.tested_format
    return next((f for f in preference if f in subject.weight_formats), subject.weights_format)


def _crop_halo(y: np.ndarray, halo: Sequence[int]) -> np.ndarray:
    return y[(slice(None), *(slice(h, y.shape[1 + a] - h) for a, h in enumerate(halo)))]


def _shape(values: Sequence[int]) -> str:
    return "x".join(map(str, values))


# -- the emulations ---------------------------------------------------------------------------------------
def emulate_tiled_predictor(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    halo: Sequence[int],
    tile_shape: Sequence[int] | None = None,
    batch_size: int = 2,
    device: str = "auto",
    max_voxels: int | None = None,
) -> ConsumerSeams:
    """Seams of :class:`~tilenorm_bmz.tiling.TiledPredictor` on the central region of ``raw`` that holds two
    tiles per axis (the subject's preprocessing applied to that whole region first)."""
    from ..tiling import TiledPredictor

    if (why := _no_reference(subject)) is not None:
        return _not_applicable("tilenorm-bmz", why)
    tile = tuple(tile_shape) if tile_shape is not None else (
        subject.fixed_shape or tiled_predictor_tile(halo, subject.divisor))
    sizes = [min(s, 2 * t - 2 * h) for s, t, h in zip(raw.shape[1:], tile, halo, strict=True)]
    crop, region = _centre(raw, _cap(sizes, list(subject.divisor), list(subject.divisor), max_voxels))
    image = subject.preprocess(crop)
    dev = resolve_device(device)
    predictor = TiledPredictor(subject.network, tile_shape=tile, halo=tuple(halo), batch_size=batch_size,
                               device=dev, divisor=subject.divisor)
    result = tiled_vs_whole(predictor.predict, subject.network, image, device=dev, divisor=subject.divisor)
    grid = predictor.tiling(image.shape[1:]).grid_shape
    return ConsumerSeams(
        consumer="tilenorm-bmz", applicable=True, result=result,
        description=(f"tiles of {_shape(tile)} ({_shape(grid)} grid) with halo {_shape(halo)}, preprocessing on the "
                     "whole image, zero padding at the image end, halo cropped"),
        settings={"tile_shape": list(tile), "halo": list(halo), "grid": list(grid), "region": region,
                  "weights": subject.weights_format},
    )


def emulate_bioimageio_core(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    blocksize: int | None = None,
    device: str = "auto",
    max_voxels: int | None = None,
) -> ConsumerSeams:
    """Seams of bioimageio.core's blocked prediction of the central region of ``raw`` that holds one block (it
    is cut into at least two blocks per axis; see the module docstring)."""

    if not subject.is_package:
        return _not_applicable("bioimageio.core", "a checkpoint, not a package: package it first")
    if (why := _no_reference(subject)) is not None:
        return _not_applicable("bioimageio.core", why)
    fixed_out = [str(a.id) for a in subject.descr.outputs[0].axes
                 if str(getattr(a, "type", "")) == "space" and isinstance(getattr(a, "size", None), int)]
    if fixed_out:
        return _not_applicable(
            "bioimageio.core", f"the package declares fixed output sizes ({', '.join(fixed_out)}): bioimageio.core's "
            "blocked prediction gives an output of that size, so it cannot predict an image larger than one tile "
            "(declare the output sizes as references to the input's)")
    assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
    sizes = _WholeSizes(subject)
    if not sizes.fits(raw.shape[1:]):
        return _not_applicable("bioimageio.core", f"the image {_shape(raw.shape[1:])} is smaller than the package's "
                               "smallest whole sample")
    largest = [sizes.largest(a, s) for a, s in enumerate(raw.shape[1:])]
    if blocksize is None:  # the smallest block of at least 4 * halo: two blocks per axis of a one-block sample
        blocksize = max(0, *(-(-(4 * h - m) // st) if st else 0 for m, st, h in zip(
            subject.size_min, subject.size_step, subject.declared_halo, strict=True)))
    n = min(blocksize, *((r - m) // st if st else 0 for r, m, st in zip(
        largest, subject.size_min, subject.size_step, strict=True)))
    if n < 0:
        return _not_applicable(
            "bioimageio.core",
            f"the image {_shape(raw.shape[1:])} is smaller than the package's smallest block "
            f"{_shape(subject.size_min)} (bioimageio.core refuses blocks larger than the image)",
        )
    if n < blocksize:
        logger.info("bioimageio.core emulation: block size parameter %d reduced to %d to fit the image", blocksize, n)
    block = tuple(m + n * st for m, st in zip(subject.size_min, subject.size_step, strict=True))
    inner = [b - 2 * h for b, h in zip(block, subject.declared_halo, strict=True)]
    # the smallest sample holding a block: ceil(block / inner) >= 2 blocks per axis (core shifts the last one to
    # the border), so every seam position is crossed on every axis
    # (without a halo the inner block is the block: one voxel more makes the second block)
    want = [min(sizes.smallest(a, max(b, i + 1)), r) for a, (b, i, r) in enumerate(zip(block, inner, largest,
                                                                                      strict=True))]
    crop, region = _centre(raw, _cap(want, block, sizes.step, max_voxels))
    spatial = crop.shape[1:]
    descr = subject.descr
    fmt = _weights(subject, ("pytorch_state_dict", "torchscript", "onnx"))
    pad = getattr(descr.inputs[0], "pad", None)
    pad_mode = str(getattr(pad, "mode", None) or "symmetric")
    ns = {(t.id, a.id): n for t in descr.inputs for a in t.axes if _is_parameterized(a)}
    dev = str(resolve_device(device))

    with _Pipeline(subject, fmt, dev) as pipe:

        def tiled(image: np.ndarray) -> np.ndarray:
            with _quiet():
                out = pipe.pp.predict_sample_with_blocking(pipe.sample(image), ns=ns)
            return pipe.output(out)

        def whole(image: np.ndarray) -> np.ndarray:
            sample = pipe.sample(image)
            pipe.pp.apply_preprocessing(sample)
            return pipe.output(pipe.pp.predict_sample_without_blocking(sample, skip_preprocessing=True))

        result = tiled_vs_whole(tiled, whole, crop, device=dev)
    grid = [math.ceil(s / max(i, 1)) for s, i in zip(spatial, inner, strict=True)]
    return ConsumerSeams(
        consumer="bioimageio.core", applicable=True, result=result,
        description=(f"blocks of {_shape(block)} (n = {n}, inner {_shape(inner)}, {_shape(grid)} grid), {pad_mode} "
                     f"padding at the image border, preprocessing on the whole sample, {fmt} weights"),
        settings={"blocksize_parameter": n, "block_shape": list(block), "halo": list(subject.declared_halo),
                  "pad_mode": pad_mode, "weights": fmt, "grid": grid, "region": region},
    )


def _is_parameterized(axis: Any) -> bool:
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    return isinstance(getattr(axis, "size", None), ParameterizedSize)


def _ilastik_blocks(spatial: Sequence[int], tile: Sequence[int], halo: Sequence[int]) -> Iterator[
        tuple[tuple[slice, ...], tuple[slice, ...], tuple[tuple[int, int], ...], tuple[slice, ...]]]:
    """lazyflow's requests: (block in the image, read region, reflect padding, block inside the tile output)."""
    import itertools

    block = [t - 2 * h for t, h in zip(tile, halo, strict=True)]
    starts = [range(0, s, b) for s, b in zip(spatial, block, strict=True)]
    for origin in itertools.product(*starts):
        roi, read, pad, local = [], [], [], []
        for o, b, s, t, h in zip(origin, block, spatial, tile, halo, strict=True):
            stop = min(o + b, s)
            up0, up1 = o - h, stop + h
            a = t - (up1 - up0)
            up0, up1 = up0 - (a + 1) // 2, up1 + a // 2
            roi.append(slice(o, stop))
            read.append(slice(max(0, up0), min(up1, s)))
            pad.append((max(0, -up0), max(0, up1 - s)))
            local.append(slice(o - up0, stop - up0))
        yield tuple(roi), tuple(read), tuple(pad), tuple(local)


def emulate_ilastik(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    device: str = "auto",
    max_voxels: int | None = None,
    progress: bool = False,
) -> ConsumerSeams:
    """Seams of ilastik's tiled prediction of the central region of ``raw`` holding two of its blocks per axis
    (see the module docstring)."""

    if not subject.is_package:
        return _not_applicable("ilastik", "a checkpoint, not a package: package it first")
    if subject.descr is not None and len(subject.descr.inputs) > 1:
        return _not_applicable("ilastik", f"ilastik's neural network workflow runs models with one input; this one "
                               f"has {len(subject.descr.inputs)}")
    if (why := _no_reference(subject)) is not None:
        return _not_applicable("ilastik", why)
    assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
    halo = subject.declared_halo
    tile = ilastik_tile_shape(subject.size_min, subject.size_step, subject.dims)
    if any(t - 2 * h < 1 for t, h in zip(tile, halo, strict=True)):
        return _not_applicable("ilastik", f"ilastik's tile {_shape(tile)} leaves no block inside the halo {_shape(halo)}")
    sizes = _WholeSizes(subject)
    if not sizes.fits(raw.shape[1:]):
        return _not_applicable("ilastik", f"the image {_shape(raw.shape[1:])} is smaller than the package's smallest "
                               "whole sample (the reference prediction)")
    # two of ilastik's blocks per axis (a smaller image: all of it), a valid whole sample for the reference
    block = [t - 2 * h for t, h in zip(tile, halo, strict=True)]
    want = [sizes.largest(a, max(min(s, 2 * b), sizes.low[a])) for a, (s, b) in enumerate(zip(
        raw.shape[1:], block, strict=True))]
    crop, region = _centre(raw, _cap(want, sizes.low, sizes.step, max_voxels))
    fmt = _weights(subject, ("torchscript", "pytorch_state_dict", "onnx"))
    dev = str(resolve_device(device))
    spatial = crop.shape[1:]
    blocks = list(_ilastik_blocks(spatial, tile, halo))

    with _Pipeline(subject, fmt, dev) as pipe:

        def run_tile(x: np.ndarray) -> np.ndarray:  # tiktorch: the whole pipeline on one tile
            out = pipe.pp.predict_sample_without_blocking(
                pipe.sample(x), skip_input_padding=True, skip_output_cropping=True)
            return pipe.output(out)

        def tiled(image: np.ndarray) -> np.ndarray:
            result: np.ndarray | None = None
            for roi, read, pad, local in track(blocks, "ilastik emulation", progress):
                x = np.pad(image[(slice(None), *read)], ((0, 0), *pad), mode="reflect")
                y = run_tile(x)
                if result is None:
                    result = np.zeros((y.shape[0], *spatial), dtype=np.float32)
                result[(slice(None), *roi)] = y[(slice(None), *local)]
            assert result is not None
            return result

        def whole(image: np.ndarray) -> np.ndarray:
            x = np.pad(pipe.preprocessed(image), ((0, 0), *((h, h) for h in halo)), mode="reflect")
            return _crop_halo(pipe.forward_preprocessed(x), halo)

        result = tiled_vs_whole(tiled, whole, crop, device=dev)
    per_tile = _per_sample_steps(subject.descr)
    return ConsumerSeams(
        consumer="ilastik", applicable=True, result=result,
        description=(f"tiles of {_shape(tile)} (blocks of {_shape(t - 2 * h for t, h in zip(tile, halo, strict=True))}, "
                     f"{len(blocks)} tile(s)), reflect padding, the package's preprocessing applied per tile"
                     + (f" ({', '.join(per_tile)} statistics computed per tile)" if per_tile else "")
                     + f", {fmt} weights"),
        settings={"tile_shape": list(tile), "block_shape": [t - 2 * h for t, h in zip(tile, halo, strict=True)],
                  "halo": list(halo), "n_tiles": len(blocks), "weights": fmt, "pad_mode": "reflect",
                  "per_tile_statistics": per_tile, "region": region},
    )


def deepimagej_tile_shape(spatial: Sequence[int], size_min: Sequence[int], size_step: Sequence[int],
                          halo: Sequence[int], max_pixels: int | None = None) -> tuple[int, ...]:
    """deepImageJ's tile (JDLL ``TileCalculator``): per axis the image plus the halo on both sides, rounded down to
    a valid size ``min + n * step`` (a fixed size as it is), the largest axes reduced by a step until the tile
    has at most ``max_pixels`` voxels (``DEEPIMAGEJ_MAX_PIXELS``)."""
    limit = DEEPIMAGEJ_MAX_PIXELS if max_pixels is None else max_pixels
    tile = [m if st == 0 else m + max(0, (s + 2 * h - m) // st) * st
            for s, m, st, h in zip(spatial, size_min, size_step, halo, strict=True)]
    return tuple(_cap(tile, list(size_min), [max(1, st) for st in size_step], limit))


def emulate_deepimagej(
    subject: GateSubject,
    raw: np.ndarray,
    *,
    device: str = "auto",
    max_voxels: int | None = None,
    batch_size: int = 1,
) -> ConsumerSeams:
    """Seams of deepImageJ's tiled prediction (see the module docstring) on the central region of ``raw`` that
    holds two of its tiles per axis (a parameterized package: at most ``max_voxels``, which deepImageJ runs in
    one tile unless the size steps leave a remainder)."""
    import torch

    if not subject.is_package:
        return _not_applicable("deepImageJ", "a checkpoint, not a package: package it first")
    if (why := _no_reference(subject)) is not None:
        return _not_applicable("deepImageJ", why)
    if subject.weights_format == "pytorch_state_dict" and "torchscript" not in subject.weight_formats:
        return _not_applicable("deepImageJ", "deepImageJ runs TorchScript (or ONNX/TensorFlow) weights; the package "
                               "has a PyTorch state dict only (add TorchScript weights: `bioimageio add-weights`)")
    assert subject.size_min is not None and subject.size_step is not None and subject.declared_halo is not None
    halo, div = subject.declared_halo, subject.divisor
    fixed = subject.fixed_shape
    if fixed is not None:  # two tiles per axis
        want = [min(s, 2 * (t - 2 * h)) for s, t, h in zip(raw.shape[1:], fixed, halo, strict=True)]
    else:
        want = list(raw.shape[1:])
    # the reference runs the region plus the halo in one forward pass: a multiple of the divisor
    want = [max(d - 2 * h, (w + 2 * h) // d * d - 2 * h) for w, h, d in zip(want, halo, div, strict=True)]
    crop, region = _centre(raw, _cap(want, [max(1, d - 2 * h) for h, d in zip(halo, div, strict=True)],
                                     list(div), max_voxels))
    spatial = crop.shape[1:]
    tile = deepimagej_tile_shape(spatial, subject.size_min, subject.size_step, halo)
    inner = [t - 2 * h for t, h in zip(tile, halo, strict=True)]
    if any(i < 1 for i in inner):
        return _not_applicable("deepImageJ", f"its tile {_shape(tile)} leaves nothing inside the halo {_shape(halo)}")
    grid = [math.ceil(s / i) for s, i in zip(spatial, inner, strict=True)]
    dev = resolve_device(device)
    net = subject.network

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(dev))
        return y[0].float().cpu().numpy()

    def mirror(image: np.ndarray, read: Sequence[tuple[int, int]]) -> np.ndarray:
        """``image[read]`` with the part outside the image mirrored (``reflect``: the border voxel once)."""
        inside = tuple(slice(max(0, a), min(b, s)) for (a, b), s in zip(read, image.shape[1:], strict=True))
        pad = [(max(0, -a), max(0, b - s)) for (a, b), s in zip(read, image.shape[1:], strict=True)]
        return np.pad(image[(slice(None), *inside)], ((0, 0), *pad), mode="reflect")

    def tiled(image: np.ndarray) -> np.ndarray:  # preprocessing on the whole image, then tiles
        import itertools

        x = subject.preprocess(image)
        result: np.ndarray | None = None
        for index in itertools.product(*(range(g) for g in grid)):
            starts = [k * i for k, i in zip(index, inner, strict=True)]
            y = forward(mirror(x, [(o - h, o - h + t) for o, h, t in zip(starts, halo, tile, strict=True)]))
            if result is None:
                result = np.zeros((y.shape[0], *spatial), dtype=np.float32)
            stops = [min(o + i, s) for o, i, s in zip(starts, inner, spatial, strict=True)]
            result[(slice(None), *(slice(o, e) for o, e in zip(starts, stops, strict=True)))] = y[
                (slice(None), *(slice(h, h + e - o) for h, o, e in zip(halo, starts, stops, strict=True)))]
        assert result is not None
        return result

    def whole(image: np.ndarray) -> np.ndarray:
        x = subject.preprocess(image)
        return _crop_halo(forward(mirror(x, [(-h, s + h) for h, s in zip(halo, spatial, strict=True)])), halo)

    if all(g == 1 for g in grid):
        return _not_applicable(
            "deepImageJ", f"deepImageJ runs this {_shape(spatial)} region in one tile of {_shape(tile)} (its tiles "
            f"reach the image plus the halo, up to {DEEPIMAGEJ_MAX_PIXELS} voxels): it tiles only larger images")
    result = tiled_vs_whole(tiled, whole, crop, device=str(dev))
    return ConsumerSeams(
        consumer="deepImageJ", applicable=True, result=result,
        description=(f"tiles of {_shape(tile)} (inner {_shape(inner)}, {_shape(grid)} grid), mirror padding at the "
                     f"image border, preprocessing on the whole image, {subject.weights_format} weights"),
        settings={"tile_shape": list(tile), "halo": list(halo), "grid": grid, "pad_mode": "reflect",
                  "weights": subject.weights_format, "region": region},
    )


def _per_sample_steps(descr: Any) -> list[str]:
    """Preprocessing operators whose statistics ilastik computes per tile (per-sample statistics)."""
    out = []
    for p in (p for t in descr.inputs for p in t.preprocessing):
        pid = str(p.id)
        kwargs = getattr(p, "kwargs", None)
        axes = getattr(kwargs, "axes", None)
        dataset = axes is None or any(str(a) == "batch" for a in (axes or []))
        if pid in ("scale_range", "zero_mean_unit_variance") and not dataset:
            out.append(pid)
        elif pid == "clip" and (getattr(kwargs, "min_percentile", None) is not None
                                or getattr(kwargs, "max_percentile", None) is not None):
            out.append("clip (percentiles)")
    return out


def per_tile_statistics(subject: GateSubject) -> list[str]:
    """The package's preprocessing steps that depend on the image they are computed on (empty: none)."""
    return [] if subject.descr is None else _per_sample_steps(subject.descr)


# -- the registry: every consumer the gate emulates, in one place -----------------------------------------
class Emulation(Protocol):
    """One consumer's emulation: the seams its tiling adds to ``raw`` ``(C, *spatial)`` (see the module
    docstring); ``halo`` is the halo the gate tiles with (the package's declared one)."""

    def __call__(self, subject: GateSubject, raw: np.ndarray, *, halo: Sequence[int], config: GateConfig,
                 device: str, progress: bool) -> ConsumerSeams: ...


#: The consumers the gate emulates, by name (``GateConsumer``), in report order. Adding a consumer: an
#: emulation function in a module of its own, one entry here, and its name in ``GateConsumer``.
EMULATIONS: dict[str, Emulation] = {
    "tilenorm-bmz": lambda subject, raw, *, halo, config, device, progress: emulate_tiled_predictor(
        subject, raw, halo=halo, batch_size=config.batch_size, device=device, max_voxels=config.region_voxels),
    "bioimageio.core": lambda subject, raw, *, halo, config, device, progress: emulate_bioimageio_core(
        subject, raw, blocksize=config.core_blocksize, device=device, max_voxels=config.region_voxels),
    "ilastik": lambda subject, raw, *, halo, config, device, progress: emulate_ilastik(
        subject, raw, device=device, max_voxels=config.region_voxels, progress=progress),
    "deepImageJ": lambda subject, raw, *, halo, config, device, progress: emulate_deepimagej(
        subject, raw, device=device, max_voxels=config.region_voxels),
}

