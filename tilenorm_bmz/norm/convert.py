"""Swap the normalization layers of any ``torch.nn.Module``.

``convert_norm(model, to="batchrenorm")`` replaces BatchNorm{1,2,3}d, SyncBatchNorm, InstanceNorm{1,2,3}d
and GroupNorm with :class:`BatchRenorm`, carrying over the affine parameters and whatever running
statistics exist; ``convert_norm(model, to="batchnorm")`` replaces every BatchRenorm with the equal
``nn.BatchNorm{1,2,3}d`` (identical eval outputs) for export. Both return a :class:`ConversionReport`
of every layer converted and everything left alone, with the reason.

``calibrate_norm`` recomputes the running statistics of BatchRenorm layers from data (cumulative average,
``r_max=1, d_max=0``), which is how a converted InstanceNorm/GroupNorm network gets population statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from .batchrenorm import BatchRenorm

__all__ = ["ConversionReport", "LayerConversion", "SkippedLayer", "calibrate_norm", "convert_norm"]

logger = logging.getLogger(__name__)

_CONV_DIMS: dict[type[nn.Module], int] = {
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
}
_BN_DIMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_IN_DIMS: dict[type[nn.Module], int] = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
_BN_CLASSES: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}

#: Layers that normalize per sample/tile and cannot become a per-channel BatchRenorm.
_UNCONVERTIBLE = (nn.LayerNorm, nn.LocalResponseNorm)


class LayerConversion(BaseModel):
    """One converted layer."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source_type: str
    target_type: str
    num_features: int
    dims: int | None
    statistics: Literal["carried", "initialized"]
    """``carried``: running statistics copied from the source layer; ``initialized``: mean 0, var 1
    (the source had none: calibrate on data or fine-tune)."""
    affine: Literal["carried", "identity"]
    """``carried``: weight/bias copied; ``identity``: the source had no affine parameters (weight 1, bias 0)."""


class SkippedLayer(BaseModel):
    """A normalization layer that was left as it is."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: str
    reason: str


class ConversionReport(BaseModel):
    """What :func:`convert_norm` did."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["batchrenorm", "batchnorm"]
    converted: list[LayerConversion] = []
    skipped: list[SkippedLayer] = []

    @property
    def needs_calibration(self) -> bool:
        """True when some converted layer had no running statistics to carry over."""
        return any(c.statistics == "initialized" for c in self.converted)

    def summary(self) -> str:
        n_init = sum(c.statistics == "initialized" for c in self.converted)
        parts = [f"{len(self.converted)} layer(s) converted to {self.target}"]
        if n_init:
            parts.append(f"{n_init} without running statistics (calibrate on data)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left unchanged")
        return ", ".join(parts)


def _layer_dims(module: nn.Module, last_conv_dims: int | None, default: int | None) -> int | None:
    for table in (_BN_DIMS, _IN_DIMS):
        for cls, d in table.items():
            if isinstance(module, cls):
                return d
    if isinstance(module, BatchRenorm) and module.dims is not None:
        return module.dims
    return last_conv_dims if last_conv_dims is not None else default


def _to_batchrenorm(
    module: nn.Module, name: str, dims: int | None, momentum: float | None, eps: float | None
) -> tuple[BatchRenorm, LayerConversion] | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # BatchNorm{1,2,3}d, SyncBatchNorm
        num = module.num_features
        affine = module.affine
        has_stats = module.track_running_stats and module.running_mean is not None
        mom = module.momentum if momentum is None else momentum
        e = module.eps if eps is None else eps
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        num = module.num_features
        affine = module.affine
        has_stats = module.track_running_stats and module.running_mean is not None
        mom = (module.momentum if has_stats else 0.01) if momentum is None else momentum
        e = module.eps if eps is None else eps
    elif isinstance(module, nn.GroupNorm):
        num = module.num_channels
        affine = module.affine
        has_stats = False
        mom = 0.01 if momentum is None else momentum
        e = module.eps if eps is None else eps
    else:
        return None
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), None)
    device = ref.device if ref is not None else None
    new = BatchRenorm(num, dims=dims, eps=e, momentum=mom, affine=True, device=device)
    with torch.no_grad():
        if affine:
            new.weight.copy_(module.weight.detach().float())
            new.bias.copy_(module.bias.detach().float())
        if has_stats:
            new.running_mean.copy_(module.running_mean.detach().float())
            new.running_var.copy_(module.running_var.detach().float())
            if getattr(module, "num_batches_tracked", None) is not None:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
    if ref is not None and ref.dtype != torch.float32 and ref.is_floating_point():
        new.weight.data = new.weight.data.to(ref.dtype)
        new.bias.data = new.bias.data.to(ref.dtype)
    new.train(module.training)
    report = LayerConversion(
        name=name,
        source_type=type(module).__name__,
        target_type="BatchRenorm",
        num_features=num,
        dims=dims,
        statistics="carried" if has_stats else "initialized",
        affine="carried" if affine else "identity",
    )
    return new, report


def _to_batchnorm(module: BatchRenorm, name: str, dims: int | None) -> tuple[nn.Module, LayerConversion]:
    d = module.dims if module.dims is not None else dims
    if d is None:
        d = 2
    cls = _BN_CLASSES[d]
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=True,
        device=module.running_mean.device,
    )
    with torch.no_grad():
        if module.affine:
            new.weight.data = module.weight.detach().clone()
            new.bias.data = module.bias.detach().clone()
        new.running_mean.copy_(module.running_mean)
        new.running_var.copy_(module.running_var)
        new.num_batches_tracked.copy_(module.num_batches_tracked)
    new.train(module.training)
    report = LayerConversion(
        name=name,
        source_type="BatchRenorm",
        target_type=cls.__name__,
        num_features=module.num_features,
        dims=d,
        statistics="carried",
        affine="carried" if module.affine else "identity",
    )
    return new, report


def convert_norm(
    model: nn.Module,
    to: Literal["batchrenorm", "batchnorm"] = "batchrenorm",
    *,
    inplace: bool = False,
    dims: int | None = None,
    momentum: float | None = None,
    eps: float | None = None,
    include: Callable[[str, nn.Module], bool] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace the normalization layers of ``model``.

    Parameters
    ----------
    model
        Any module (ours, MONAI's, torch-em's, hand-written).
    to
        ``"batchrenorm"``: BatchNorm/SyncBatchNorm/InstanceNorm/GroupNorm -> :class:`BatchRenorm`;
        ``"batchnorm"``: BatchRenorm -> the equal ``nn.BatchNorm{1,2,3}d`` (eval outputs identical).
    inplace
        Modify ``model`` itself; by default a deep copy is converted and ``model`` is left untouched.
    dims
        Spatial dimensionality for layers whose class does not say it (GroupNorm, SyncBatchNorm). By
        default it is taken from the closest preceding convolution; if there is none the layer accepts
        any input rank.
    momentum, eps
        Override the source layer's values (default: keep them; layers without running statistics get
        momentum 0.01).
    include
        ``include(name, module) -> bool`` restricts the conversion to some layers.

    Returns
    -------
    (model, report)
        The converted model (``model`` itself when ``inplace``) and a :class:`ConversionReport`.
    """
    if to not in ("batchrenorm", "batchnorm"):
        raise ValueError(f"to must be 'batchrenorm' or 'batchnorm', got {to!r}")
    if dims is not None and dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(target=to)
    default_dims = dims if dims is not None else getattr(target, "dims", None)
    if default_dims not in (1, 2, 3):
        default_dims = None

    # modules in registration order; remember the dimensionality of the last convolution seen
    replacements: list[tuple[str, nn.Module]] = []
    last_conv: int | None = None
    for name, module in target.named_modules():
        conv_d = next((d for cls, d in _CONV_DIMS.items() if isinstance(module, cls)), None)
        if conv_d is not None:
            last_conv = conv_d
            continue
        if include is not None and name and not include(name, module):
            continue
        layer_dims = dims if dims is not None else _layer_dims(module, last_conv, default_dims)
        if to == "batchrenorm":
            if isinstance(module, BatchRenorm):
                continue
            if isinstance(module, _UNCONVERTIBLE):
                report.skipped.append(
                    SkippedLayer(
                        name=name,
                        type=type(module).__name__,
                        reason="normalizes over features of each sample, not per channel; no BatchRenorm "
                        "equivalent (replace it in the architecture)",
                    )
                )
                continue
            out = _to_batchrenorm(module, name, layer_dims, momentum, eps)
            if out is None:
                continue
            new, rec = out
        else:
            if not isinstance(module, BatchRenorm):
                continue
            new, rec = _to_batchnorm(module, name, layer_dims)
        if not name:
            raise ValueError(
                f"the model itself is a {type(module).__name__}; wrap it in a container to convert it"
            )
        replacements.append((name, new))
        report.converted.append(rec)

    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, new)
    logger.info("convert_norm: %s", report.summary())
    return target, report


@torch.no_grad()
def calibrate_norm(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    device: torch.device | str | None = None,
    reset: bool = True,
    max_batches: int | None = None,
) -> int:
    """Recompute the running statistics of every BatchRenorm layer from data.

    The layers are put in train mode with ``momentum=None`` (cumulative average over all batches) and
    ``r_max=1, d_max=0``; every other module (dropout!) stays in eval mode. Afterwards momentum, limits
    and each module's train/eval mode are restored. Returns the number of batches used.

    Parameters
    ----------
    model
        A model with BatchRenorm layers (e.g. after :func:`convert_norm`).
    batches
        Input tensors ``(N, C, *spatial)``, normalized as the network expects.
    reset
        Start from zero statistics (default); ``False`` folds the data into the existing running averages
        as extra batches.
    """
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm)]
    if not layers:
        raise ValueError("the model has no BatchRenorm layers to calibrate; run convert_norm first")
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, float(m.r_max), float(m.d_max)) for m in layers]
    if device is None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    n = 0
    try:
        model.eval()
        for m in layers:
            if reset:
                m.reset_running_stats()
            m.momentum = None
            m.set_renorm_limits(1.0, 0.0)
            m.train()
        for x in batches:
            if max_batches is not None and n >= max_batches:
                break
            model(x.to(device))
            n += 1
    finally:
        for m, (mom, r, d) in zip(layers, saved, strict=True):
            m.momentum = mom
            m.set_renorm_limits(r, d)
        for m, mode in modes.items():
            m.train(mode)
    if n == 0:
        raise ValueError("calibrate_norm got no batches")
    logger.info("calibrated %d BatchRenorm layers on %d batches", len(layers), n)
    return n
