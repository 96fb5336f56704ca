"""What the validation gate validates: a bioimage.io package or a tilenorm-bmz checkpoint, made uniform.

:func:`load_subject` turns a model source into a :class:`GateSubject`: the network as a channel-first
``nn.Module`` (``(B, C, *spatial)`` with spatial axes in z, y, x order, whatever order the package
declares), the package's declared geometry (size ``min``/``step``, output halo), its preprocessing as a
function on raw ``(C, *spatial)`` arrays, and its own test input. The source is only read: zips are opened
read-only by bioimageio.spec.

Weights: ``pytorch_state_dict`` is rebuilt with :func:`~tilenorm_bmz.bmz.read_package_model` (train mode
exists, so train/eval disparity is measured); ``torchscript`` is loaded with ``torch.jit.load`` (a scripted
module keeps its train/eval semantics; a traced one is reported as not applicable by the disparity metric);
``onnx`` runs in onnxruntime (:class:`~tilenorm_bmz.bmz.package_io.OnnxNetwork`: no train mode, no gradients;
its receptive field is measured from its impulse response). Packages with none of these are outside the gate
(``GateInputError(not_applicable=True)``).

Sizes: parameterized (``min + n * step``) or fixed (step 0: ilastik and deepImageJ tile such a model with tiles
of exactly that size, and so do the gate's measurements). For a fixed size the subject probes whether the
network also runs at other sizes (``free_sizes``, with the step it needs as ``divisor``), which the whole-image
references and the receptive field need.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import GateConfig
from ..errors import TilenormError

__all__ = ["GateInputError", "GateSubject", "PackageAxes", "load_subject", "reorder", "reorder_back"]

logger = logging.getLogger(__name__)

_SPATIAL = ("z", "y", "x")


class GateInputError(TilenormError, ValueError):
    """The gate cannot run on this input (exit code 2); the message says why and what to change.

    ``not_applicable`` marks inputs of a kind the gate does not handle (not a model, no PyTorch weights), as
    opposed to broken inputs (a corrupt zip, data with the wrong channel count).
    """

    def __init__(self, message: str, *, not_applicable: bool = False) -> None:
        super().__init__(message)
        self.not_applicable = not_applicable


@dataclass(frozen=True)
class PackageAxes:
    """Axis bookkeeping between the gate's canonical ``(B, C, *spatial)`` and a package's declared order."""

    input: tuple[str, ...]
    """The package's input axis ids in declared order (``batch``, ``channel``, space ids)."""
    output: tuple[str, ...]
    spatial: tuple[str, ...]
    """Spatial axis ids in canonical (z, y, x) order."""
    zoom: tuple[int, ...] = ()
    """Per spatial axis, how the output's grid relates to the input's (empty: the same on every axis): ``k > 1``
    an output ``k`` times finer (super-resolution), ``-k`` an output ``k`` times coarser."""
    inputs: tuple[tuple[str, ...], ...] = ()
    """Several inputs: each one's axis ids in declared order (empty: the one ``input``)."""
    outputs: tuple[tuple[str, ...], ...] = ()
    """Several outputs: each one's axis ids in declared order (empty: the one ``output``)."""
    input_channels: tuple[int, ...] = ()
    """Several inputs: the channels of each; the gate's canonical input holds them one after the other."""

    @property
    def all_inputs(self) -> tuple[tuple[str, ...], ...]:
        return self.inputs or (self.input,)

    @property
    def all_outputs(self) -> tuple[tuple[str, ...], ...]:
        return self.outputs or (self.output,)

    def split(self, x: Any) -> list[Any]:
        """Canonical ``(B, C, *spatial)`` (every input's channels one after the other) -> each input in its order."""
        if not self.inputs:
            return [self.to_package(x)]
        out, start = [], 0
        for axes, c in zip(self.inputs, self.input_channels, strict=True):
            out.append(reorder(x[:, start:start + c], self.canonical, axes))
            start += c
        return out

    def from_package(self, y: Any) -> Any:
        """The package's (only) output in its order -> canonical ``(B, C, *spatial)`` on the input's grid."""
        return self.join([y])

    def gather(self, xs: Sequence[Any]) -> Any:
        """Each input in its declared order -> one canonical ``(B, C, *spatial)`` (the inverse of ``split``)."""
        return _concat_channels([reorder_back(x, axes, self.canonical) for x, axes in zip(xs, self.all_inputs,
                                                                                       strict=True)])

    def join(self, ys: Sequence[Any]) -> Any:
        """Each output in its declared order -> one canonical ``(B, C, *spatial)`` on the input's grid."""
        return _concat_channels([to_input_grid(reorder_back(y, axes, self.canonical), self.zoom)
                                 for y, axes in zip(ys, self.all_outputs, strict=True)])

    @property
    def canonical(self) -> tuple[str, ...]:
        return ("batch", "channel", *self.spatial)

    def to_package(self, x: np.ndarray) -> np.ndarray:
        """Canonical ``(B, C, *spatial)`` -> the package's input order (dropping absent batch/channel axes)."""
        return reorder(x, self.canonical, self.input)

    @property
    def is_canonical(self) -> bool:
        return self.input == self.canonical and self.output == self.canonical and not any(
            z not in (0, 1) for z in self.zoom) and not self.inputs and not self.outputs


def _concat_channels(parts: Sequence[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    return torch.cat(list(parts), dim=1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, axis=1)


def input_sample(descr: Any, axes: PackageAxes, image: np.ndarray) -> Any:
    """A canonical ``(C, *spatial)`` image (every input's channels one after the other) as a bioimageio.core
    ``Sample`` holding each of the package's inputs in its declared axis order."""
    from bioimageio.core import Sample, Tensor
    from bioimageio.core.axis import AxisId

    xs = axes.split(np.ascontiguousarray(image, dtype=np.float32)[None])
    return Sample(members={t.id: Tensor(x, dims=tuple(AxisId(a) for a in order))
                           for t, x, order in zip(descr.inputs, xs, axes.all_inputs, strict=True)},
                  stat={}, id="gate")


def sample_inputs(sample: Any, descr: Any, axes: PackageAxes) -> np.ndarray:
    """The package's inputs in a bioimageio.core ``Sample`` -> one canonical ``(C, *spatial)`` image (the inverse
    of :func:`input_sample`; the dtype as stored)."""
    from bioimageio.core.axis import AxisId

    xs = [sample.members[t.id].transpose([AxisId(a) for a in order]).to_numpy()
          for t, order in zip(descr.inputs, axes.all_inputs, strict=True)]
    return np.asarray(axes.gather(xs)[0])


def to_input_grid(y: Any, zoom: Sequence[int]) -> Any:
    """An output ``(B, C, *spatial)`` on another grid than the input, losslessly on the input's grid: a coarser
    output (``zoom = -k``) repeats each voxel ``k`` times along the axis; a finer one (``zoom = k``) moves each
    run of ``k`` voxels into ``k`` times the channels (space to depth), so the metrics compare every output voxel
    at the input position it belongs to."""
    for a, z in enumerate(zoom):
        axis = 2 + a
        if z < -1:
            y = y.repeat_interleave(-z, dim=axis) if isinstance(y, torch.Tensor) else np.repeat(y, -z, axis=axis)
        elif z > 1:
            shape = list(y.shape)
            n = shape[axis] // z
            split = [*shape[:axis], n, z, *shape[axis + 1:]]
            y = y.reshape(split)
            y = (y.movedim(axis + 1, 2) if isinstance(y, torch.Tensor) else np.moveaxis(y, axis + 1, 2))
            merged = list(y.shape)
            y = y.reshape([merged[0], merged[1] * merged[2], *merged[3:]])
    return y


def reorder(x: Any, src: Sequence[str], dst: Sequence[str]) -> Any:
    """Permute an array or tensor with axes ``src`` to ``dst``; axes missing in ``dst`` must have length 1."""
    for i, a in enumerate(src):
        if a not in dst:
            if x.shape[i] != 1:
                raise GateInputError(f"the package has no {a!r} axis, but the data has {x.shape[i]} along it")
    keep = [i for i, a in enumerate(src) if a in dst]
    squeeze = tuple(i for i, a in enumerate(src) if a not in dst)
    y = x.squeeze(squeeze) if squeeze else x
    kept = [src[i] for i in keep]
    return y.permute(*[kept.index(a) for a in dst]) if isinstance(y, torch.Tensor) else np.transpose(
        y, [kept.index(a) for a in dst])


def reorder_back(y: Any, src: Sequence[str], dst: Sequence[str]) -> Any:
    """Permute an array or tensor with axes ``src`` to ``dst``, adding length-1 axes missing in ``src``."""
    for a in dst:
        if a not in src:
            y = y.unsqueeze(-1) if isinstance(y, torch.Tensor) else y[..., None]
            src = (*src, a)
    order = [list(src).index(a) for a in dst]
    return y.permute(*order) if isinstance(y, torch.Tensor) else np.transpose(y, order)


class _AxisAdapter(nn.Module):
    """Run a network that declares another axis order as a canonical ``(B, C, *spatial)`` network."""

    def __init__(self, network: nn.Module, axes: PackageAxes) -> None:
        super().__init__()
        self.network = network
        self._axes = axes
        if axes.inputs:  # the canonical input holds every input's channels
            self.in_channels = sum(axes.input_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "batch" not in self._axes.input:  # one sample at a time
            return torch.cat([self.forward_one(x[i : i + 1]) for i in range(x.shape[0])])
        return self.forward_one(x)

    def forward_one(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(*self._axes.split(x))
        return self._axes.join(list(y) if isinstance(y, tuple | list) else [y])


class _Sigmoid(nn.Module):
    """The network followed by the package's ``sigmoid`` postprocessing."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        if isinstance(getattr(network, "in_channels", None), int):
            self.in_channels = network.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(x))


@dataclass(eq=False)
class GateSubject:
    """A model the gate can measure, whatever it was loaded from."""

    source: Path
    kind: Literal["package", "checkpoint"]
    name: str
    dims: int
    in_channels: int
    network: nn.Module
    """Canonical ``(B, C, *spatial)`` network in eval mode, with the package's sigmoid postprocessing."""
    weights_format: str
    """``pytorch_state_dict``, ``torchscript`` or ``checkpoint``."""
    divisor: tuple[int, ...]
    preprocess: Callable[[np.ndarray], np.ndarray]
    """Raw ``(C, *spatial)`` -> the network input, as the package (or checkpoint) declares it, on the whole array."""
    axes: tuple[str, ...] = ()
    """Spatial axis ids (z, y, x order)."""
    declared_halo: tuple[int, ...] | None = None
    """The package's output halo per spatial axis (None for checkpoints)."""
    size_min: tuple[int, ...] | None = None
    size_step: tuple[int, ...] | None = None
    """The package's input sizes per spatial axis: ``min + n * step``; a step of 0 is a fixed size (``min``)."""
    free_sizes: bool = True
    """The network runs at sizes other than the declared ones (multiples of ``divisor``): always for
    parameterized sizes; for a fixed size, probed (a fully convolutional network does, one with a fixed-size
    operation does not). Without it there is no whole-image prediction to compare tiles with."""
    descr: Any = None
    """The bioimage.io model description (format ``latest``) of a package."""
    package_axes: PackageAxes | None = None
    weight_formats: tuple[str, ...] = ()
    format_error: str | None = None
    """Why the package's description is invalid (then nothing but the bioimage.io test can run)."""
    test_input: np.ndarray | None = None
    """The package's own test input, raw ``(C, *spatial)``."""
    normalization: dict[str, Any] | None = None
    """The checkpoint's recorded input normalization (``InputNormalization`` fields)."""
    checkpoint_info: Any = None
    notes: list[str] = field(default_factory=list)
    tested_format: str | None = None
    """The only weight format the bioimage.io test may run (None: all); set when the others need trust."""

    @property
    def is_package(self) -> bool:
        return self.kind == "package"

    @property
    def fixed_shape(self) -> tuple[int, ...] | None:
        """The input tile every consumer runs when the package declares fixed sizes (None: parameterized).

        An axis with a fixed size has it here; a parameterized axis of a package that fixes another one has its
        smallest size that is at least the fixed sizes' largest."""
        if self.size_min is None or self.size_step is None or all(s > 0 for s in self.size_step):
            return None
        top = max(m for m, s in zip(self.size_min, self.size_step, strict=True) if s == 0)
        return tuple(m if s == 0 else m + max(0, -(-(top - m) // s)) * s
                     for m, s in zip(self.size_min, self.size_step, strict=True))


# -- checkpoints -----------------------------------------------------------------------------------------
def _checkpoint_subject(path: Path, trust_code: bool) -> GateSubject:
    from ..config import InputNormalization
    from ..data import fit_normalization
    from .opening import open_model

    handle = open_model(path, trust_code=trust_code, allow=("checkpoint", "bioimageio"))
    model, info, dims = handle.network, handle.checkpoint_info, handle.dims
    recorded = handle.input_normalization
    notes: list[str] = []
    if recorded:
        settings = InputNormalization.model_validate(recorded)
    else:
        settings = InputNormalization()
        notes.append("the checkpoint records no input normalization: global quantiles 0.01/0.98 are used")
        logger.warning(notes[-1])

    def preprocess(raw: np.ndarray) -> np.ndarray:
        return fit_normalization(settings, raw).apply(raw)

    return GateSubject(
        source=path, kind="checkpoint", name=path.name, dims=dims, in_channels=handle.in_channels,
        network=model.eval(), weights_format="checkpoint", divisor=handle.divisor,
        preprocess=preprocess, axes=_SPATIAL[3 - dims:], normalization=settings.model_dump(mode="json"),
        checkpoint_info=info, notes=notes,
    )


# -- packages --------------------------------------------------------------------------------------------
def _descr_errors(descr: Any) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in descr.validation_summary.details for e in d.errors
    ) or "invalid description"


def _load_descr(source: Path) -> tuple[Any, str | None]:
    """(model description in format 0.5, None) or (None, why the description is invalid).

    The format verdict is the reference validator's: the description is validated in its own format version
    (``format_version="discover"``, what ``bioimageio.core``'s test does). A valid 0.4 description that
    bioimageio.spec cannot convert to 0.5 (e.g. a fixed output shape with a halo) is valid: the gate then
    gives no verdict on it (not applicable, with the converter's reason) instead of calling it invalid.
    """
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_4, v0_5

    try:
        descr = load_description(source, perform_io_checks=False, format_version="discover")
    except Exception as e:  # unreadable rdf or archive
        raise GateInputError(f"{source} is not a readable bioimage.io package: {e}") from e
    if isinstance(descr, InvalidDescr):
        return None, _descr_errors(descr)
    if not isinstance(descr, v0_4.ModelDescr | v0_5.ModelDescr):
        raise GateInputError(f"{source} describes a {descr.type!r}, not a model: the gate validates models",
                             not_applicable=True)
    if isinstance(descr, v0_5.ModelDescr):
        return descr, None
    rewritten = _fixed_output_as_reference(descr)
    if rewritten is not None:
        return rewritten, None
    latest = load_description(source, perform_io_checks=False, format_version="latest")
    if isinstance(latest, InvalidDescr):
        raise GateInputError(
            f"{source} is a valid bioimage.io {descr.format_version} model (bioimageio.spec validates it), but "
            f"bioimageio.spec cannot convert it to format 0.5, which the gate reads: {_descr_errors(latest)[:600]}",
            not_applicable=True,
        )
    return latest, None


def _fixed_output_as_reference(descr: Any) -> Any:
    """A 0.4 model with a fixed input shape and a fixed output shape with a halo, in format 0.5 (else None).

    bioimageio.spec's 0.4 -> 0.5 converter refuses a fixed output size with a halo ("output axis with halo and
    fixed size not allowed"), although the description is valid and bioimageio.core runs it. When the output's
    spatial sizes equal the input's, the fixed output shape is the same thing as an implicit one (the input's
    shape, scale 1, offset 0; the channel axis keeps its own size), which converts.
    """
    import warnings

    from bioimageio.spec import InvalidDescr, update_format
    from bioimageio.spec.model import v0_4

    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        return None
    inp, out = descr.inputs[0], descr.outputs[0]
    if not (isinstance(inp.shape, list | tuple) and isinstance(out.shape, list | tuple)) or inp.axes != out.axes:
        return None
    if not any(out.halo or []):
        return None  # without a halo the converter handles it
    scale, offset = [], []
    for axis, a, b in zip(out.axes, inp.shape, out.shape, strict=True):
        if a == b:
            scale.append(1.0)
            offset.append(0)
        elif axis == "c":
            scale.append(0.0)
            offset.append(b / 2)  # 0.4: out = in * scale + 2 * offset
        else:
            return None
    implicit = v0_4.ImplicitOutputShape(reference_tensor=inp.name, scale=scale, offset=offset)
    rewritten = descr.model_copy(update={"outputs": [out.model_copy(update={"shape": implicit})]})
    with warnings.catch_warnings():  # "conversion of channel size from an implicit output shape may be wrong"
        warnings.simplefilter("ignore", UserWarning)
        latest = update_format(rewritten)
    if isinstance(latest, InvalidDescr):
        return None
    channels = [len(a.channel_names) for a in latest.outputs[0].axes if _axis_type(a) == "channel"]
    if "c" in out.axes and channels != [out.shape[out.axes.index("c")]]:
        logger.warning("0.4 output shape rewrite gave channels %s; not used", channels)
        return None
    logger.info("%s: its fixed output shape with a halo is read as the input's shape (format 0.4 -> 0.5)",
                descr.name)
    return latest


def _axis_type(axis: Any) -> str:
    return str(getattr(axis, "type", ""))


def _same_grid(descr: Any) -> str | None:
    """Why the package's inputs (outputs) are not all on the first input's (first output's) spatial grid."""
    from bioimageio.spec.model.v0_5 import SizeReference

    first_in, first_out = descr.inputs[0], descr.outputs[0]

    def check(tensors: Sequence[Any], first: Any, what: str) -> str | None:
        ref = {str(a.id): a for a in first.axes if _axis_type(a) == "space"}
        for t in tensors[1:]:
            own = {str(a.id): a for a in t.axes if _axis_type(a) == "space"}
            if set(own) != set(ref):
                return f"{what} {t.id!r} has the spatial axes {sorted(own)}, not {sorted(ref)}"
            for name, a in own.items():
                size, r = getattr(a, "size", None), ref[name]
                same = size == getattr(r, "size", None) or (
                    isinstance(size, SizeReference) and size.offset == 0 and str(size.axis_id) == name
                    and str(size.tensor_id) in (str(first_in.id), str(first.id))
                    and float(getattr(a, "scale", 1.0)) == float(getattr(r, "scale", 1.0)))
                if not same:
                    return f"{what} {t.id!r} axis {name!r} has the size {size}, not the one of {first.id!r}"
        return None

    return check(descr.inputs, first_in, "input") or check(descr.outputs, first_out, "output")


def _package_axes(descr: Any) -> PackageAxes:
    if len(descr.inputs) > 1 or len(descr.outputs) > 1:
        why = _same_grid(descr)
        if why is not None:
            raise GateInputError(
                f"the package has {len(descr.inputs)} input(s) and {len(descr.outputs)} output(s), not on one "
                f"spatial grid ({why}): the gate tiles every input with the same blocks", not_applicable=True)

    def ids(tensor: Any, what: str) -> tuple[str, ...]:
        out = []
        for a in tensor.axes:
            kind = _axis_type(a)
            if kind in ("batch", "channel"):
                out.append(kind)
            elif kind == "space" and str(a.id) in _SPATIAL:
                out.append(str(a.id))
            else:
                raise GateInputError(
                    f"the package's {what} has a {kind} axis {str(a.id)!r}; the gate handles batch, channel and "
                    "z/y/x space axes", not_applicable=True,
                )
        return tuple(out)

    inp, outp = ids(descr.inputs[0], "input"), ids(descr.outputs[0], "output")
    spatial = tuple(a for a in _SPATIAL if a in inp)
    if len(spatial) not in (2, 3) or tuple(a for a in _SPATIAL if a in outp) != spatial:
        raise GateInputError(
            f"input axes {inp} / output axes {outp}: the gate needs 2 or 3 spatial axes, the same on input and "
            "output", not_applicable=True,
        )
    if len(descr.inputs) == 1 and len(descr.outputs) == 1:
        return PackageAxes(input=inp, output=outp, spatial=spatial)
    return PackageAxes(input=inp, output=outp, spatial=spatial,
                       inputs=tuple(ids(t, f"input {t.id!r}") for t in descr.inputs),
                       outputs=tuple(ids(t, f"output {t.id!r}") for t in descr.outputs),
                       input_channels=tuple(_channels(t) for t in descr.inputs))


def _zoom(ratio: float) -> int | None:
    """Output size / input size -> ``PackageAxes.zoom`` (1 for the same grid; None: not an integer factor)."""
    if abs(ratio - 1.0) < 1e-9:
        return 1
    if ratio > 1 and abs(ratio - round(ratio)) < 1e-9:
        return round(ratio)
    if ratio < 1 and abs(1 / ratio - round(1 / ratio)) < 1e-9:
        return -round(1 / ratio)
    return None


def _geometry(descr: Any, axes: PackageAxes) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...],
                                                      tuple[int, ...]]:
    """(min, step, halo in input voxels, zoom) per spatial axis in canonical order."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize, SizeReference

    sizes: dict[str, tuple[int, int]] = {}
    for a in descr.inputs[0].axes:
        if _axis_type(a) != "space":
            continue
        if isinstance(a.size, ParameterizedSize):
            sizes[str(a.id)] = (int(a.size.min), int(a.size.step))
        elif isinstance(a.size, int):  # a fixed size: every consumer runs tiles of exactly this size
            sizes[str(a.id)] = (int(a.size), 0)
        else:
            raise GateInputError(
                f"input axis {str(a.id)!r} takes its size from another tensor ({a.size}): the gate handles one input "
                "whose size is fixed or min + n * step", not_applicable=True,
            )
    input_scale = {str(a.id): float(getattr(a, "scale", 1.0)) for a in descr.inputs[0].axes
                   if _axis_type(a) == "space"}
    halos: dict[str, int] = {}
    zooms: dict[str, int] = {}
    for a in descr.outputs[0].axes:
        if _axis_type(a) != "space":
            continue
        size = getattr(a, "size", None)
        same_fixed = isinstance(size, int) and sizes.get(str(a.id), (None, None)) == (size, 0)
        ref = isinstance(size, SizeReference) and size.offset == 0 and str(size.axis_id) == str(a.id)
        ratio = input_scale.get(str(a.id), 1.0) / float(getattr(a, "scale", 1.0))  # output size / input size
        k = _zoom(ratio)
        if not (same_fixed or (ref and k is not None)):
            raise GateInputError(
                f"output axis {str(a.id)!r} is not the input's grid or an integer zoom of it (size {size}, scale "
                f"{getattr(a, 'scale', 1.0)}): the gate handles outputs of the input's spatial size, or that size "
                "times or divided by an integer", not_applicable=True,
            )
        z = zooms[str(a.id)] = 1 if k is None else k
        out_halo = int(getattr(a, "halo", 0) or 0)
        # the halo in input voxels (bioimageio.spec's validator: halo * output scale / input scale), rounded up
        halos[str(a.id)] = out_halo * -z if z < 0 else -(-out_halo // z)
    return (
        tuple(sizes[a][0] for a in axes.spatial),
        tuple(sizes[a][1] for a in axes.spatial),
        tuple(halos.get(a, 0) for a in axes.spatial),
        tuple(zooms.get(a, 1) for a in axes.spatial),
    )


def _channels(tensor: Any) -> int:
    for a in tensor.axes:
        if _axis_type(a) == "channel":
            return len(a.channel_names)
    return 1


def _present_formats(descr: Any) -> list[str]:
    w = descr.weights
    names = ("pytorch_state_dict", "torchscript", "onnx", "tensorflow_saved_model_bundle", "keras_hdf5",
             "keras_v3", "tensorflow_js")
    return [n for n in names if getattr(w, n, None) is not None]


def _package_network(source: Path, descr: Any, config: GateConfig, notes: list[str],
                     trust_code: bool) -> tuple[nn.Module, str, tuple[str, ...], dict[str, Any] | None]:
    from ..errors import TrustError
    from .opening import open_model

    present = _present_formats(descr)
    usable = [f for f in ("pytorch_state_dict", "torchscript", "onnx") if f in present]
    if not usable:
        raise GateInputError(
            f"{source.name} has no PyTorch or ONNX weights (it has: {', '.join(present) or 'none'}); the gate runs "
            "pytorch_state_dict, torchscript or onnx weights. Add them (e.g. `bioimageio add-weights`) or validate "
            "the model's PyTorch checkpoint", not_applicable=True,
        )
    if config.weights != "auto" and config.weights not in usable:
        raise GateInputError(f"{source.name} has no {config.weights} weights (it has: {', '.join(present)})")
    if config.weights == "onnx" or usable == ["onnx"]:
        return _onnx_network(source), "onnx", (), None
    try:
        handle = open_model(source, trust_code=trust_code, weights=config.weights, allow=("bioimageio",))
    except TrustError as e:
        if "onnx" not in usable or config.weights != "auto":
            raise
        notes.append(f"its PyTorch weights would run the package's code ({e}); the gate runs its onnx weights")
        logger.warning(notes[-1])
        return _onnx_network(source), "onnx", ("pytorch_state_dict",), None
    notes.extend(handle.notes)
    if handle.untrusted:
        notes.append(f"the bioimage.io test runs the {handle.weights_format} weights only: the "
                     f"{', '.join(handle.untrusted)} weights would run the package's code (--trust-code)")
    renorm = handle.extra.get("renorm")
    if renorm:
        notes.append(
            "trained with BatchRenorm and exported as BatchNorm: train mode is measured with its "
            "BatchRenorm layers restored at the limits "
            + ("its layers held at export" if renorm.get("source") == "layers" else "of its schedule at its step")
            + f" (r_max {renorm['r_max']:g}, d_max {renorm['d_max']:g}, step {renorm['step']})"
        )
    return handle.network, handle.weights_format, handle.untrusted, handle.input_normalization


def _onnx_network(source: Path) -> nn.Module:
    from .package_io import PackageError, read_onnx

    try:
        return read_onnx(source)
    except PackageError as e:
        raise GateInputError(str(e)) from e


def _free_divisor(network: nn.Module, channels: int, base: Sequence[int], step: Sequence[int]) -> tuple[int, ...] | None:
    """For a package with fixed sizes: the smallest size step (1, 2, 4, ..., 64) by which the network also runs
    beyond its fixed sizes, keeping the spatial size (two sizes tried); None when it runs only at them."""
    for d in (1, 2, 4, 8, 16, 32, 64):
        ok = True
        for k in (1, 2):
            size = tuple(b + k * (d if s == 0 else s) for b, s in zip(base, step, strict=True))
            try:
                with torch.no_grad():
                    out = network(torch.zeros((1, channels, *size)))
            except Exception:  # any error of a network that cannot run at this size
                ok = False
                break
            if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != size:
                ok = False
                break
        if ok:
            return tuple(d if s == 0 else s for s in step)
    return None


def _package_preprocess(descr: Any, axes: PackageAxes) -> Callable[[np.ndarray], np.ndarray]:
    from bioimageio.core.proc_setup import get_pre_and_postprocessing

    procs = get_pre_and_postprocessing(descr, dataset_for_initial_statistics=[])

    def preprocess(raw: np.ndarray) -> np.ndarray:
        sample = input_sample(descr, axes, raw)
        procs.pre(sample)
        return np.asarray(sample_inputs(sample, descr, axes), dtype=np.float32)

    return preprocess


def _test_input(descr: Any, axes: PackageAxes) -> np.ndarray | None:
    from bioimageio.core.digest_spec import get_test_input_sample

    try:
        sample = get_test_input_sample(descr)
    except Exception as e:  # a package whose test tensor is missing still gets a clear message later
        logger.warning("could not read the package's test input: %s", e)
        return None
    return sample_inputs(sample, descr, axes)


def _wrap_postprocessing(network: nn.Module, descr: Any, notes: list[str]) -> nn.Module:
    if len(descr.outputs) > 1:
        ids = [str(p.id) for t in descr.outputs for p in t.postprocessing if str(p.id) != "ensure_dtype"]
        if ids:
            notes.append(f"the package's postprocessing {ids} (several outputs) is not applied by the network-level "
                         "metrics; the consumer emulations apply it")
        return network
    ids = [str(p.id) for p in descr.outputs[0].postprocessing]
    rest = [i for i in ids if i not in ("ensure_dtype", "sigmoid")]
    if rest:
        notes.append(
            f"the package's postprocessing {rest} is not applied by the network-level metrics (tile mismatch, "
            "disparity, sweep); the consumer emulations apply it"
        )
        logger.warning(notes[-1])
    return _Sigmoid(network) if "sigmoid" in ids else network


def _package_subject(source: Path, config: GateConfig, trust_code: bool) -> GateSubject:
    descr, error = _load_descr(source)
    if descr is None:
        return GateSubject(
            source=source, kind="package", name=source.name, dims=0, in_channels=0, network=nn.Identity(),
            weights_format="none", divisor=(), preprocess=lambda raw: raw, format_error=error,
        )
    notes: list[str] = []
    axes = _package_axes(descr)
    size_min, size_step, halo, zoom = _geometry(descr, axes)
    if any(z != 1 for z in zoom):
        axes = PackageAxes(input=axes.input, output=axes.output, spatial=axes.spatial, zoom=zoom)
        notes.append(f"the output is on another grid than the input (zoom {zoom} per axis, - for coarser): the "
                     "gate tiles in input space and compares every output voxel at its input position; halo "
                     f"{halo} in input voxels")

    network, fmt, untrusted, normalization = _package_network(source, descr, config, notes, trust_code)
    if not axes.is_canonical:
        notes.append(f"the package declares axes {axes.input} -> {axes.output}; the metrics run it as "
                     f"{axes.canonical}")
        network = _AxisAdapter(network, axes)
    network = _wrap_postprocessing(network, descr, notes)
    channels = sum(_channels(t) for t in descr.inputs)
    if len(descr.inputs) > 1 or len(descr.outputs) > 1:
        notes.append(f"{len(descr.inputs)} input(s) ({', '.join(str(t.id) for t in descr.inputs)}) and "
                     f"{len(descr.outputs)} output(s): every input is tiled with the same blocks (give one --data "
                     "per input, in this order); the outputs are measured together, channel after channel")
    # an output k times coarser needs input sizes that are multiples of k
    divisor: tuple[int, ...] | None = tuple(math.lcm(max(1, s), -z if z < 0 else 1)
                                            for s, z in zip(size_step, zoom, strict=True))
    free = True
    if 0 in size_step:
        divisor = _free_divisor(network.eval(), channels, size_min, size_step)
        free = divisor is not None
        fixed = "x".join(str(m) for m, s in zip(size_min, size_step, strict=True) if s == 0)
        if divisor is None:
            divisor = tuple(m if s == 0 else s for m, s in zip(size_min, size_step, strict=True))
            notes.append(f"the package's input has the fixed size {fixed} and its network runs only at that size: "
                         "tiles are compared with each other (tile mismatch), there is no whole-image prediction")
        else:
            notes.append(f"the package's input has the fixed size {fixed}: the consumers run tiles of that size; "
                         f"its network also runs at other multiples of {divisor}, which the reference (whole-image) "
                         "predictions and the receptive field use")
        logger.info(notes[-1])
    return GateSubject(
        source=source, kind="package", name=str(descr.name), dims=len(axes.spatial),
        in_channels=channels, network=network.eval(), weights_format=fmt, free_sizes=free,
        divisor=divisor, preprocess=_package_preprocess(descr, axes), axes=axes.spatial,
        declared_halo=halo, size_min=size_min, size_step=size_step, descr=descr, package_axes=axes,
        weight_formats=tuple(_present_formats(descr)), test_input=_test_input(descr, axes), notes=notes,
        tested_format=fmt if untrusted else None, normalization=normalization,
    )


def load_subject(model_source: str | os.PathLike[str], config: GateConfig, *, trust_code: bool = False) -> GateSubject:
    """Load a package (zip, folder, rdf.yaml; format 0.4 or 0.5) or a tilenorm-bmz checkpoint for the gate.

    The network is opened through :func:`~tilenorm_bmz.bmz.opening.open_model` (integrity checks and the
    trust policy included; ``trust_code`` as there).

    Raises
    ------
    GateInputError
        The source cannot be validated: missing, corrupt, not a model, no PyTorch weights, unsupported axes.
    IntegrityError
        A package fails its integrity checks (the gate reports it as a failed check).
    TilenormError
        Other loading errors (``CheckpointError``, ``PackageError``, ``TrustError``) with the reason.
    """
    from ..foreign import is_bioimageio

    path = Path(model_source)
    if not path.exists():
        raise GateInputError(f"{path} does not exist")
    if path.is_dir() and not is_bioimageio(path):
        raise GateInputError(f"{path} is a folder without rdf.yaml: not a bioimage.io package")
    if path.suffix.lower() == ".zip" and not is_bioimageio(path):
        raise GateInputError(f"{path} is not a bioimage.io package (not a readable zip, or a zip without rdf.yaml): "
                             "download or export the package again")
    if is_bioimageio(path):
        from .archive import open_package

        with open_package(path):  # integrity first: nothing below reads a package that fails it
            pass
        return _package_subject(path, config, trust_code)
    return _checkpoint_subject(path, trust_code)
