"""Questions about any network and small integer geometry: the bottom layer that every other module may import.

Nothing here knows about checkpoints, packages, tiling or metrics; it only looks at an ``nn.Module`` (its
attributes, its layers, a forward pass of zeros) and answers: how many spatial dimensions
(:func:`model_dims`), input channels (:func:`model_in_channels`), which size divisor
(:func:`model_divisor`, :func:`infer_divisor`), which device (:func:`model_device`,
:func:`resolve_device`). ``tiling``, ``metrics``, ``bmz`` and ``conversion`` all import it, so none of them
needs a sibling for these answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ceil_to",
    "infer_divisor",
    "model_device",
    "model_dims",
    "model_divisor",
    "model_in_channels",
    "resolve_device",
    "round_down",
    "round_halo",
]


# -- integer geometry -----------------------------------------------------------------------------------
def ceil_to(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-int(value) // int(multiple)) * int(multiple)


def round_down(value: int, multiple: int) -> int:
    """The largest multiple of ``multiple`` that is <= ``value`` (may be 0)."""
    return (int(value) // int(multiple)) * int(multiple)


def round_halo(halo: int | Sequence[int], step: int | Sequence[int]) -> Any:
    """Round a halo up so that ``2 * halo`` is a multiple of the size step (bioimage.io requires it).

    Scalars give a scalar, sequences a tuple (one step per axis):

    >>> round_halo(21, 4)
    22
    >>> round_halo((21, 5), (4, 1))
    (22, 5)
    """
    if not isinstance(halo, int):
        steps = (step,) * len(halo) if isinstance(step, int) else step
        return tuple(round_halo(int(h), int(s)) for h, s in zip(halo, steps, strict=True))
    if halo < 0 or int(step) < 1:
        raise ValueError(f"halo must be >= 0 and step >= 1, got halo={halo}, step={step}")
    h = int(halo)
    while (2 * h) % int(step):
        h += 1
    return h


# -- devices ------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device(device)`` (checked)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available: use --device cpu or auto")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of the network's first parameter or buffer (CPU for a network with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# -- networks ----------------------------------------------------------------------------------------------
_CONV_DIMS = {"Conv1d": 1, "ConvTranspose1d": 1, "Conv2d": 2, "ConvTranspose2d": 2, "Conv3d": 3,
              "ConvTranspose3d": 3}


def _convolutions(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(dims, layer)`` of every convolution, in module order; TorchScript (scripted or traced) modules included,
    recognized by the name of the class they were compiled from."""
    out = []
    for m in model.modules():
        name = type(m).__name__ if isinstance(m, nn.modules.conv._ConvNd) else getattr(m, "original_name", None)
        if name in _CONV_DIMS:
            out.append((_CONV_DIMS[name], m))
    return out


def model_dims(model: nn.Module) -> int:
    """Spatial dimensionality of a network: its ``dims`` attribute or that of its first convolution."""
    dims = getattr(model, "dims", None)
    if dims in (1, 2, 3):
        return int(dims)
    convs = _convolutions(model)
    if convs:
        return convs[0][0]
    raise ValueError(f"cannot tell the spatial dimensionality of {type(model).__name__}: it has no convolutions")


def model_in_channels(model: nn.Module) -> int:
    """Input channel count of a network: its ``in_channels`` attribute or that of its first convolution."""
    value = getattr(model, "in_channels", None)
    if isinstance(value, int):
        return value
    for _, m in _convolutions(model):
        if isinstance(getattr(m, "in_channels", None), int):
            return int(m.in_channels)
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 3:  # traced: (out, in / groups, *k); transposed
            groups = getattr(m, "groups", 1)  # layers keep (in, out / groups, *k), but are rarely first
            return int(weight.shape[1]) * (groups if isinstance(groups, int) else 1)
    raise ValueError(f"cannot tell the input channel count of {type(model).__name__}: it has no convolutions")


def model_divisor(model: nn.Module, dims: int, divisor: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """The spatial size divisor: ``divisor`` (checked against the model's), else ``model.divisor``, else 1."""
    own = getattr(model, "divisor", None)
    own_t = (
        None if own is None else ((int(own),) * dims if isinstance(own, int) else tuple(int(d) for d in own))
    )
    if own_t is not None and len(own_t) != dims:
        raise ValueError(f"the model's divisor {own_t} has {len(own_t)} axes but the tiles have {dims}")
    if divisor is None:
        return own_t or (1,) * dims
    div = (int(divisor),) * dims if isinstance(divisor, int) else tuple(int(d) for d in divisor)
    if len(div) != dims or min(div) < 1:
        raise ValueError(f"divisor must be a positive int or {dims} positive ints, got {divisor}")
    if own_t is not None and any(d % o for d, o in zip(div, own_t, strict=True)):
        raise ValueError(f"divisor {div} is not a multiple of the model's own size divisor {own_t}")
    return div


def _per_axis(value: Any, dims: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * dims
    t = tuple(int(v) for v in value)
    return t if len(t) == dims else None


def infer_divisor(model: nn.Module, dims: int, in_channels: int | None = None) -> tuple[int, ...]:
    """The size divisor of a network that does not expose one (a MONAI or hand-written U-Net).

    The product, per axis, of the strides of its downsampling layers (strided convolutions, max and average
    pooling; transposed convolutions upsample and are left out), confirmed by forward passes of two sizes
    that are multiples of it: the output must keep the input's spatial size. Raises ``ValueError`` with
    what to do when the network does not behave that way (then pass the divisor explicitly).
    """
    div = [1] * dims
    for m in model.modules():
        downsampling = isinstance(m, nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AvgPoolNd) or (
            isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
        )
        stride = _per_axis(m.stride, dims) if downsampling and m.stride is not None else None
        if stride is not None:
            div = [d * s for d, s in zip(div, stride, strict=True)]
    found = tuple(div)
    c = in_channels or model_in_channels(model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for k in (0, 1):  # two sizes: at least 32 voxels and 2x the divisor per axis, then one divisor more
            size = tuple(max(2 * d, ceil_to(32, d)) + k * d for d in found)
            with torch.no_grad():
                out = model(torch.zeros((1, c, *size), device=device))
            if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != size:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"cannot tell the size divisor of {type(model).__name__}: the product of its strides is {found}, "
                    f"but an input of spatial size {size} gave an output of {got}; pass the divisor explicitly "
                    "(--divisor, one int per axis)"
                )
    except RuntimeError as e:
        raise ValueError(
            f"cannot tell the size divisor of {type(model).__name__} (strides give {found}, and a forward pass "
            f"failed: {e}); pass the divisor explicitly (--divisor, one int per axis)"
        ) from e
    finally:
        model.train(was_training)
    return found
