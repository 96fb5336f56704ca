"""Dice loss as in the paper: averaged over channels, skipping channels that are empty in a tile."""

from __future__ import annotations

from torch import Tensor

__all__ = ["dice_loss"]


def dice_loss(prediction: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft Dice loss ``1 - 2 sum(p t) / (sum(p) + sum(t))`` per tile and channel, averaged.

    Channels whose target is empty in a tile are skipped for that tile (their Dice is undefined and would
    otherwise dominate small tiles); when every channel of every tile is empty the loss is the mean
    prediction (pushing it to zero), so such batches still carry a gradient.

    Parameters
    ----------
    prediction
        ``(B, C, *spatial)`` probabilities (after sigmoid/softmax), any float dtype (computed in float32).
    target
        ``(B, C, *spatial)`` binary targets.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    p = prediction.float().flatten(2)
    t = target.to(p.dtype).flatten(2)
    inter = (p * t).sum(-1)
    denom = p.sum(-1) + t.sum(-1)
    dice = (2 * inter + eps) / (denom + eps)
    present = t.sum(-1) > 0
    if not bool(present.any()):
        return p.mean()
    return (1 - dice)[present].mean()
