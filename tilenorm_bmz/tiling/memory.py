"""The largest tile that fits the device: memory per voxel of a forward pass and the memory budget.

Rule (what ``tilenorm-bmz predict`` does without ``--tile``):

1. **Memory per tile voxel** of one forward pass in inference mode, measured on a small probe tile
   (its size is irrelevant: a convolutional network's memory grows linearly with the voxels):
   on CUDA the peak allocated memory (``torch.cuda.max_memory_allocated``); on CPU the sum of every
   distinct activation tensor the layers produce, an upper bound of the peak (inference mode frees
   them as it goes), plus the input. TorchScript modules cannot be hooked: on Linux their peak resident
   memory during the probe is measured instead (``VmHWM``), else 256 bytes per voxel are assumed.
2. **Budget**: on CUDA 80% of the free device memory; on CPU a quarter of the available RAM (Linux
   ``MemAvailable``; 4 GiB when unknown), leaving room for the prefetched tiles, the output and other
   processes. ``memory_budget=`` overrides it.
3. **Tile**: ``budget / (bytes_per_voxel * batch_size)`` voxels, split evenly over the axes (each a
   multiple of the divisor), never larger than the padded image along an axis (the spare budget goes to
   the other axes) and never smaller than ``2 * halo + divisor`` (a tiling shrinks such a tile to an
   image that is smaller still).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..introspect import ceil_to, model_divisor, resolve_device
from .blocks import min_tile_size

__all__ = ["auto_tile_shape", "bytes_per_voxel", "memory_budget"]

logger = logging.getLogger(__name__)

_DEFAULT_CPU_BUDGET = 4 * 2**30


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device: str | torch.device = "auto") -> int:
    """Bytes a forward pass may use: 80% of free CUDA memory, or a quarter of the available RAM."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.8 * free)
    ram = _available_ram()
    return _DEFAULT_CPU_BUDGET if ram is None else ram // 4


def bytes_per_voxel(
    model: nn.Module,
    dims: int,
    *,
    in_channels: int = 1,
    divisor: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    probe: int | Sequence[int] | None = None,
) -> float:
    """Memory of one forward pass (batch 1, inference mode) per tile voxel; see the module docstring."""
    dev = resolve_device(device)
    div = model_divisor(model, dims, divisor)
    side = probe if probe is not None else (32 if dims == 3 else 128)
    shape = (side,) * dims if isinstance(side, int) else tuple(side)
    shape = tuple(ceil_to(max(s, 2 * d), d) for s, d in zip(shape, div, strict=True))
    voxels = math.prod(shape)
    x = torch.zeros((1, in_channels, *shape), device=dev)
    model = model.to(dev).eval()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / voxels
    seen: dict[int, int] = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}
    held: list[torch.Tensor] = []  # keep every activation alive so no storage is reused and missed

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                held.append(t)
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()

    if isinstance(model, torch.jit.ScriptModule):
        measured = _linux_peak_growth(lambda: model(x))
        if measured is None:
            logger.info("cannot observe the layers of a TorchScript module; assuming 256 bytes per voxel")
            return 256.0
        return max(measured, x.numel() * 4) / voxels
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
        held.clear()
    return sum(seen.values()) / voxels


def _linux_peak_growth(fn: Callable[[], object]) -> int | None:
    """Peak resident memory growth (bytes) of this process while ``fn()`` runs (Linux), or None.

    Resets the process's peak mark (``/proc/self/clear_refs``), runs ``fn`` in inference mode and reads
    ``VmHWM`` against the resident size before.
    """

    def status(field: str) -> int | None:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    try:
        with torch.inference_mode():
            fn()  # warm-up: library caches are not part of a tile's cost
            before = status("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            fn()
        peak = status("VmHWM")
    except OSError:
        return None
    if before is None or peak is None:
        return None
    return max(0, peak - before)


def _smallest_equivalent_tile(padded: int, tile: int, halo: int, divisor: int, minimum: int) -> int:
    """The smallest tile (multiple of ``divisor``, >= ``minimum``) that needs no more tiles along an axis than
    ``tile``: fewer voxels are computed twice in the overlaps (a 160-voxel axis with halo 24 needs two tiles
    of 104, not two of 152)."""
    if tile >= padded:
        return tile
    from .blocks import Tiling

    def count(t: int) -> int:
        return Tiling((padded,), (t,), (halo,), (divisor,)).grid_shape[0]

    target = count(tile)
    t = max(minimum, divisor)
    while t < tile and count(t) > target:
        t += divisor
    return min(t, tile)


def auto_tile_shape(
    model: nn.Module,
    image_shape: Sequence[int],
    halo: Sequence[int],
    *,
    divisor: Sequence[int] | None = None,
    in_channels: int = 1,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    memory_budget_bytes: int | None = None,
) -> tuple[int, ...]:
    """The largest tile (per axis, multiples of the divisor) whose forward pass fits the memory budget."""
    dims = len(image_shape)
    div = model_divisor(model, dims, divisor)
    budget = memory_budget_bytes if memory_budget_bytes is not None else memory_budget(device)
    bpv = bytes_per_voxel(model, dims, in_channels=in_channels, divisor=div, device=device)
    voxels = max(1.0, budget / (bpv * batch_size))
    padded = [ceil_to(s, d) for s, d in zip(image_shape, div, strict=True)]
    minimum = [min_tile_size(h, d) for h, d in zip(halo, div, strict=True)]
    tile = [0] * dims
    used = [0] * dims  # the tile size the tiling will use (shrunk to a smaller padded image)
    order = sorted(range(dims), key=lambda a: padded[a])
    for n_left, a in zip(range(dims, 0, -1), order, strict=True):
        side = int(voxels ** (1.0 / n_left))
        tile[a] = max(minimum[a], min(padded[a], (side // div[a]) * div[a]))
        used[a] = min(tile[a], padded[a])
        voxels /= used[a]
    tile = [_smallest_equivalent_tile(p, t, h, d, m) for p, t, h, d, m in zip(padded, tile, halo, div, minimum,
                                                                             strict=True)]
    used = [min(t, p) for t, p in zip(tile, padded, strict=True)]
    result = tuple(tile)
    need = bpv * batch_size * float(np.prod(used))
    if need > budget:
        logger.warning(
            "the smallest valid tile %s needs about %.1f GiB, more than the budget of %.1f GiB",
            result,
            need / 2**30,
            budget / 2**30,
        )
    logger.info(
        "tile %s: %.0f bytes/voxel, batch %d, budget %.2f GiB", result, bpv, batch_size, budget / 2**30
    )
    return result
