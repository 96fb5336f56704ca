"""Files in, files out: the library side of ``tilenorm-bmz predict``.

:func:`predict_file` opens the input lazily (TIFF, Zarr / OME-Zarr, .npy), fits the input normalization
once on the whole image (quantiles from a seeded sample of blocks when the image is large), chooses the
halo (receptive field) and the tile when not given (the cheapest tiling whose measured forward memory
and pipeline buffers fit the budget, :mod:`tilenorm_bmz.tiling.memory`), and writes

* a Zarr output **out of core**: block by block into a chunked array, so memory holds a few tiles whatever
  the image size. The chunks are the blocks' inner regions when that costs no extra tiles; otherwise
  blocks write parts of chunks, one after another from one writer thread. With ``workers``/``scheduler``
  the blocks run as dask.distributed tasks (identical result) and always own whole chunks, chosen with
  the plan, since concurrent writers must never share a chunk;
* a TIFF or .npy output from an in-memory prediction.

The output appears under its final name only when everything succeeded (temporary name + rename);
inputs are never modified.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from ..atomic import publish, remove_stale, temp_sibling
from ..config import InputNormalization, StrictModel
from ..data.normalize import fit_normalization
from ..introspect import ceil_to, model_divisor, resolve_device
from .distributed import local_client, predict_dask
from .memory import plan_tile
from .plan import chunk_for_tile
from .predictor import TiledPredictor
from .receptive_field import recommend_halo

__all__ = ["PredictionSummary", "predict_file", "output_format"]

logger = logging.getLogger(__name__)

OutputFormat = Literal["zarr", "tiff", "npy"]
_PARTIAL_CHUNK = {1: 4096, 2: 256, 3: 64}
"""Output chunk side when blocks do not own whole chunks (the Zarr default of ``create_output``)."""


class PredictionSummary(StrictModel):
    """What :func:`predict_file` did."""

    input: str
    output: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    mode: Literal["in-memory", "out-of-core", "distributed"]
    tile_shape: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...]
    batch_size: int
    device: str
    grid: tuple[int, ...]
    n_blocks: int
    overhead: float
    """Voxels processed / image voxels."""
    plan: str | None = None
    """How the tile was chosen (measured forward memory, budget), when it was not given."""
    output_chunks: tuple[int, ...] | None = None
    normalization: dict[str, Any] | None = None
    workers: int | None = None
    scheduler: str | None = None
    seconds: float


def output_format(path: str | os.PathLike[str]) -> OutputFormat:
    """``zarr``, ``tiff`` or ``npy`` from the output path's suffix."""
    name = Path(path).name.lower()
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith(".npy"):
        return "npy"
    raise ValueError(f"output {path} must end in .zarr (out of core), .tif/.tiff or .npy")


def _model_dims(model: nn.Module) -> int | None:
    dims = getattr(model, "dims", None)
    if isinstance(dims, int):
        return dims
    for p in model.parameters():
        if p.dim() >= 3:
            return p.dim() - 2
    return None


def _atomic_npy(path: Path, array: np.ndarray, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; choose another output or pass overwrite=True (CLI: --overwrite)"
        )
    remove_stale(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def predict_file(
    model: nn.Module,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    tile_shape: tuple[int, ...] | None = None,
    halo: tuple[int, ...] | int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    divisor: tuple[int, ...] | int | None = None,
    normalization: InputNormalization | dict[str, Any] | None = None,
    memory_budget: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    input_axes: str | None = None,
    nonfinite: Literal["error"] | float = "error",
) -> PredictionSummary:
    """Predict an image file with ``model`` and write the result (see the module docstring).

    Parameters
    ----------
    model
        The network (eval mode is set); any ``(B, C, *s) -> (B, C_out, *s)`` module.
    input, output
        Input image file; output ``.zarr`` (out of core, chunk-aligned), ``.tif``/``.tiff`` or ``.npy``.
    tile_shape, halo
        Default: the largest tile that fits the device (:func:`~tilenorm_bmz.tiling.memory.auto_tile_shape`)
        and the halo from the receptive field (:func:`~tilenorm_bmz.tiling.recommend_halo`).
    normalization
        The input normalization the model was trained with (fitted once on the whole image); ``None``:
        the raw values go to the network.
    memory_budget
        Bytes for one forward pass when choosing the tile (default: see :mod:`tilenorm_bmz.tiling.memory`).
    workers, scheduler
        Run the blocks on a new local dask cluster of ``workers`` processes, or on the dask scheduler at
        ``scheduler`` (input and output must be reachable from every worker). Needs a Zarr output.
    input_axes
        Axes of the input when the file does not record them (e.g. ``"cyx"``).
    nonfinite
        NaN/Inf voxels in the input: ``"error"`` refuses the image (their count and the first position,
        found where they are read: before any output for images whose normalization reads them whole),
        a number replaces them (CLI ``--fill-nonfinite``). One NaN would otherwise turn the global quantiles,
        and so the whole output, into NaN.

    Raises
    ------
    FileExistsError
        The output exists and ``overwrite`` is false (checked before any work).
    ValueError
        Wrong number of channels or dimensions, tile smaller than ``2 * halo + divisor``, an output format
        that cannot be written this way.
    """
    from ..data.io import create_output, open_image, write_tiff

    t0 = time.perf_counter()
    inp, out_path = Path(input), Path(output)
    fmt = output_format(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass --overwrite")
    if out_path.resolve() == inp.resolve():
        raise ValueError("the output must not be the input file")
    distributed = workers is not None or scheduler is not None
    if distributed and fmt != "zarr":
        raise ValueError("distributed prediction writes Zarr: give an output ending in .zarr")
    if workers is not None and scheduler is not None:
        raise ValueError("give either workers (a local cluster) or scheduler (an existing one), not both")
    image = open_image(inp, axes=input_axes).with_nonfinite(nonfinite)
    spatial = image.shape[1:]
    dims = len(spatial)
    model_dims = _model_dims(model)
    if model_dims is not None and model_dims != dims:
        raise ValueError(
            f"the network is {model_dims}D but {inp} has {dims} spatial axes (shape {image.shape}, axes "
            f"{image.axes!r}); pass the right --axes if the file's axes were guessed wrongly"
        )
    in_ch = getattr(model, "in_channels", None)
    if isinstance(in_ch, int) and image.shape[0] != in_ch:
        raise ValueError(
            f"the network expects {in_ch} input channel(s) but {inp} has {image.shape[0]} "
            f"(shape {image.shape}, "
            f"axes {image.axes!r})"
        )
    div = model_divisor(model, dims, divisor)
    if halo is None:
        halo_t = recommend_halo(model, dims, div, device=resolve_device(device))
    else:
        halo_t = (int(halo),) * dims if isinstance(halo, int) else tuple(int(h) for h in halo)
        if len(halo_t) != dims:
            raise ValueError(f"halo has {len(halo_t)} axes {halo_t} but the image has {dims} spatial axes")
    if tile_shape is not None and len(tile_shape) != dims:
        raise ValueError(
            f"tile has {len(tile_shape)} axes {tuple(tile_shape)} but the image has {dims} spatial axes"
        )
    plan_note = None
    if tile_shape is None:
        plan, mem, budget = plan_tile(
            model,
            spatial,
            halo_t,
            divisor=div,
            in_channels=image.shape[0],
            batch_size=batch_size,
            device=device,
            memory_budget_bytes=memory_budget,
            chunked=distributed,  # concurrent writers need blocks of whole chunks
        )
        tile_shape = plan.tile_shape
        plan_note = f"{plan.describe()}; forward {mem.describe()}, budget {budget / 2**30:.2f} GiB"
    fitted = None
    if normalization is not None:
        settings = (
            normalization
            if isinstance(normalization, InputNormalization)
            else InputNormalization.model_validate(normalization)
        )
        fitted = fit_normalization(settings, image, progress=progress)
    predictor = TiledPredictor(
        model,
        tile_shape,
        halo_t,
        batch_size=batch_size,
        device=device,
        divisor=div,
        preprocess=fitted.apply if fitted is not None else None,
        progress=progress and not distributed,
    )
    predictor.check_image(image.shape)
    out_shape = (predictor.out_channels, *spatial)
    axes = image.axes
    chunks_used: tuple[int, ...] | None = None
    mode: Literal["in-memory", "out-of-core", "distributed"]
    if fmt == "zarr":
        mode = "distributed" if distributed else "out-of-core"
        free = predictor.tiling(spatial)
        whole_chunks = _aligned_chunks(spatial, free.effective_tile_shape, halo_t, div)
        if whole_chunks is not None:
            aligned = distributed or predictor.tiling(spatial, whole_chunks).overhead <= free.overhead
        elif distributed:
            raise ValueError(
                f"tile {predictor.tile_shape} is too small for chunk-aligned blocks with halo {halo_t}: "
                f"use a tile of at least "
                f"{tuple(ceil_to(h + ceil_to(h, d) + d, d) for h, d in zip(halo_t, div, strict=True))}"
            )
        else:
            aligned = False
        if aligned and whole_chunks is not None:
            inner = list(whole_chunks)
        else:  # one writer writes parts of chunks (read-modify-write): small chunks keep that cheap
            inner = [min(s, _PARTIAL_CHUNK[dims]) for s in spatial]
        chunks_used = (out_shape[0], *inner)
        target = create_output(
            out_path,
            out_shape,
            np.float32,
            chunks=chunks_used,
            overwrite=overwrite,
            axes=axes,
            check_alignment=distributed,
        )
        with target:
            if distributed:
                client = local_client(workers) if workers is not None else _connect(scheduler)
                try:
                    tiling = predict_dask(predictor, image, target, client=client, progress=progress)
                finally:
                    client.close()  # closes a local cluster; a remote scheduler keeps running
            else:
                tiling = predictor.predict_to(image, target, chunks=inner, aligned=aligned)
    else:
        mode = "in-memory"
        tiling = predictor.tiling(spatial)
        result = predictor.predict(image)
        if fmt == "tiff":
            write_tiff(out_path, result, axes=axes, overwrite=overwrite)
        else:
            _atomic_npy(out_path, result, overwrite)
    summary = PredictionSummary(
        input=str(inp),
        output=str(out_path),
        input_shape=tuple(image.shape),
        output_shape=out_shape,
        mode=mode,
        tile_shape=tiling.effective_tile_shape,
        halo=halo_t,
        divisor=div,
        batch_size=batch_size,
        device=str(predictor.device),
        grid=tiling.grid_shape,
        n_blocks=len(tiling),
        overhead=tiling.overhead,
        plan=plan_note,
        output_chunks=chunks_used,
        normalization=fitted.to_dict() if fitted is not None else None,
        workers=workers,
        scheduler=scheduler,
        seconds=time.perf_counter() - t0,
    )
    if plan_note is not None:
        logger.info("tiling plan: %s", plan_note)
    logger.info("predicted %s -> %s (%s, %s)", inp, out_path, mode, tiling.describe())
    return summary


def _aligned_chunks(
    spatial: tuple[int, ...], tile: tuple[int, ...], halo: tuple[int, ...], divisor: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Per axis the output chunk with which ``tile`` needs the fewest tiles, or None when one axis has none."""
    chunks = []
    for s, t, h, d in zip(spatial, tile, halo, divisor, strict=True):
        option = chunk_for_tile(s, t, h, d)
        if option is None or option.chunk is None:
            return None
        chunks.append(option.chunk)
    return tuple(chunks)


def _connect(address: str | None) -> Any:
    import distributed

    try:
        return distributed.Client(address, timeout="20s")
    except (OSError, TimeoutError) as e:
        raise ValueError(f"cannot connect to the dask scheduler at {address}: {e}") from e
