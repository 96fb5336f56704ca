"""Tiled prediction as dask.distributed tasks: the same blocks, read from and written to Zarr by workers.

Every task predicts a group of consecutive blocks of the :class:`~tilenorm_bmz.tiling.blocks.Tiling`
that :meth:`TiledPredictor.predict_to` would use for the same output (inner regions made of whole output
chunks, so no two tasks write the same chunk) in the same batches, so the result is identical to the
single-process one. This is ``map_overlap`` semantics without dask arrays: each task reads its tiles
(inner region + halo) itself, so nothing but block indices travels through the scheduler.

With a cluster of several machines, the input and the output must be on storage every worker can reach
(a shared file system or an object store Zarr can open).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..progress import progress_bar
from .blocks import Block, Tiling
from .predictor import ArrayLike, TiledPredictor, _output_chunks

__all__ = ["predict_dask", "local_client"]

logger = logging.getLogger(__name__)


def _open(source: ArrayLike | Callable[[], ArrayLike]) -> ArrayLike:
    return source() if callable(source) and not hasattr(source, "shape") else source


def _predict_task(
    predictor: TiledPredictor,
    image: ArrayLike | Callable[[], ArrayLike],
    output: Any,
    tiling: Tiling,
    indices: Sequence[tuple[int, ...]],
) -> int:
    """Predict the blocks ``indices`` and write their inner regions to ``output``; returns the block count."""
    img = _open(image)
    blocks = [tiling.block(i) for i in indices]

    def sink(block: Block, y: np.ndarray) -> None:
        output[(slice(None), *block.inner)] = y[(slice(None), *block.local)]

    predictor.run_blocks(img, tiling, blocks, sink)
    return len(blocks)


def predict_dask(
    predictor: TiledPredictor,
    image: ArrayLike | Callable[[], ArrayLike],
    output: Any,
    *,
    client: Any = None,
    blocks_per_task: int | None = None,
    progress: bool = False,
) -> Tiling:
    """Predict ``image`` into the chunked ``output`` with dask.distributed workers.

    Parameters
    ----------
    predictor
        The predictor to run; it is sent to every worker once (its model travels as TorchScript bytes or
        architecture + state dict) and runs with its own batch size, device and preprocessing there.
    image
        The input ``(C, *spatial)``: a lazily read :class:`~tilenorm_bmz.data.io.Image` or a Zarr array
        (both pickle by path), or a zero-argument callable that opens it on the worker.
    output
        A Zarr array or :class:`~tilenorm_bmz.data.io.OutputArray` of shape ``(C_out, *spatial)``; every
        task writes whole chunks of it.
    client
        A ``distributed.Client``; default: the current client (``distributed.get_client()``).
    blocks_per_task
        Blocks per task (rounded up to a multiple of the batch size so batches match the single-process
        run); default: 4 batches.
    progress
        Show a progress bar of finished blocks.

    Returns
    -------
    Tiling
        The tiling that was run (the same as :meth:`TiledPredictor.predict_to` on this output).
    """
    import distributed

    if predictor.blend != "none":
        raise ValueError("blend='gaussian' cannot be distributed: blocks must own disjoint output regions")
    client = client or distributed.get_client()
    img = _open(image)
    spatial = predictor.check_image(img.shape)
    expected = (predictor.out_channels, *spatial)
    if tuple(output.shape) != expected:
        raise ValueError(f"output has shape {tuple(output.shape)} but the prediction is {expected}")
    chunks = _output_chunks(output)
    if chunks is None:
        raise ValueError("distributed prediction writes to a chunked array (Zarr); got an in-memory output")
    tiling = predictor.tiling(spatial, chunks)
    per_task = blocks_per_task or 4 * predictor.batch_size
    per_task = -(-per_task // predictor.batch_size) * predictor.batch_size
    indices = [b.index for b in tiling]
    groups = [indices[i : i + per_task] for i in range(0, len(indices), per_task)]
    logger.info("distributed prediction: %s in %d task(s)", tiling.describe(), len(groups))
    token = uuid.uuid4().hex[:12]
    pred_f = client.scatter(predictor, broadcast=True, hash=False)
    futures = [
        client.submit(
            _predict_task, pred_f, image, output, tiling, g, pure=False, key=f"tilenorm-predict-{token}-{i}"
        )
        for i, g in enumerate(groups)
    ]
    try:
        with progress_bar(progress, len(indices), "blocks") as advance:
            for fut in distributed.as_completed(futures):
                advance(fut.result())
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        client.cancel([pred_f])
    return tiling


def local_client(workers: int, *, processes: bool = True, threads_per_worker: int = 1) -> Any:
    """A ``distributed.Client`` on a new local cluster of ``workers`` workers (closing it closes the cluster).

    Worker processes get ``OMP_NUM_THREADS=1`` from dask, so ``workers`` should be about the number of
    cores; each worker runs one task (a group of tiles) at a time.
    """
    import distributed

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return distributed.Client(
        n_workers=workers, threads_per_worker=threads_per_worker, processes=processes, dashboard_address=None
    )
