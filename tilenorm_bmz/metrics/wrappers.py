"""Predictor wrappers for the paper's comparisons.

* :class:`NormTrainMode` runs a network with its normalization layers in train mode (batch statistics of
  every forward pass), as when a model is evaluated in train mode (paper Table 1, "Dice, train mode"),
  and restores every buffer after each call so the network is unchanged.
* :class:`TilewiseNormalized` normalizes every input tile with its own quantiles before the network (the
  paper's "tile-wise input normalization" setting), so any tiled metric sees what a per-tile
  preprocessing consumer computes.

Both are ``nn.Module`` s mapping ``(B, C, *spatial)`` to ``(B, C_out, *spatial)``, so they plug into
:class:`~tilenorm_bmz.tiling.TiledPredictor` and every metric.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .disparity import norm_layers

__all__ = ["NormTrainMode", "TilewiseNormalized"]


class NormTrainMode(nn.Module):
    """Run ``model`` with its running-statistics normalization layers in train mode, state untouched.

    Dropout and every other module stay in eval mode. Running statistics, ``num_batches_tracked`` and
    BatchRenorm limits are restored after every forward pass, so each call sees the model as it was.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._norms = [m for _, m in norm_layers(model)[0]]
        for attr in ("dims", "in_channels", "out_channels", "divisor"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: Tensor) -> Tensor:
        buffers = [(b, b.detach().clone()) for m in self._norms for b in m.buffers()]
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            for m in self._norms:
                m.train()
            return self.model(x)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes:
                m.train(mode)


class TilewiseNormalized(nn.Module):
    """Normalize every sample of a batch with its own per-channel quantiles, then run ``model``.

    ``y = clip((x - q_lower) / (q_upper - q_lower + eps), 0, 1)`` with linear quantile interpolation
    (numpy's default, bioimage.io's ``scale_range``), computed in float32 per sample and channel.
    """

    def __init__(self, model: nn.Module, lower: float = 0.01, upper: float = 0.98, eps: float = 1e-6,
                 clip: bool = True) -> None:
        super().__init__()
        if not 0.0 <= lower < upper <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= lower < upper <= 1, got {lower}, {upper}")
        self.model = model
        self.lower, self.upper, self.eps, self.clip = float(lower), float(upper), float(eps), bool(clip)
        for attr in ("dims", "in_channels", "out_channels", "divisor"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    @classmethod
    def from_settings(cls, model: nn.Module, settings: Any) -> TilewiseNormalized:
        """From an :class:`~tilenorm_bmz.config.InputNormalization` (its lower/upper/eps/clip)."""
        return cls(model, settings.lower, settings.upper, settings.eps, settings.clip)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.float().flatten(2)
        q = torch.quantile(flat, torch.tensor([self.lower, self.upper], device=x.device), dim=-1)
        shape = (*x.shape[:2],) + (1,) * (x.dim() - 2)
        lo, hi = q[0].reshape(shape), q[1].reshape(shape)
        y = (x.float() - lo) / (hi - lo + self.eps)
        if self.clip:
            y = y.clamp(0.0, 1.0)
        return self.model(y)
