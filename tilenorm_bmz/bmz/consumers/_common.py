"""What every consumer emulation shares: the result, the registry, the region and pipeline helpers."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from ...config import GateConfig, GateConsumer
from ...introspect import ceil_to
from ...metrics import MetricResult, TiledVsWholeResult
from ..subject import GateSubject, input_sample, sample_inputs

logger = logging.getLogger(__name__)


class Emulation(Protocol):
    """One consumer's emulation: the seams its tiling adds to ``raw`` ``(C, *spatial)`` (see the package
    docstring); ``halo`` is the halo the gate tiles with (the package's declared one)."""

    def __call__(self, subject: GateSubject, raw: np.ndarray, *, halo: Sequence[int], config: GateConfig,
                 device: str, progress: bool) -> ConsumerSeams: ...


#: The consumers the gate emulates, by name (``GateConsumer``), in the order their modules register them.
EMULATIONS: dict[str, Emulation] = {}
#: How each consumer is named in reports (the ``seams`` keys).
CONSUMER_LABELS: dict[str, str] = {}


def register(name: GateConsumer, label: str) -> Callable[[Emulation], Emulation]:
    """Register a consumer's emulation under ``name`` (one module per consumer calls this once)."""
    def add(emulation: Emulation) -> Emulation:
        if name in EMULATIONS:
            raise ValueError(f"consumer {name!r} is registered twice")
        EMULATIONS[name] = emulation
        CONSUMER_LABELS[name] = label
        return emulation

    return add


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


def central_region(raw: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, list[list[int]]]:
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
        self.out_members = [t.id for t in subject.descr.outputs]
        self.out_dims = [[AxisId(a) for a in order] for order in self.axes.all_outputs]
        self.weights_format = weights_format
        self.pp = create_prediction_pipeline(subject.descr, weights_format=weights_format,  # type: ignore[arg-type]
                                             devices=[device])

    def sample(self, image: np.ndarray) -> Any:
        """A canonical ``(C, *spatial)`` image (every input's channels one after the other) as a core Sample."""
        return input_sample(self.subject.descr, self.axes, image)

    def output(self, sample: Any) -> np.ndarray:
        ys = [sample.members[m].transpose(d).to_numpy() for m, d in zip(self.out_members, self.out_dims,
                                                                          strict=True)]
        return np.asarray(self.axes.join(ys)[0], dtype=np.float32)

    def preprocessed(self, raw: np.ndarray) -> np.ndarray:
        """The whole image through the package's preprocessing (canonical ``(C, *spatial)``)."""
        s = self.sample(raw)
        self.pp.apply_preprocessing(s)
        return np.asarray(sample_inputs(s, self.subject.descr, self.axes), dtype=np.float32)

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


def _is_parameterized(axis: Any) -> bool:
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    return isinstance(getattr(axis, "size", None), ParameterizedSize)


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
