"""Batch Renormalization (Ioffe 2017) with BatchNorm-compatible state.

The layer keeps exactly the buffers of :class:`torch.nn.BatchNorm2d` (``running_mean``, ``running_var``,
``num_batches_tracked``) plus two scalar buffers ``r_max`` and ``d_max`` (the current clipping limits,
so they travel with a checkpoint). ``eps`` sits inside the square root, as in BatchNorm, so in eval mode
the layer *is* BatchNorm and an exported network can swap every BatchRenorm for ``nn.BatchNorm``.

Train mode, per channel over batch and space (statistics in float32 even under autocast)::

    mu_B, var_B = mean, biased variance of x
    sigma_B = sqrt(var_B + eps); sigma_R = sqrt(running_var + eps)      # running stats before the update
    r = stopgrad(clamp(sigma_B / sigma_R, 1/r_max, r_max))
    d = stopgrad(clamp((mu_B - running_mean) / sigma_R, -d_max, d_max))
    y = weight * ((x - mu_B) / sigma_B * r + d) + bias
    running_mean += momentum * (mu_B - running_mean)
    running_var  += momentum * (var_B * n / (n - 1) - running_var)

Because r and d are constants for autograd, ``y`` is a batch norm with affine parameters
``weight * r`` and ``weight * d + bias``; it is computed with the fused ``F.batch_norm`` kernel, which
gives the exact gradients for x, weight and bias. ``momentum=None`` means a cumulative moving average
(used by calibration), as in BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]


#: On the fast CPU path the variance is E[x^2] - E[x]^2; where mean^2 exceeds this multiple of the
#: variance, cancellation could cost precision and the exact two-pass ``torch.var_mean`` is used instead.
_CANCELLATION_RATIO = 100.0


def _batch_stats(x: Tensor, dims: list[int], n: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` over ``dims``, in float32 whatever the input dtype.

    CUDA uses the fused Welford kernel of SyncBatchNorm (``torch.batch_norm_stats``). On other devices
    a mean and a sum of squares (two fast vectorized reductions, no temporary tensor) replace
    ``torch.var_mean``, which is about 3x slower there; the exact form is used when the mean is large
    relative to the spread (see ``_CANCELLATION_RATIO``). Statistics match ``var_mean`` to ~1e-6 relative.
    """
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        return mean.float(), (invstd.float().reciprocal().square())
    xf = x if x.dtype == torch.float32 else x.float()
    mean = xf.mean(dims)
    mean_sq = torch.linalg.vector_norm(xf, 2, dim=dims).square_().div_(n)
    var = (mean_sq - mean.square()).clamp_(min=0.0)
    if bool((mean.square() > _CANCELLATION_RATIO * var).any()):
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return mean, var


class BatchRenorm(nn.Module):
    """Batch Renormalization layer for 1D, 2D or 3D feature maps.

    Parameters
    ----------
    num_features
        Number of channels ``C`` of the input ``(N, C, *spatial)``.
    dims
        Number of spatial dimensions (1, 2 or 3) the layer expects; ``None`` accepts any input with at
        least two dimensions (used when converting layers whose dimensionality is unknown).
    eps
        Added to the variance inside the square root.
    momentum
        Running-statistics momentum in PyTorch's convention (the paper: 0.01); ``None`` for a cumulative
        moving average.
    affine
        Learnable per-channel ``weight`` and ``bias``.
    r_max, d_max
        Initial clipping limits. ``r_max=1, d_max=0`` (the default) is plain BatchNorm training; a
        :class:`~tilenorm_bmz.config.RenormSchedule` raises them during training.

    Examples
    --------
    >>> layer = BatchRenorm(16, dims=3)
    >>> layer.r_max = 3.0; layer.d_max = 5.0
    >>> y = layer(torch.randn(1, 16, 8, 8, 8))
    """

    _version = 2  # BatchNorm's state-dict version (has num_batches_tracked)

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    r_max: Tensor
    d_max: Tensor

    def __init__(
        self,
        num_features: int,
        dims: int | None = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        r_max: float = 1.0,
        d_max: float = 0.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if dims not in (None, 1, 2, 3):
            raise ValueError(f"dims must be 1, 2, 3 or None, got {dims}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] or None, got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.dims = dims
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = True  # part of the BatchNorm interface; always on
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        stat = {"device": device, "dtype": torch.float32}
        self.register_buffer("running_mean", torch.zeros(num_features, **stat))
        self.register_buffer("running_var", torch.ones(num_features, **stat))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("r_max", torch.tensor(float(r_max), **stat))
        self.register_buffer("d_max", torch.tensor(float(d_max), **stat))
        self._check_limits(float(r_max), float(d_max))

    # -- limits -------------------------------------------------------------------------------------
    @staticmethod
    def _check_limits(r_max: float, d_max: float) -> None:
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        if not d_max >= 0.0:
            raise ValueError(f"d_max must be >= 0, got {d_max}")

    def set_renorm_limits(self, r_max: float, d_max: float) -> None:
        """Set the clipping limits (the protocol :meth:`RenormSchedule.apply` uses)."""
        self._check_limits(float(r_max), float(d_max))
        with torch.no_grad():
            self.r_max.fill_(float(r_max))
            self.d_max.fill_(float(d_max))

    def __setattr__(self, name: str, value: Any) -> None:
        # allow `layer.r_max = 3.0` while keeping the limits as (state-dict) buffers
        if name in ("r_max", "d_max") and not isinstance(value, Tensor) and name in self._buffers:
            r, d = (value, float(self.d_max)) if name == "r_max" else (float(self.r_max), value)
            self.set_renorm_limits(r, d)
            return
        super().__setattr__(name, value)

    # -- state --------------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A plain BatchNorm state dict loads: the limits keep their current values and old BatchNorm
        # files without num_batches_tracked get a zero counter (as nn.BatchNorm does).
        absent = [k for k in ("r_max", "d_max", "num_batches_tracked") if prefix + k not in state_dict]
        n_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        tolerated = {prefix + k for k in absent}
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in tolerated]
        if "num_batches_tracked" in absent:
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, dims={self.dims}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, r_max={float(self.r_max):g}, d_max={float(self.d_max):g}"
        )

    # -- forward ------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if self.dims is None:
            ok = x.dim() >= 2
            expected = "at least 2 dimensions (N, C, ...)"
        elif self.dims == 1:
            ok = x.dim() in (2, 3)
            expected = "2 or 3 dimensions (N, C) or (N, C, L)"
        else:
            ok = x.dim() == self.dims + 2
            expected = f"{self.dims + 2} dimensions (N, C, {', '.join('DHW'[3 - self.dims:])})"
        if not ok:
            raise ValueError(f"{type(self).__name__} expected input with {expected}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} has {self.num_features} channels but the input has {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        reduce_dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError(
                f"{type(self).__name__} needs more than 1 value per channel in train mode, got input shape "
                f"{tuple(x.shape)}: use a larger tile or batch, or put the model in eval mode"
            )
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            mu_b, var_b = _batch_stats(x.detach(), reduce_dims, n)
            sigma_b = torch.sqrt(var_b + self.eps)
            sigma_r = torch.sqrt(self.running_var + self.eps)
            r = torch.clamp(sigma_b / sigma_r, 1.0 / self.r_max, self.r_max)
            d = torch.clamp((mu_b - self.running_mean) / sigma_r, -self.d_max, self.d_max)
            # running statistics are updated after r and d were computed from the old ones
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.add_(m * (mu_b - self.running_mean))
            self.running_var.add_(m * (var_b * (n / (n - 1)) - self.running_var))
        if self.affine:
            weight = self.weight * r.to(self.weight.dtype)
            bias = self.weight * d.to(self.weight.dtype) + self.bias
        else:
            weight, bias = r, d
        # normalization with the batch statistics (fused kernel); no running buffers passed
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        kwargs.setdefault("dims", 1)
        super().__init__(num_features, **kwargs)


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, H, W)`` inputs."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        kwargs.setdefault("dims", 2)
        super().__init__(num_features, **kwargs)


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, D, H, W)`` inputs."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        kwargs.setdefault("dims", 3)
        super().__init__(num_features, **kwargs)


def renorm_limits(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer name: (r_max, d_max)}`` of every BatchRenorm layer: the limits as the layers hold them (set by
    :meth:`RenormSchedule.apply`, by a training loop of one's own, or by hand). These, not a schedule's record,
    are what train mode computes with."""
    return {name: (float(m.r_max), float(m.d_max)) for name, m in model.named_modules() if isinstance(m, BatchRenorm)}
