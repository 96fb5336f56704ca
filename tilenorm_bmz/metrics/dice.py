"""Dice coefficient of binary masks (or probabilities binarized at a threshold), per channel."""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
from torch import Tensor

from ._common import ArrayLike

__all__ = ["binarize", "dice", "dice_torch"]


def binarize(x: Tensor, threshold: float) -> Tensor:
    """Boolean masks are kept; anything else is ``x > threshold``."""
    return x if x.dtype == torch.bool else x > threshold


def dice_torch(a: Tensor, b: Tensor, reduce_dims: tuple[int, ...]) -> Tensor:
    """Dice of boolean tensors over ``reduce_dims`` (float64); 1 where both masks are empty."""
    inter = (a & b).sum(dim=reduce_dims, dtype=torch.float64)
    total = a.sum(dim=reduce_dims, dtype=torch.float64) + b.sum(dim=reduce_dims, dtype=torch.float64)
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))


@overload
def dice(a: ArrayLike, b: ArrayLike, threshold: float = 0.5, *, channel_axis: int) -> np.ndarray: ...
@overload
def dice(a: ArrayLike, b: ArrayLike, threshold: float = 0.5, *, channel_axis: None) -> float: ...
def dice(
    a: ArrayLike, b: ArrayLike, threshold: float = 0.5, *, channel_axis: int | None = 0
) -> np.ndarray | float:
    """Dice coefficient ``2|a ∩ b| / (|a| + |b|)`` per channel; 1 when both masks are empty.

    Parameters
    ----------
    a, b
        Masks or probability maps of the same shape, numpy arrays or torch tensors (computed on the
        tensor's device). Boolean inputs are used as they are, anything else is binarized as
        ``x > threshold`` (so integer label images count every non-zero label as foreground).
    threshold
        Binarization threshold for non-boolean inputs (the paper: 0.5).
    channel_axis
        Axis holding the channels (one Dice per channel, the default axis 0 fits ``(C, *spatial)``
        arrays); ``None`` treats the whole array as one mask and returns a float.

    Returns
    -------
    numpy.ndarray or float
        float64 array of shape ``(C,)``, or a float when ``channel_axis`` is None.

    Examples
    --------
    >>> dice(np.zeros((1, 4)), np.zeros((1, 4)))
    array([1.])
    >>> dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), channel_axis=None)
    0.6666666666666666
    """
    ta = a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))
    tb = b if isinstance(b, Tensor) else torch.as_tensor(np.asarray(b))
    if ta.shape != tb.shape:
        raise ValueError(f"dice needs arrays of the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    tb = tb.to(ta.device)
    ba, bb = binarize(ta, threshold), binarize(tb, threshold)
    if channel_axis is None:
        return float(dice_torch(ba.reshape(-1), bb.reshape(-1), (0,)))
    if ba.dim() == 0:
        raise ValueError("dice with a channel_axis needs at least 1-D arrays; pass channel_axis=None")
    if ba.dim() == 1:  # every element is its own channel
        ba, bb = ba[:, None], bb[:, None]
    axis = channel_axis % ba.dim()
    reduce_dims = tuple(d for d in range(ba.dim()) if d != axis)
    return dice_torch(ba, bb, reduce_dims).cpu().numpy()
