"""Shared plumbing of the metrics: devices, model modes, batched prediction, array conversion.

A *predictor* here is either a ``torch.nn.Module`` (put in eval mode, moved to the device for the
duration of a metric and restored afterwards) or any callable that maps a float32 tensor
``(N, C, *spatial)`` on the device to an output ``(N, C_out, *spatial)`` (tensor or array). The second
form lets the metrics run on the outputs of any predictor (a bioimage.io backend, an ONNX session, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..introspect import ceil_to, model_divisor, resolve_device, round_down
from ..progress import track

__all__ = [
    "ArrayLike",
    "MetricResult",
    "Predictor",
    "RunContext",
    "RunOptions",
    "run_context",
    "as_numpy",
    "as_spatial_tuple",
    "eval_mode",
    "keep_device",
    "model_divisor",
    "on_device",
    "predict_batched",
    "resolve_device",
    "round_down",
    "ceil_to",
    "track",
]

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | Tensor
Predictor = nn.Module | Callable[[Tensor], Any]


class RunOptions(TypedDict, total=False):
    """The :class:`RunContext` fields as keyword arguments of a metric (each overrides the context's)."""

    device: str | torch.device
    batch_size: int
    divisor: int | Sequence[int] | None
    threshold: float
    progress: bool


@dataclass(frozen=True)
class RunContext:
    """How the metrics of one run execute, in one object instead of the same parameters on every metric.

    A gate (or a study) makes one and hands it to every metric; a metric also takes the fields as keyword
    arguments (:class:`RunOptions`), which override the context's.
    """

    device: str | torch.device = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ..."""
    batch_size: int | None = None
    """Tiles per forward pass (None: the metric's own default). Only speed and memory depend on it, except for
    the train/eval disparity, whose batch composition is part of the measurement and is its own parameter."""
    divisor: int | Sequence[int] | None = None
    """The network's size multiple per axis (None: ``model.divisor`` or 1)."""
    threshold: float = 0.5
    """Binarization threshold of probability outputs (Dice)."""
    progress: bool = False
    """Show progress bars."""

    def batch(self, default: int) -> int:
        """The batch size, or the metric's ``default`` when the context leaves it open."""
        return default if self.batch_size is None else self.batch_size


def run_context(context: RunContext | None, options: Mapping[str, Any]) -> RunContext:
    """``context`` (default: :class:`RunContext`) with the keyword ``options`` applied; unknown names raise."""
    unknown = set(options) - set(RunOptions.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; the run options are "
                        f"{sorted(RunOptions.__annotations__)}")
    base = context or RunContext()
    return dataclasses.replace(base, **options) if options else base


class MetricResult(BaseModel):
    """Base of every metric result: immutable, strict, JSON-serializable via ``model_dump(mode="json")``.

    Arrays meant for figures live in fields declared with ``exclude=True`` (they never reach the JSON).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def as_spatial_tuple(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to ``dims`` axes or check that a sequence has ``dims`` entries."""
    if isinstance(value, int | np.integer):
        return (int(value),) * dims
    out = tuple(int(v) for v in value)
    if len(out) != dims:
        raise ValueError(f"{name} must be an int or {dims} ints (one per spatial axis), got {tuple(value)}")
    return out


def as_numpy(x: ArrayLike, name: str = "array") -> np.ndarray:
    """A numpy view/copy of an array or tensor (detached, on the CPU)."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from e


@contextlib.contextmanager
def eval_mode(model: Predictor) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode and restore every submodule's own mode afterwards."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _module_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@contextlib.contextmanager
def on_device(model: Predictor, device: torch.device) -> Iterator[None]:
    """Move an ``nn.Module`` to ``device`` and back to where it was afterwards (callables are left alone)."""
    if not isinstance(model, nn.Module):
        yield
        return
    original = _module_device(model)
    if original is None or original == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(original)


@contextlib.contextmanager
def keep_device(model: Predictor) -> Iterator[None]:
    """Move an ``nn.Module`` back to its current device afterwards (for code that moves it, e.g. a
    :class:`~tilenorm_bmz.tiling.TiledPredictor`)."""
    original = _module_device(model) if isinstance(model, nn.Module) else None
    try:
        yield
    finally:
        if original is not None:
            model.to(original)  # type: ignore[union-attr]


def _as_output_tensor(out: Any, device: torch.device) -> Tensor:
    if isinstance(out, tuple | list):
        if len(out) != 1:
            raise ValueError(f"the predictor returned {len(out)} outputs; the metrics need exactly one")
        out = out[0]
    t = out if isinstance(out, Tensor) else torch.as_tensor(np.asarray(out))
    return t.to(device=device, dtype=torch.float32)


@torch.no_grad()
def predict_batched(model: Predictor, tiles: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Predict ``tiles`` ``(N, C, *s)`` in batches of ``batch_size``; returns float32 ``(N, C_out, *s)``.

    The caller is responsible for the mode (see :func:`eval_mode`) and the model's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs = []
    for start in range(0, tiles.shape[0], batch_size):
        x = tiles[start : start + batch_size].to(device=device, dtype=torch.float32)
        out = _as_output_tensor(model(x), device)
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"the predictor maps input {tuple(x.shape)} to {tuple(out.shape)}; the metrics need an "
                "output with the input's batch and spatial size (N, C_out, *spatial)"
            )
        outs.append(out)
    return torch.cat(outs)


