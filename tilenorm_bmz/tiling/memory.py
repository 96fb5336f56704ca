"""How much memory a tile needs, measured, and the largest cheapest tiling that fits a memory budget.

What ``tilenorm-bmz predict`` does without ``--tile``:

1. **Memory of one forward pass** (inference mode, batch 1), measured on probe tiles (:class:`ForwardMemory`):
   on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``); on CPU the peak of the bytes held
   by torch's allocator, replayed from the profiler's memory events (``torch.profiler`` with
   ``profile_memory=True``: every allocation and free, TorchScript included), plus the input tile.
   Both count what torch allocates (activations, convolution workspaces, the output), not the process's
   resident size. A convolutional network's peak grows linearly with the tile once the tile is large;
   smaller tiles carry fixed workspaces and other convolution algorithms on top (measured on a 3D U-Net
   with 4 features: 952 bytes/voxel at 32^3-48^3, 536 at 64^3, 152 at 80^3-96^3, 136 at 128^3; with 16
   features 592 at 48^3, then 464 from 64^3 to 128^3, ``VmHWM`` growth 474 at 128^3). So the bytes per
   voxel are those of the largest probe (96^3 in 3D, 384^2 in 2D), and a planned tile smaller than the
   probe is measured itself before it is used (and the plan shrunk until it fits).
2. **Budget** (``memory_budget=``, CLI ``--memory-gb``; default on CUDA 80% of the free device memory,
   on CPU a quarter of the available RAM, Linux ``MemAvailable``, 4 GiB when unknown). The budget is the
   working memory of the whole tiled prediction: the forward pass of a batch of tiles **plus the
   pipeline's buffers**, per tile voxel and float32: ``prefetch`` input batches read ahead, up to three
   transient copies of the tile being read (raw, float32, padded), and ``prefetch + 2`` output batches
   (the writer queue and the chunk being encoded) - :func:`pipeline_bytes_per_voxel` - and
   ``RESERVE`` (10%) is kept free for what the allocator counts nowhere: the heap fragmentation of the
   reader and writer threads' arenas and the output library's chunk buffers (without it an out-of-core
   prediction of a 640^3 volume grew its resident memory by slightly more than the budget). Not in the budget: the input
   image and an in-memory output array (they are the data, not the work).
3. **Plan**: the tile per axis (a multiple of the divisor, at least ``2 * halo + divisor``, at most the
   padded image) that processes the fewest voxels while ``forward + buffers <= budget``
   (:func:`~tilenorm_bmz.tiling.plan.plan_tiles`); its overhead (voxels processed / image voxels) is
   logged and reported in the prediction summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..introspect import ceil_to, model_divisor, resolve_device
from .inference import prepare_for_inference
from .plan import TilePlan, plan_tiles

__all__ = [
    "ForwardMemory",
    "auto_tile_shape",
    "bytes_per_voxel",
    "measure_forward_memory",
    "memory_budget",
    "peak_forward_bytes",
    "pipeline_bytes_per_voxel",
    "plan_tile",
]

logger = logging.getLogger(__name__)

_DEFAULT_CPU_BUDGET = 4 * 2**30
RESERVE = 0.1
"""Fraction of the budget kept free (see the module docstring, 2.)."""
_PROBES = {1: (4096, 8192), 2: (256, 384), 3: (64, 96)}


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
    """Bytes a tiled prediction may use: 80% of free CUDA memory, or a quarter of the available RAM."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.8 * free)
    ram = _available_ram()
    return _DEFAULT_CPU_BUDGET if ram is None else ram // 4


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (libkineto prints a line when a profiler starts and stops)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w", encoding="ascii") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_peak(fn: object) -> int | None:
    """Peak bytes held by torch's CPU allocator while ``fn()`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()  # type: ignore[operator]
    finally:
        with _quiet_stderr():
            prof.stop()
    try:
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except AttributeError:  # a torch without these (private) accessors
        return None
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def _linux_peak_growth(fn: object) -> int | None:
    """Peak resident memory growth (bytes) while ``fn()`` runs (Linux ``VmHWM`` after ``clear_refs``)."""

    def status(field: str) -> int | None:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    try:
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        fn()  # type: ignore[operator]
        peak = status("VmHWM")
    except OSError:
        return None
    return None if before is None or peak is None else max(0, peak - before)


def peak_forward_bytes(
    model: nn.Module, shape: Sequence[int], device: str | torch.device = "cpu"
) -> tuple[int, int, str]:
    """Peak memory of one inference forward of a zero input of ``shape`` ``(B, C, *spatial)``.

    Returns ``(peak bytes including the input, output channels, method)``; see the module docstring.
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    x = torch.zeros(tuple(int(s) for s in shape), device=dev)
    out: list[int] = []

    def run() -> None:
        with torch.inference_mode():
            y = model(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the model returned {type(y).__name__}, expected one tensor (B, C_out, *spatial)")
        out.append(int(y.shape[1]))

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        run()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        return int(peak + x.nbytes), out[0], "CUDA allocator peak (torch.cuda.max_memory_allocated)"
    measured = _profiled_peak(run)
    method = "CPU allocator peak from the profiler's memory events"
    if measured is None:
        measured, method = _linux_peak_growth(run), "peak resident memory growth (VmHWM)"
    if measured is None:
        if not out:  # neither measurement ran the forward: run it for the output channels
            run()
        measured, method = 1024 * x[0, 0].numel(), "not measurable here: 1024 bytes per voxel assumed"
    return int(measured + x.nbytes), out[0], method


@dataclass(frozen=True)
class ForwardMemory:
    """Peak memory of one forward pass per tile voxel and batch item (see the module docstring)."""

    bytes_per_voxel: float
    out_channels: int
    method: str
    probes: tuple[tuple[tuple[int, ...], int], ...] = ()
    """``(tile, peak bytes)`` of each probe."""

    def forward_bytes(self, voxels: float, batch_size: int = 1) -> float:
        return self.bytes_per_voxel * voxels * batch_size

    def describe(self) -> str:
        return f"{self.bytes_per_voxel:.0f} bytes/voxel ({self.method})"


def measure_forward_memory(
    model: nn.Module,
    dims: int,
    *,
    in_channels: int = 1,
    divisor: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    probes: Sequence[int | Sequence[int]] | None = None,
    budget: int | None = None,
) -> ForwardMemory:
    """Measure the forward memory of ``model`` on probe tiles (default: 64^3 and 96^3, 256^2 and 384^2).

    Probes run from small to large; a larger probe whose extrapolated peak exceeds ``budget`` is skipped
    (the measurement itself stays within the budget when the smallest probe does).
    """
    dev = resolve_device(device)
    div = model_divisor(model, dims, divisor)
    sizes = probes if probes is not None else _PROBES.get(dims, (64, 96))
    shapes = []
    for side in sizes:
        shape = (side,) * dims if isinstance(side, int) else tuple(side)
        shapes.append(tuple(ceil_to(max(int(s), 2 * d), d) for s, d in zip(shape, div, strict=True)))
    results: list[tuple[tuple[int, ...], int]] = []
    out_ch = 1
    method = ""
    for shape in sorted(shapes, key=math.prod):
        if results and budget is not None:
            last, last_peak = results[-1]
            if last_peak / math.prod(last) * math.prod(shape) > budget:
                break
        peak, out_ch, method = peak_forward_bytes(model, (1, in_channels, *shape), dev)
        results.append((shape, peak))
    floor = 4 * (in_channels + out_ch)  # the input and the output at least
    shape, peak = max(results, key=lambda r: math.prod(r[0]))
    return ForwardMemory(max(peak / math.prod(shape), floor), out_ch, method, tuple(results))


def bytes_per_voxel(
    model: nn.Module,
    dims: int,
    *,
    in_channels: int = 1,
    divisor: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    probe: int | Sequence[int] | None = None,
) -> float:
    """Measured forward memory per tile voxel (batch 1); see :func:`measure_forward_memory`."""
    probes = None if probe is None else [probe]
    return measure_forward_memory(
        model, dims, in_channels=in_channels, divisor=divisor, device=device, probes=probes
    ).bytes_per_voxel


def pipeline_bytes_per_voxel(in_channels: int, out_channels: int, prefetch: int = 2) -> int:
    """Bytes per tile voxel and batch item of the prediction pipeline's buffers (module docstring, 2.)."""
    return 4 * (prefetch * in_channels + 3 * in_channels + (prefetch + 2) * out_channels)


def plan_tile(
    model: nn.Module,
    image_shape: Sequence[int],
    halo: Sequence[int],
    *,
    divisor: Sequence[int] | None = None,
    in_channels: int = 1,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    memory_budget_bytes: int | None = None,
    prefetch: int = 2,
    chunked: bool = False,
    memory: ForwardMemory | None = None,
    optimize: bool = True,
) -> tuple[TilePlan, ForwardMemory, int]:
    """The cheapest tiling whose forward pass and pipeline buffers fit the budget.

    Returns ``(plan, measured forward memory, budget in bytes)``. ``chunked``: inner regions made of whole
    output chunks (concurrent Zarr writers). ``optimize``: measure the network in the form
    :class:`~tilenorm_bmz.tiling.TiledPredictor` runs it by default (:mod:`.inference`).
    """
    dims = len(image_shape)
    div = model_divisor(model, dims, divisor)
    if optimize and memory is None:
        model = prepare_for_inference(model, dims, in_channels, div, resolve_device(device)).module
    budget = memory_budget_bytes if memory_budget_bytes is not None else memory_budget(device)
    measured = memory is None
    mem = memory or measure_forward_memory(model, dims, in_channels=in_channels, divisor=div, device=device,
                                           budget=budget)
    buffers = batch_size * pipeline_bytes_per_voxel(in_channels, mem.out_channels, prefetch)
    usable = (1 - RESERVE) * budget
    limit = usable / (batch_size * mem.bytes_per_voxel + buffers)
    largest_probe = max((math.prod(s) for s, _ in mem.probes), default=0)
    for _ in range(8):
        plan = plan_tiles(image_shape, halo, div, limit, chunked=chunked)
        voxels = math.prod(plan.tile_shape)
        need = (batch_size * mem.bytes_per_voxel + buffers) * voxels
        if not (measured and plan.fits and voxels < largest_probe):
            break
        # below the probes the bytes per voxel can be higher (fixed workspaces): measure this tile
        peak, _, _ = peak_forward_bytes(model, (batch_size, in_channels, *plan.tile_shape), device)
        need = peak + buffers * voxels
        if need <= usable:
            break
        limit = voxels * 0.9 * usable / need
    if not plan.fits:
        logger.warning(
            "the smallest valid tile %s needs about %.2f GiB, more than the budget of %.2f GiB",
            plan.tile_shape, need / 2**30, budget / 2**30,
        )
    logger.info(
        "tiling plan: %s; forward %s, batch %d, %.2f of %.2f GiB",
        plan.describe(), mem.describe(), batch_size, need / 2**30, budget / 2**30,
    )
    return plan, mem, budget


def auto_tile_shape(model: nn.Module, image_shape: Sequence[int], halo: Sequence[int], **kwargs: Any) -> tuple[int, ...]:
    """The tile of the cheapest tiling that fits the memory budget (:func:`plan_tile`, same arguments)."""
    return plan_tile(model, image_shape, halo, **kwargs)[0].tile_shape
