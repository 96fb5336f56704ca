"""Receptive field of a network -> the halo that makes tiled prediction exact.

Three measurements, per spatial axis:

* **Theoretical receptive field (TRF)**: the input voxels an output voxel can depend on through the
  network's convolutions, poolings and upsamplings. Computed analytically from the layers when the
  network is our :class:`~tilenorm_bmz.models.UNet` or a chain (``nn.Sequential``) of known layers
  (``r_l = r_{l-1} + (k_l - 1) j_{l-1}`` generalised to intervals, so pooling and transposed-convolution
  taps are counted), and measured numerically for every network: eval mode, gradient 1 at one output
  voxel, support of the input gradient on an input larger than the TRF. The measurement runs on a copy
  whose support *is* the dependency structure: MaxPools become AvgPools (a max pool routes the gradient
  to one voxel only), ReLU-type activations and normalization layers become identities (an inactive unit
  would cut a path; tile-wise statistics are reported separately, below), convolution weights and biases
  their absolute values (no two paths can cancel) and the input is positive, so every path contributes a
  positive amount and float32 suffices. TorchScript modules cannot be edited: they are measured as they
  are in float64 (tiny contributions do not round to zero), united over several random inputs. A U-Net
  is shift-equivariant only for shifts by its size divisor, so the extent is the maximum over the
  ``divisor`` phases of the output voxel. The *one-sided* TRF is the larger of the left and right
  extents: a halo of that size on each side of every tile makes tiling exact for a tile-local network.
* **Normalization coupling**: InstanceNorm, GroupNorm, LayerNorm, and BatchNorm in train mode (or without
  running statistics) normalize with statistics of the whole tile, so every output voxel depends on every
  input voxel of the tile and no halo makes tiling exact. Detected from the layer types and confirmed
  numerically (the gradient of the centre voxel reaches every input voxel).
* **Effective receptive field (ERF, Luo et al. 2016)**: mean |d y_centre / d x| over random or given
  tiles for the network as it is (eval mode, MaxPool kept, float32); per axis the radius around the
  centre that holds 95% / 99% of the gradient mass of the axis marginal.

The recommended halo is the one-sided TRF rounded up so that ``2 * halo`` is a multiple of the divisor
(bioimage.io requires it: the output halo is removed from a tile whose size is ``min + n * step``).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from ..config import StrictModel
from ..introspect import ceil_to, round_halo

__all__ = [
    "RFReport",
    "analytic_receptive_field",
    "receptive_field",
    "recommend_halo",
    "round_halo",
    "tile_coupling_layers",
]

logger = logging.getLogger(__name__)

Interval = tuple[int, int]
_AXES = "zyx"

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)
_POINTWISE = (
    *_ACTIVATIONS,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_COUPLING_NAMES = ("InstanceNorm", "GroupNorm", "LayerNorm")


class RFReport(StrictModel):
    """Receptive field of a network and the halo it needs (per spatial axis, in input voxels).

    ``*_left`` / ``*_right`` are the extents before / after the output voxel (maximum over the divisor
    phases). ``theoretical`` is the one-sided TRF of the local (convolution) path; when
    ``normalization_couples_tile`` is true the true dependency is the whole tile whatever the halo.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    dims: int
    axes: tuple[str, ...]
    divisor: tuple[int, ...]
    mode: Literal["eval", "train"] = "eval"
    """Mode of the normalization layers during the measurement (prediction runs in eval)."""
    input_shape: tuple[int, ...]
    """Spatial shape of the input the gradients were measured on."""
    n_samples: int
    data: Literal["random", "given"] = "random"
    analytic_left: tuple[int, ...] | None = None
    analytic_right: tuple[int, ...] | None = None
    numerical_left: tuple[int, ...] | None = None
    numerical_right: tuple[int, ...] | None = None
    method: Literal["analytic", "numerical", "none"]
    """Where ``theoretical`` comes from (analytic when available; the larger value if they disagree)."""
    theoretical: tuple[int, ...] | None
    """One-sided theoretical receptive field per axis (voxels needed on each side)."""
    confirmed: bool | None = None
    """Analytic and numerical TRF agree (``None`` when only one was available)."""
    erf95: tuple[int, ...]
    erf99: tuple[int, ...]
    normalization_couples_tile: bool
    coupling_reason: str | None = None
    recommended_halo: tuple[int, ...]
    notes: list[str] = Field(default_factory=list)
    mean_abs_gradient: Any = Field(default=None, exclude=True, repr=False)
    """Mean |gradient| of the centre output voxel w.r.t. the input (spatial array), not serialized."""

    @property
    def theoretical_size(self) -> tuple[int, ...] | None:
        """Full TRF size per axis: ``left + right + 1`` (of the source given by ``method``)."""
        left, right = self._extents()
        if left is None or right is None:
            return None
        return tuple(a + b + 1 for a, b in zip(left, right, strict=True))

    def _extents(self) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        if self.method == "analytic" and self.analytic_left is not None:
            left, right = self.analytic_left, self.analytic_right
            if self.numerical_left is not None and self.numerical_right is not None and right is not None:
                left = tuple(max(a, b) for a, b in zip(left, self.numerical_left, strict=True))
                right = tuple(max(a, b) for a, b in zip(right, self.numerical_right, strict=True))
            return left, right
        return self.numerical_left, self.numerical_right

    def log_gradient(self, axis: int = 0, eps: float = 1e-30) -> np.ndarray:
        """``log10`` mean |gradient| through the centre (a 2D image; 3D volumes are sliced along ``axis``).

        The figure of the paper's Fig. 4: the TRF is the support, the ERF the bright core.
        """
        g = self.mean_abs_gradient
        if g is None:
            raise ValueError("this report carries no gradient image (it was loaded from JSON)")
        g = np.asarray(g, dtype=np.float64)
        while g.ndim > 2:
            g = np.take(g, g.shape[axis] // 2, axis=axis)
        return np.log10(g + eps)


# ------------------------------------------------------------------------------------------------------
# analytic receptive field (interval propagation, output -> input)
# ------------------------------------------------------------------------------------------------------
def _at(value: Any, axis: int) -> int:
    if isinstance(value, int):
        return value
    return int(value[axis])


def _conv_like(module: nn.Module, iv: Interval, axis: int) -> Interval:
    """Input interval that output interval ``iv`` depends on, for a (pooling-)convolution."""
    k = _at(module.kernel_size, axis)
    s = _at(module.stride, axis) if module.stride is not None else k
    d = _at(getattr(module, "dilation", 1), axis)
    p = module.padding
    if isinstance(p, str):
        p = 0 if p == "valid" else (d * (k - 1)) // 2
    p = _at(p, axis)
    return iv[0] * s - p, iv[1] * s - p + d * (k - 1)


def _transposed(module: nn.Module, iv: Interval, axis: int) -> Interval:
    k, s = _at(module.kernel_size, axis), _at(module.stride, axis)
    d, p = _at(module.dilation, axis), _at(module.padding, axis)
    return -((-(iv[0] + p - d * (k - 1))) // s), (iv[1] + p) // s


def _layer(module: nn.Module, iv: Interval, axis: int) -> Interval | None:
    """Back-propagate an interval through one layer; ``None`` if the layer is not understood."""
    if isinstance(module, nn.Sequential):
        for child in reversed(module):
            out = _layer(child, iv, axis)
            if out is None:
                return None
            iv = out
        return iv
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return _conv_like(module, iv, axis)
    if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        return _transposed(module, iv, axis)
    if isinstance(
        module, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d | nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d
    ):
        return _conv_like(module, iv, axis)
    if isinstance(module, nn.Softmax | nn.LogSoftmax) and module.dim == 1:
        return iv
    if isinstance(module, _POINTWISE) or _is_norm(module):
        return iv  # pointwise in space (tile-wise statistics are reported as coupling, not here)
    return None


def _is_norm(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    from ..norm import BatchRenorm

    return isinstance(module, _BatchNorm | _InstanceNorm | nn.GroupNorm | BatchRenorm)


def _unet_support(model: nn.Module, iv: Interval, axis: int) -> Interval:
    """Input support of an output interval of our UNet (encoder/decoder graph with skip connections)."""

    def seq(module: nn.Module, x: Interval) -> Interval:
        out = _layer(module, x, axis)
        if out is None:
            raise TypeError(f"unsupported layer in UNet: {type(module).__name__}")
        return out

    def enc_in(level: int, x: Interval) -> Interval:  # input of encoder `level` -> image
        if level == 0:
            return x
        return enc_out(level - 1, seq(model.pools[level - 1], x))

    def enc_out(level: int, x: Interval) -> Interval:  # output of encoder `level` (the skip) -> image
        return enc_in(level, seq(model.encoders[level], x))

    def dec_out(level: int, x: Interval) -> Interval:  # output of decoder `level` -> image
        if level == model.depth:
            return enc_in(model.depth, seq(model.bottleneck, x))
        x = seq(model.decoders[model.depth - 1 - level], x)  # decoders run deepest first
        skip = enc_out(level, x)
        up = dec_out(level + 1, seq(model.upsamplers[model.depth - 1 - level], x))
        return min(skip[0], up[0]), max(skip[1], up[1])

    return dec_out(0, seq(model.head, iv))


_UNET_PARTS = ("encoders", "pools", "bottleneck", "upsamplers", "decoders", "head", "depth")


def _is_unet(model: nn.Module) -> bool:
    """Our UNet, also when rebuilt from its source file (a bioimage.io package's architecture)."""
    from ..models import UNet

    if isinstance(model, UNet):
        return True
    return (
        type(model).__name__ == "UNet"
        and not isinstance(model, torch.jit.ScriptModule)
        and all(hasattr(model, a) for a in _UNET_PARTS)
    )


def _support_fn(model: nn.Module) -> Callable[[Interval, int], Interval] | None:
    if _is_unet(model):
        return lambda iv, axis: _unet_support(model, iv, axis)
    if isinstance(model, nn.Sequential) and _layer(model, (0, 0), 0) is not None:
        return lambda iv, axis: _layer(model, iv, axis)  # type: ignore[return-value]
    return None


def analytic_receptive_field(
    model: nn.Module, dims: int, divisor: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Left and right TRF extents per axis from the layer structure, or ``None`` if not analysable.

    Supports our :class:`~tilenorm_bmz.models.UNet` and ``nn.Sequential`` chains of convolutions,
    transposed convolutions, poolings and pointwise layers. The extents are the maxima over the
    ``divisor`` phases of the output voxel.

    Examples
    --------
    >>> stack = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(4)])
    >>> analytic_receptive_field(stack, dims=2)
    ((4, 4), (4, 4))
    """
    fn = _support_fn(model)
    if fn is None:
        return None
    div = _divisor_of(model, dims, divisor)
    left, right = [], []
    for a in range(dims):
        base = 1000 * math.lcm(*div)  # far from the origin: negative indices never matter
        lo_ext = hi_ext = 0
        for k in range(div[a]):
            x = base + k
            try:
                lo, hi = fn((x, x), a)
            except (TypeError, AttributeError, IndexError):  # a layer the analysis does not know
                return None
            lo_ext, hi_ext = max(lo_ext, x - lo), max(hi_ext, hi - x)
        left.append(lo_ext)
        right.append(hi_ext)
    return tuple(left), tuple(right)


# ------------------------------------------------------------------------------------------------------
# model inspection
# ------------------------------------------------------------------------------------------------------
def _type_name(module: nn.Module) -> str:
    return str(getattr(module, "original_name", None) or type(module).__name__)


def tile_coupling_layers(model: nn.Module, train_norm: bool = False) -> list[tuple[str, str]]:
    """``(name, reason)`` of every layer that normalizes with statistics of the whole tile.

    InstanceNorm, GroupNorm and LayerNorm always do; BatchNorm/BatchRenorm do in train mode
    (``train_norm``) or when they keep no running statistics. Works on TorchScript modules (by the
    original class names).
    """
    found: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        tname = _type_name(m)
        if tname.startswith(_COUPLING_NAMES):
            found.append((name or "<model>", f"{tname} normalizes with statistics of each tile"))
        elif tname.startswith(("BatchNorm", "BatchRenorm")) or tname == "SyncBatchNorm":
            tracks = getattr(m, "track_running_stats", True)
            if train_norm or tracks is False:
                why = "in train mode" if train_norm else "without running statistics"
                found.append((name or "<model>", f"{tname} {why} normalizes with statistics of each tile"))
    if not found:
        found.extend(_graph_coupling(model))
    return found


#: TorchScript operators that normalize with statistics of the whole tensor they receive.
_COUPLING_OPS = ("aten::instance_norm", "aten::group_norm", "aten::layer_norm")


def _graph_coupling(model: nn.Module) -> list[tuple[str, str]]:
    """Tile coupling inside TorchScript graphs, which hide their layers: a traced module keeps only operators (a
    network traced in train mode holds ``aten::batch_norm`` with ``training=True`` as a constant)."""
    found: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.jit.ScriptModule) or any(
                name.startswith(f"{n}.") for n, _ in found):
            continue
        try:
            nodes = list(m.inlined_graph.nodes())
        except (AttributeError, RuntimeError):  # a ScriptModule without a forward graph
            continue
        counts: dict[str, int] = {}
        for node in nodes:
            kind = node.kind()
            if kind in _COUPLING_OPS:
                counts[kind] = counts.get(kind, 0) + 1
            elif kind == "aten::batch_norm":
                training = node.inputsAt(5).node()
                if training.kind() == "prim::Constant" and training.output().toIValue() is True:
                    counts["aten::batch_norm (training=True)"] = counts.get("aten::batch_norm (training=True)", 0) + 1
        for op, n in counts.items():
            why = ("was traced in train mode: it normalizes with the statistics of each batch and tile"
                   if "training" in op else "normalizes with statistics of each tile")
            found.append((f"{name or '<model>'} (TorchScript graph)", f"{n} x {op} {why}"))
        if counts:
            break  # one graph holds the whole network
    return found


def _divisor_of(model: nn.Module, dims: int, divisor: Sequence[int] | int | None) -> tuple[int, ...]:
    if divisor is not None:
        return (int(divisor),) * dims if isinstance(divisor, int) else tuple(int(d) for d in divisor)
    d = getattr(model, "divisor", None)
    if d is None:
        return (1,) * dims
    return (int(d),) * dims if isinstance(d, int) else tuple(int(x) for x in d)


def _in_channels(model: nn.Module, dims: int, in_channels: int | None) -> int:
    if in_channels is not None:
        return int(in_channels)
    c = getattr(model, "in_channels", None)
    if isinstance(c, int):
        return c
    for p in model.parameters():
        if p.dim() == dims + 2:
            return int(p.shape[1])
    raise ValueError(
        f"cannot tell how many input channels {type(model).__name__} expects: pass in_channels=..."
    )


def _replace(model: nn.Module, pick: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace submodules for which ``pick`` returns a module; returns the number replaced."""
    n = 0
    for name, child in list(model.named_children()):
        new = pick(child)
        if new is not None:
            setattr(model, name, new)
            n += 1
        else:
            n += _replace(child, pick)
    return n


def _copy(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A deep copy in ``dtype`` on ``device``, in eval mode (the model itself is not touched)."""
    with warnings.catch_warnings():  # TorchScript's _apply touches .grad of non-leaf parameters
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def _local_copy(model: nn.Module, device: torch.device) -> tuple[nn.Module, bool]:
    """A copy whose gradient support is the TRF (see the module docstring); ``edited`` is False for
    TorchScript, which is returned as a float64 copy."""
    if isinstance(model, torch.jit.ScriptModule):
        return _copy(model, torch.float64, device), False
    m = _copy(model, torch.float32, device)

    def pick(child: nn.Module) -> nn.Module | None:
        pools = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
        for mx, avg in pools.items():
            if type(child) is mx and child.dilation in (1, (1,), (1, 1), (1, 1, 1)):
                return avg(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode)
        pointwise = (
            isinstance(child, (*_POINTWISE, nn.Softmax, nn.LogSoftmax)) and getattr(child, "dim", 1) == 1
        )
        if pointwise or _is_norm(child) or _type_name(child).startswith(_COUPLING_NAMES):
            return nn.Identity()
        return None

    _replace(m, pick)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    with torch.no_grad():
        for sub in m.modules():
            if isinstance(sub, (*convs, *transposed)):
                # |w| normalized to an average per output channel: positive and of order one, so no path
                # cancels and nothing over- or underflows in float32
                w = sub.weight.abs_()
                out_dim = 1 if isinstance(sub, transposed) else 0
                other = tuple(d for d in range(w.dim()) if d != out_dim)
                w.div_(w.sum(dim=other, keepdim=True).clamp_min(1e-12))
                w[w == 0] = 1e-3  # a zero weight is not a missing connection
                if sub.bias is not None:
                    sub.bias.zero_()
    return m, True


def _measure_copy(model: nn.Module, train_norm: bool, device: torch.device) -> nn.Module:
    m = _copy(model, torch.float32, device)
    if train_norm:
        for sub in m.modules():
            tname = _type_name(sub)
            if tname.startswith(("BatchNorm", "BatchRenorm", "SyncBatchNorm", "InstanceNorm")):
                sub.train()
    return m


# ------------------------------------------------------------------------------------------------------
# numerical measurement
# ------------------------------------------------------------------------------------------------------
def _input_gradient(model: nn.Module, x: torch.Tensor, voxel: tuple[int, ...]) -> np.ndarray:
    """|d sum_c w_c y[0, c, voxel] / d x| summed over input channels (spatial float64 array).

    The output channels are weighted by distinct positive weights ``w_c = 1 + c / C``: a plain sum is constant
    for a network that ends in a softmax over channels (its gradient is zero everywhere), a weighted one is not.
    """
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    if tuple(y.shape[2:]) != tuple(x.shape[2:]):
        raise ValueError(
            f"the network changes the spatial size ({tuple(x.shape[2:])} -> {tuple(y.shape[2:])}): tiled "
            "prediction and this receptive-field measurement need a 'same'-padded network"
        )
    out = y[(0, slice(None), *voxel)]
    sel = (out * (1.0 + torch.arange(out.shape[0], dtype=out.dtype, device=out.device) / out.shape[0])).sum()
    (g,) = torch.autograd.grad(sel, x)
    return g.abs().sum(dim=1)[0].double().cpu().numpy()


#: Impulse response: an output change counts when it exceeds this fraction of the output's largest magnitude
#: (float rounding of unaffected outputs stays far below it).
_IMPULSE_TOL = 1e-5


def _impulse_response(model: nn.Module, x: np.ndarray, voxel: tuple[int, ...]) -> np.ndarray:
    """For a network without gradients: ``|y(x + e_voxel) - y(x)|`` summed over output channels, mirrored about
    ``voxel`` (the outputs an input voxel reaches are the mirror image of the inputs an output voxel sees), with
    changes below ``_IMPULSE_TOL`` of the output's scale set to 0 (spatial float64 array)."""
    base = torch.from_numpy(np.ascontiguousarray(x))[None]
    bumped = base.clone()
    bumped[(0, slice(None), *voxel)] += 1.0 + float(np.abs(x).max())
    with torch.no_grad():
        y0, y1 = model(base), model(bumped)
    if tuple(y0.shape[2:]) != tuple(base.shape[2:]):
        raise ValueError(
            f"the network changes the spatial size ({tuple(base.shape[2:])} -> {tuple(y0.shape[2:])}): tiled "
            "prediction and this receptive-field measurement need a 'same'-padded network"
        )
    d = (y1 - y0).abs().sum(dim=1)[0].double().cpu().numpy()
    scale = float(torch.maximum(y0.abs().max(), y1.abs().max()))
    d[d <= _IMPULSE_TOL * max(scale, 1e-30)] = 0.0
    # mirror about the voxel: shift so that index voxel + k holds the response at voxel - k
    out = np.zeros_like(d)
    src, dst = [], []
    for v, n in zip(voxel, d.shape, strict=True):
        lo = max(0, 2 * v - (n - 1))
        hi = min(n - 1, 2 * v)
        src.append(slice(lo, hi + 1))
        dst.append(slice(2 * v - hi, 2 * v - lo + 1))
    out[tuple(dst)] = d[tuple(src)][tuple(slice(None, None, -1) for _ in voxel)]
    return out


def _support(g: np.ndarray) -> list[tuple[int, int]]:
    """Bounding box (first, last index) of the non-zero gradient per axis."""
    out = []
    for a in range(g.ndim):
        other = tuple(i for i in range(g.ndim) if i != a)
        nz = np.flatnonzero(g.sum(axis=other) != 0) if other else np.flatnonzero(g != 0)
        out.append((int(nz[0]), int(nz[-1])) if nz.size else (-1, -1))
    return out


def _erf_radius(g: np.ndarray, centre: tuple[int, ...], fraction: float) -> tuple[int, ...]:
    radii = []
    for a in range(g.ndim):
        other = tuple(i for i in range(g.ndim) if i != a)
        m = g.sum(axis=other) if other else g
        total = m.sum()
        if total <= 0:
            radii.append(0)
            continue
        c = centre[a]
        r = 0
        for r in range(max(c, len(m) - 1 - c) + 1):
            if m[max(0, c - r) : c + r + 1].sum() >= fraction * total:
                break
        radii.append(r)
    return tuple(radii)


def _sample_inputs(
    data: Any, n: int, channels: int, shape: tuple[int, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """``n`` inputs of ``(channels, *shape)``: N(0, 1) noise, or random crops of the given tiles."""
    if data is None:
        return [rng.standard_normal((channels, *shape)) for _ in range(n)]
    arrays = [np.asarray(data)] if isinstance(data, np.ndarray) else [np.asarray(d) for d in data]
    tiles: list[np.ndarray] = []
    for arr in arrays:
        if arr.ndim == len(shape) + 2:
            tiles.extend(arr)
        elif arr.ndim == len(shape) + 1:
            tiles.append(arr)
        else:
            raise ValueError(
                f"data arrays must be (C, *spatial) or (N, C, *spatial) with {len(shape)} spatial axes, "
                f"got shape {arr.shape}"
            )
    out = []
    for i in range(n):
        t = tiles[i % len(tiles)]
        if t.shape[0] != channels:
            raise ValueError(f"data has {t.shape[0]} channel(s) but the network expects {channels}")
        if any(s < w for s, w in zip(t.shape[1:], shape, strict=True)):
            raise ValueError(
                f"data tiles of spatial shape {t.shape[1:]} are smaller than the measurement input {shape}: "
                "give larger tiles or a smaller input_shape"
            )
        starts = [int(rng.integers(0, s - w + 1)) for s, w in zip(t.shape[1:], shape, strict=True)]
        out.append(t[(slice(None), *(slice(a, a + w) for a, w in zip(starts, shape, strict=True)))])
    return out


def receptive_field(
    model: nn.Module,
    dims: int,
    *,
    input_shape: Sequence[int] | None = None,
    n_samples: int = 8,
    data: np.ndarray | Sequence[np.ndarray] | None = None,
    device: str | torch.device = "cpu",
    divisor: Sequence[int] | int | None = None,
    in_channels: int | None = None,
    train_norm: bool = False,
    max_input_size: int | None = None,
    seed: int = 0,
) -> RFReport:
    """Measure the receptive field of ``model`` and recommend a halo.

    Parameters
    ----------
    model
        Any module mapping ``(B, C, *spatial)`` to ``(B, C_out, *spatial)`` (ours, MONAI's, a TorchScript
        module from a package). It is not modified (measurements run on copies).
    dims
        Number of spatial axes (2 or 3).
    input_shape
        Spatial shape of the measurement input; default: large enough for the analytic TRF, or grown
        from 64 (2D) / 32 (3D) until the gradient support stays inside it (up to ``max_input_size``).
    n_samples
        Random (or given) inputs averaged for the ERF and united for the numerical TRF.
    data
        Normalized tiles ``(C, *spatial)`` or batches ``(N, C, *spatial)`` to measure the ERF on (random
        crops of ``input_shape``); default N(0, 1) noise.
    device
        Where to run the forward/backward passes (``"auto"``: CUDA when available).
    divisor, in_channels
        Override what the model exposes (``model.divisor``, ``model.in_channels``).
    train_norm
        Measure with BatchNorm/BatchRenorm layers in train mode (shows the tile coupling of train mode;
        prediction runs in eval mode).
    max_input_size
        Largest input side tried while growing (default 1024 in 2D, 128 in 3D).
    seed
        Seed of the random inputs.

    Returns
    -------
    RFReport
        Extents, one-sided TRF, ERF radii, coupling and the recommended halo per axis.
    """
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    from ..introspect import resolve_device

    dev = resolve_device(device)
    div = _divisor_of(model, dims, divisor)
    if len(div) != dims:
        raise ValueError(f"divisor {div} has {len(div)} axes but dims={dims}")
    channels = _in_channels(model, dims, in_channels)
    notes: list[str] = []
    analytic = analytic_receptive_field(model, dims, div)
    coupling = tile_coupling_layers(model, train_norm=train_norm)
    max_side = max_input_size or {1: 4096, 2: 1024, 3: 128}[dims]
    rng = np.random.default_rng(seed)

    impulse = getattr(model, "differentiable", True) is False  # e.g. an ONNX session: no gradients
    if impulse:
        local, edited = model, False
        notes.append(
            "no gradients (e.g. ONNX weights): measured from the impulse response (which outputs change when one "
            f"input voxel changes, above {_IMPULSE_TOL:g} of the output's scale) over random inputs; the numerical "
            "TRF may be smaller than the true one"
        )
    else:
        local, edited = _local_copy(model, dev)
    if not edited and not impulse:
        notes.append(
            "TorchScript module: measured as is (MaxPool and activations kept) over random inputs; the "
            "numerical TRF may be smaller than the true one"
        )

    def centre_of(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((s // 2 // d) * d for s, d in zip(shape, div, strict=True))

    local_dtype = np.float32 if edited else np.float64

    def run(m: nn.Module, x: np.ndarray, voxel: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        if impulse:
            return _impulse_response(m, np.asarray(x, dtype=np.float32), voxel)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))[None].to(dev)
        return _input_gradient(m, t, voxel)

    def local_input(shape: tuple[int, ...]) -> np.ndarray:  # positive for the edited copy: units stay active
        if edited:
            return rng.uniform(0.5, 1.5, (channels, *shape))
        return rng.standard_normal((channels, *shape))

    # -- the measurement input: larger than the TRF on every side --------------------------------------
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != dims or any(s % d for s, d in zip(shape, div, strict=True)):
            raise ValueError(
                f"input_shape {shape} must have {dims} axes, each a multiple of the divisor {div}"
            )
        grow = False
    elif analytic is not None:
        ext = [max(lft, rgt) for lft, rgt in zip(*analytic, strict=True)]
        shape = tuple(ceil_to(2 * e + 2 * d + 2, d) for e, d in zip(ext, div, strict=True))
        grow = False
    else:
        shape = tuple(ceil_to({1: 256, 2: 64, 3: 32}[dims], d) for d in div)
        # an unedited network with tile-wise normalization reaches every voxel of any input: do not grow
        grow = edited or not coupling

    # -- numerical TRF: per phase, union over samples, on the local copy ------------------------------
    # phases: the centre voxel moved by 0 .. n_phase - 1 on every axis. They cover the divisor; for a network
    # of unknown structure at least 8, because the given divisor (a package's size step) need not be the
    # network's own: one that pools 3 times with a step of 1 declared reaches farther from some phases
    periods = div if analytic is not None else tuple(max(8, d) for d in div)
    n_phase = max(periods)
    # an edited copy of a known structure is a positive linear map up to the output activation: one pass
    # per phase suffices; other networks may pool or gate functionally, so samples are united
    n_passes = n_phase if edited and analytic is not None else max(n_samples, n_phase)

    def numerical_trf(shape: tuple[int, ...]) -> tuple[list[int], list[int], bool]:
        """Union of the gradient supports over all phases of the divisor (and samples) at ``shape``;
        stops at the first pass whose support reaches the border (``truncated``)."""
        c = centre_of(shape)
        left, right = [0] * dims, [0] * dims
        for i in range(n_passes):
            phase = i % n_phase
            voxel = tuple(ci + phase % p for ci, p in zip(c, periods, strict=True))
            g = run(local, local_input(shape), voxel, local_dtype)
            for a, ((lo, hi), s) in enumerate(zip(_support(g), shape, strict=True)):
                if lo < 0:
                    continue
                if lo <= 0 or hi >= s - 1:
                    return left, right, True
                left[a], right[a] = max(left[a], voxel[a] - lo), max(right[a], hi - voxel[a])
        return left, right, False

    with torch.enable_grad():
        # grow the input until every phase's support is interior (the package's size step may be a multiple
        # of the network's own divisor: a phase other than 0 can reach farther than the centre's)
        while True:
            left, right, truncated = numerical_trf(shape)
            if not (truncated and grow):
                break
            nxt = tuple(min(ceil_to(2 * s, d), ceil_to(max_side, d)) for s, d in zip(shape, div, strict=True))
            if nxt == shape:
                break
            shape = nxt
        numerical: tuple[tuple[int, ...], tuple[int, ...]] | None = (tuple(left), tuple(right))
        if truncated:
            numerical = None
            notes.append(
                f"the gradient reaches the border of the {'x'.join(map(str, shape))} input: "
                "the numerical TRF is larger than the input (or the network couples the tile)"
            )

        # -- ERF and coupling: the network as it is -----------------------------------------------------
        real = model if impulse else _measure_copy(model, train_norm, dev)
        c = centre_of(shape)
        acc = np.zeros(shape, dtype=np.float64)
        everywhere = False
        for x in _sample_inputs(data, n_samples, channels, shape, rng):
            g = run(real, x, c)
            everywhere |= bool(np.all(g != 0))
            acc += g
        acc /= n_samples

    # a gradient on every voxel proves coupling only when the local path does not reach the border itself
    everywhere = everywhere and not truncated
    couples = bool(coupling) or everywhere
    reason = None
    if coupling:
        names = ", ".join(f"{n} ({r.split(' normalizes')[0]})" for n, r in coupling[:3])
        more = f" and {len(coupling) - 3} more" if len(coupling) > 3 else ""
        reason = f"{names}{more} normalize with statistics of the whole tile"
        if everywhere:
            reason += "; the gradient of the centre voxel reaches every input voxel"
    elif everywhere:
        reason = (
            f"the gradient of the centre voxel reaches every voxel of a {'x'.join(map(str, shape))} input "
            "(some layer uses statistics of the whole tile)"
        )

    # -- combine -------------------------------------------------------------------------------------------
    confirmed = None
    if analytic is not None and numerical is not None:
        confirmed = analytic == numerical
        if not confirmed:
            notes.append(f"analytic TRF {analytic} and numerical {numerical} differ; the larger one is used")
    if analytic is not None:
        method: Literal["analytic", "numerical", "none"] = "analytic"
        left_t, right_t = analytic
        if numerical is not None:
            left_t = tuple(max(a, b) for a, b in zip(left_t, numerical[0], strict=True))
            right_t = tuple(max(a, b) for a, b in zip(right_t, numerical[1], strict=True))
        theoretical: tuple[int, ...] | None = tuple(max(a, b) for a, b in zip(left_t, right_t, strict=True))
    elif numerical is not None:
        method = "numerical"
        theoretical = tuple(max(a, b) for a, b in zip(*numerical, strict=True))
    else:
        method, theoretical = "none", None
    erf95 = _erf_radius(acc, c, 0.95)
    erf99 = _erf_radius(acc, c, 0.99)
    if theoretical is not None:
        halo = round_halo(theoretical, div)
    else:
        halo = round_halo(erf99, div)
        notes.append("no finite TRF could be measured: the halo is the 99% ERF radius")
    if couples:
        notes.append(
            "normalization couples the tile: no halo makes tiled prediction exact; convert the network to "
            "BatchRenorm (`tilenorm-bmz convert`) for seamless tiling"
        )
    return RFReport(
        dims=dims,
        axes=tuple(_AXES[3 - dims :]) if dims <= 3 else tuple(f"d{i}" for i in range(dims)),
        divisor=div,
        mode="train" if train_norm else "eval",
        input_shape=shape,
        n_samples=n_samples,
        data="random" if data is None else "given",
        analytic_left=analytic[0] if analytic else None,
        analytic_right=analytic[1] if analytic else None,
        numerical_left=numerical[0] if numerical else None,
        numerical_right=numerical[1] if numerical else None,
        method=method,
        theoretical=theoretical,
        confirmed=confirmed,
        erf95=erf95,
        erf99=erf99,
        normalization_couples_tile=couples,
        coupling_reason=reason,
        recommended_halo=halo,
        notes=notes,
        mean_abs_gradient=acc,
    )


def recommend_halo(
    model: nn.Module, dims: int, divisor: Sequence[int] | int | None = None, **kwargs: Any
) -> tuple[int, ...]:
    """The halo for tiled prediction: analytic when the structure is known (instant), else measured.

    Extra keyword arguments go to :func:`receptive_field`.
    """
    div = _divisor_of(model, dims, divisor)
    analytic = analytic_receptive_field(model, dims, div)
    if analytic is not None:
        return round_halo(tuple(max(a, b) for a, b in zip(*analytic, strict=True)), div)
    return receptive_field(model, dims, divisor=div, **kwargs).recommended_halo
