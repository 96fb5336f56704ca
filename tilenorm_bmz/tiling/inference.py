"""The form a network runs in for prediction: the same computation with less memory and time.

:func:`prepare_for_inference` applies two rewrites that change only float rounding (each checked on a
probe against the network as given, and dropped when the outputs differ by more than ``1e-4`` of their
magnitude or the rewrite fails):

1. **Concatenations split out of convolutions** (any device): a convolution of ``torch.cat([a, b], 1)`` -
   a U-Net decoder's skip connection - is the sum of convolutions of ``a`` and ``b`` with the matching
   slices of the weight, so the concatenated tensor (as large as both inputs) is never built. Found with
   ``torch.fx`` in networks it can trace (ours, most plain ``nn.Module`` U-Nets; modules without
   submodules are called as they are); networks it cannot trace (TorchScript, data-dependent control
   flow in a container's ``forward``) run as they are.
2. **Channels-last convolution weights on CPU**: torch runs convolutions on CPU with oneDNN, whose native
   layout is channels-last (``NHWC`` / ``NDHWC``); with weights in the default layout every convolution
   reorders its input and output (time, and a copy of the largest activation). Converting the weights is
   enough: oneDNN follows the weights' layout (a one-channel input is both layouts at once). In place,
   like ``Module.to``. Left alone on CUDA (not measured on a GPU here).

Measured on the 3D BatchRenorm U-Net of ``benchmarks/bench_tiling.py`` (features 16, depth 2, 128^3, CPU,
2 cores), forward peak and time per voxel: as given 340 bytes, 3.1 us; channels-last 276 bytes, 1.7 us;
both rewrites 196-212 bytes, 1.7 us; outputs equal to 1.2e-7. With 32 features (128^3) the time gain was
within run-to-run spread (8.6-10.5 s prepared vs 10.5-12.3 s as given). The memory plan (:mod:`.memory`)
measures the prepared network, so the tiles are larger by as much as the memory drops.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..introspect import ceil_to

__all__ = ["Prepared", "layout_of", "prepare_for_inference", "split_concatenations"]

logger = logging.getLogger(__name__)

_FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}
_RTOL = 1e-4
"""Largest difference between the prepared and the given network on the probe, relative to the output's
largest magnitude (at least 1)."""
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class Prepared:
    """A network prepared for inference and what was done to it."""

    module: nn.Module
    layout: str
    """``"channels-last"`` or ``"contiguous"``."""
    split: int
    """Convolutions of a concatenation computed as sums of convolutions."""
    note: str = ""
    """Why a rewrite was not used (empty when both ran or did not apply)."""

    def describe(self) -> str:
        parts = [self.layout]
        if self.split:
            parts.append(f"{self.split} concatenation(s) split out of convolutions")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


def _conv_weights(model: nn.Module, dims: int) -> list[torch.Tensor]:
    """Parameters and buffers (the split weight slices) shaped like convolution kernels whose layouts differ
    (more than one input channel and kernel element; for the others both layouts have the same strides)."""
    return [p for p in (*model.parameters(), *model.buffers())
            if p.dim() == dims + 2 and p.shape[1] > 1 and p.shape[2:].numel() > 1]


def layout_of(model: nn.Module, dims: int) -> str:
    """``"channels-last"`` when the model's convolution weights are stored channels-last, else ``"contiguous"``."""
    fmt = _FORMATS.get(dims)
    weights = _conv_weights(model, dims)
    if fmt is None or not weights:
        return "contiguous"
    cl = all(w.is_contiguous(memory_format=fmt) and not w.is_contiguous() for w in weights)
    return "channels-last" if cl else "contiguous"


def split_concatenations(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """``model`` with every ``conv(torch.cat(xs, dim=1))`` computed as ``sum_i conv_i(xs[i])``.

    Returns ``(module, number of convolutions rewritten)``: a ``torch.fx.GraphModule`` sharing ``model``'s
    parameters (plus the weight slices), or ``model`` itself when there is nothing to rewrite.
    ``example``: an input, for the channel counts of the concatenated tensors. Raises what ``torch.fx``
    raises on a network it cannot trace.
    """
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    class _Tracer(fx.Tracer):
        # modules without submodules (convolutions, normalizations, activations, user layers) are called
        # as they are; containers are traced through to find the concatenations
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return next(m.children(), None) is None or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    # ShapeProp prints a traceback of a node that fails before it re-raises: the failure is ours to report (the
    # network then runs as it is), not noise for the user
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        fn = _CONV.get(type(conv))
        if fn is None or conv.groups != 1 or conv.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
            continue
        cat = node.args[0]
        if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target is torch.cat
                and len(cat.users) == 1):
            continue
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim not in (1, 1 - conv.weight.dim()) or not isinstance(parts, list | tuple) or len(parts) < 2:
            continue
        metas = [p.meta.get("tensor_meta") if isinstance(p, fx.Node) else None for p in parts]
        if any(m is None for m in metas):
            continue
        channels = [int(m.shape[1]) for m in metas]
        if sum(channels) != conv.in_channels:
            continue
        prefix = f"_split{count}"
        with gm.graph.inserting_before(node):
            total = None
            start = 0
            for i, (part, c) in enumerate(zip(parts, channels, strict=True)):
                gm.register_buffer(f"{prefix}_w{i}", conv.weight.detach()[:, start:start + c].clone())
                start += c
                weight = gm.graph.get_attr(f"{prefix}_w{i}")
                bias = None
                if i == 0 and conv.bias is not None:
                    gm.register_buffer(f"{prefix}_b", conv.bias.detach().clone())
                    bias = gm.graph.get_attr(f"{prefix}_b")
                y = gm.graph.call_function(fn, (part, weight, bias, conv.stride, conv.padding, conv.dilation))
                total = y if total is None else gm.graph.call_method("add_", (total, y))
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
        gm.graph.erase_node(cat)
        count += 1
    if not count:
        return model, 0
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval(), count


def _agree(reference: object, y: object) -> None:
    if not (isinstance(reference, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError("the model does not return one tensor")
    if reference.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(y.shape)}")
    scale = max(float(reference.abs().max()), 1.0)
    diff = float((y.float() - reference.float()).abs().max())
    if not diff <= _RTOL * scale:
        raise ValueError(f"outputs differ by {diff:.3g}")


def prepare_for_inference(
    model: nn.Module,
    dims: int,
    in_channels: int,
    divisor: Sequence[int],
    device: torch.device,
) -> Prepared:
    """``model`` (put in eval mode on ``device``) with the module docstring's rewrites where they compute the
    same on a probe ``(1, in_channels, *probe)`` (32 per axis, rounded up to the divisor)."""
    model = model.to(device).eval()
    shape = tuple(ceil_to(max(32, 2 * int(d)), int(d)) for d in divisor)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, in_channels, *shape), generator=g).to(device)
    try:
        with torch.inference_mode():
            reference = model(x)
    except Exception as e:  # the probe does not fit this network: run it as it is
        return Prepared(model, layout_of(model, dims), 0, f"not prepared (probe {tuple(x.shape)}: {e})")
    note = ""
    module, split = model, 0
    if not isinstance(model, torch.jit.ScriptModule):
        try:
            candidate, split = split_concatenations(model, x)
            if split:
                with torch.inference_mode():
                    _agree(reference, candidate(x))
                module = candidate
        except Exception as e:  # tracing is best effort: the network runs as it is
            split = 0
            logger.debug("concatenations not split: %s", e)
    fmt = _FORMATS.get(dims)
    layout = layout_of(module, dims)
    if device.type == "cpu" and fmt is not None and _conv_weights(module, dims) and layout != "channels-last":
        try:
            module.to(memory_format=fmt)
            with torch.inference_mode():
                _agree(reference, module(x))
            layout = "channels-last"
        except Exception as e:  # the layout is an optimization only: keep the weights as they were
            module.to(memory_format=torch.contiguous_format)
            note = f"weights kept contiguous ({e})"
    prepared = Prepared(module, layout, split, note)
    logger.debug("network prepared for inference: %s", prepared.describe())
    return prepared
