"""TiledPredictor: seamless tiled prediction of any-size images with a ``(B, C, *s) -> (B, C_out, *s)`` net.

The prediction of each :class:`~tilenorm_bmz.tiling.blocks.Block` is cropped to its inner region (the halo
is discarded, not blended). For a tile-local network (BatchRenorm/BatchNorm in eval, or no feature
normalization) with ``halo >=`` the one-sided theoretical receptive field, the result equals the
whole-image forward pass of the same image zero-padded once to the size divisor (:func:`forward_whole`)
at every voxel, up to float rounding. Networks that normalize with tile statistics (InstanceNorm,
GroupNorm) do not stitch exactly whatever the halo.

Work is pipelined: a reader thread reads (and preprocesses) the next batches of tiles while the network
runs (on CUDA into pinned memory, copied to the device asynchronously), and a writer thread stores
finished blocks, both through bounded queues, so memory holds a few
batches of tiles, never the whole image (with :meth:`TiledPredictor.predict_to` and a Zarr output).
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..introspect import ceil_to, model_divisor, resolve_device
from ..progress import progress_bar
from .blocks import Block, Tiling
from .inference import Prepared, layout_of, prepare_for_inference

__all__ = ["TiledPredictor", "forward_whole"]

logger = logging.getLogger(__name__)

ArrayLike = Any
"""An array ``(C, *spatial)``: ``numpy.ndarray``, ``zarr.Array``, :class:`tilenorm_bmz.data.io.Image`, or
anything with ``shape`` and numpy-style slicing that returns arrays."""

Preprocess = Callable[[np.ndarray], np.ndarray]

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} if e
)


def _is_oom(error: BaseException) -> bool:
    """Device out-of-memory (CUDA) or a failed CPU allocation."""
    return isinstance(error, _OOM_ERRORS) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


def _autocast_dtype(autocast: bool | str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if autocast is None or autocast is False:
        return None
    if device.type != "cuda":
        logger.warning("autocast is only used on CUDA; running in float32 on %s", device)
        return None
    if autocast is True:
        return torch.float16
    if isinstance(autocast, str):
        try:
            dtype = getattr(torch, autocast)
        except AttributeError:
            raise ValueError(f"autocast must be True, 'float16' or 'bfloat16', got {autocast!r}") from None
    else:
        dtype = autocast
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"autocast must be True, 'float16' or 'bfloat16', got {autocast!r}")
    return dtype


def _output_chunks(output: Any) -> tuple[int, ...] | None:
    """Spatial write granularity of an output array (Zarr shards/chunks), or None for in-memory arrays."""
    if isinstance(output, np.ndarray):
        return None
    chunks = getattr(output, "shards", None) or getattr(output, "chunks", None)
    if chunks is None or not all(isinstance(c, int | np.integer) for c in chunks):
        return None
    return tuple(int(c) for c in chunks[1:])


def _gaussian_weights(shape: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's importance map: a Gaussian centred on the tile, sigma = tile / 8, minimum > 0."""
    w = np.ones((), dtype=np.float64)
    for s in shape:
        x = np.arange(s, dtype=np.float64) - (s - 1) / 2
        g = np.exp(-0.5 * (x / max(s * sigma_scale, 1e-6)) ** 2)
        w = np.multiply.outer(w, g)
    w /= w.max()
    w[w == 0] = w[w > 0].min()
    return w.astype(np.float32)


def _batches(items: Iterable[Block], size: int) -> Iterator[list[Block]]:
    batch: list[Block] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class TiledPredictor:
    """Predict an image of any size tile by tile, cropping each tile's halo (no blending).

    Parameters
    ----------
    model
        A module mapping ``(B, C, *spatial)`` to ``(B, C_out, *spatial)`` with "same" padding (our
        :class:`~tilenorm_bmz.models.UNet`, MONAI's UNet, a TorchScript module, ...). It is put in eval mode
        and moved to ``device``.
    tile_shape
        Network input per tile (spatial); a multiple of the divisor, at least ``2 * halo + divisor``.
    halo
        Context cropped on each side of every tile; use >= the one-sided theoretical receptive field
        (:func:`~tilenorm_bmz.tiling.receptive_field`) for exact stitching.
    batch_size
        Tiles per forward pass.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
    divisor
        The size divisor when the model does not expose ``model.divisor`` (default 1).
    autocast
        ``True`` / ``"float16"`` / ``"bfloat16"``: mixed precision on CUDA (ignored with a warning on CPU);
        ``None``/``False``: float32 (exact).
    blend
        ``"none"``: crop the halo (exact). ``"gaussian"``: accumulate whole tiles with a Gaussian weight
        (sigma = tile/8, nnU-Net's choice); for comparison only, in-memory :meth:`predict` only.
    preprocess
        Called on every tile's input region ``(C, *region)`` (float32) before zero padding, e.g. a
        :class:`~tilenorm_bmz.data.normalize.FittedNormalization`'s ``apply`` fitted once on the whole
        image (global normalization keeps tiling exact; per-tile statistics do not).
    progress
        Show a rich progress bar.
    prefetch
        Batches read ahead and batches waiting to be written.
    optimize
        Run the network in the form :func:`~tilenorm_bmz.tiling.inference.prepare_for_inference` gives it
        (concatenations split out of convolutions; on CPU, channels-last convolution weights, converted in
        place like the move to ``device``): less memory and time, the same outputs up to float rounding,
        checked on a probe at the first forward pass. ``False`` for a model that goes on training and must
        stay bit-identical to one restored from its checkpoint.

    Examples
    --------
    >>> from tilenorm_bmz.models import UNet
    >>> net = UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4, norm="batchnorm")
    >>> predictor = TiledPredictor(net, tile_shape=(64, 64), halo=24, device="cpu")
    >>> predictor.predict(np.zeros((1, 100, 90), np.float32)).shape
    (2, 100, 90)
    """

    def __init__(
        self,
        model: nn.Module,
        tile_shape: int | Sequence[int],
        halo: int | Sequence[int],
        *,
        batch_size: int = 1,
        device: str | torch.device = "auto",
        divisor: int | Sequence[int] | None = None,
        autocast: bool | str | torch.dtype | None = None,
        blend: Literal["none", "gaussian"] = "none",
        preprocess: Preprocess | None = None,
        progress: bool = False,
        prefetch: int = 2,
        optimize: bool = True,
    ) -> None:
        if isinstance(tile_shape, int):
            dims = int(getattr(model, "dims", 0) or 0)
            if dims not in (1, 2, 3):
                raise ValueError(
                    "tile_shape is an int but the model does not say its dims: give one size per axis"
                )
            tile_shape = (tile_shape,) * dims
        tile = tuple(int(t) for t in tile_shape)
        dims = len(tile)
        model_dims = getattr(model, "dims", None)
        if isinstance(model_dims, int) and model_dims != dims:
            raise ValueError(f"the model is {model_dims}D but tile_shape {tile} has {dims} axes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if blend not in ("none", "gaussian"):
            raise ValueError(f"blend must be 'none' or 'gaussian', got {blend!r}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.dims = dims
        self.divisor = model_divisor(model, dims, divisor)
        self.halo = (int(halo),) * dims if isinstance(halo, int) else tuple(int(h) for h in halo)
        if len(self.halo) != dims:
            raise ValueError(f"halo has {len(self.halo)} axes {self.halo} but tile_shape {tile} has {dims}")
        Tiling(tile, tile, self.halo, self.divisor)  # validates tile vs halo and divisor (clear errors)
        self.tile_shape = tile
        self.batch_size = int(batch_size)
        self._device_request = device
        self.device = resolve_device(device)
        self.autocast = autocast
        self._autocast_dtype = _autocast_dtype(autocast, self.device)
        self.blend = blend
        self.preprocess = preprocess
        self.progress = progress
        self.prefetch = int(prefetch)
        in_ch = getattr(model, "in_channels", None)
        self.in_channels: int | None = int(in_ch) if isinstance(in_ch, int) else None
        out_ch = getattr(model, "out_channels", None)
        self._out_channels: int | None = int(out_ch) if isinstance(out_ch, int) else None
        self.model = model.to(self.device).eval()
        self.optimize = bool(optimize)
        self.prepared: Prepared | None = None
        """The network as it runs, prepared at the first forward pass (:mod:`.inference`)."""

    # -- geometry -----------------------------------------------------------------------------------
    def tiling(self, image_shape: Sequence[int], chunks: Sequence[int] | None = None) -> Tiling:
        """The :class:`Tiling` of an image with spatial shape ``image_shape`` (``chunks``: output chunks)."""
        return Tiling(image_shape, self.tile_shape, self.halo, self.divisor, chunks)

    @property
    def out_channels(self) -> int:
        """Output channels (``model.out_channels``, else found by one forward pass of a small input)."""
        if self._out_channels is None:
            c = self.in_channels or 1
            # the smallest valid size can be too small for a network with more pooling than its declared
            # divisor tells (e.g. a package's step): probe with at least 16 voxels per axis
            size = tuple(ceil_to(16, d) for d in self.divisor)
            probe = np.zeros((1, c, *size), np.float32)
            try:
                self._out_channels = int(self._forward(probe).shape[1])
            except RuntimeError as e:
                raise ValueError(
                    f"could not run the model on a ({c}, {', '.join(map(str, size))}) probe to find "
                    f"its output channels: {e}"
                ) from e
        return self._out_channels

    def check_image(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Check an image shape ``(C, *spatial)`` against the model; returns the spatial shape."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.dims + 1:
            raise ValueError(
                f"the network is {self.dims}D and expects an image "
                f"(C, {', '.join('ZYX'[3 - self.dims :])}) with "
                f"{self.dims + 1} axes; got shape {shape}"
            )
        if self.in_channels is not None and shape[0] != self.in_channels:
            raise ValueError(
                f"the network expects {self.in_channels} input channel(s) but the image has {shape[0]} "
                f"(shape {shape}, channels first)"
            )
        return shape[1:]

    # -- public API ---------------------------------------------------------------------------------
    def predict(self, image: ArrayLike) -> np.ndarray:
        """Predict ``image`` ``(C, *spatial)``; returns float32 ``(C_out, *spatial)`` in memory."""
        spatial = self.check_image(image.shape)
        tiling = self.tiling(spatial)
        logger.info("tiled prediction: %s", tiling.describe())
        if self.blend == "gaussian":
            return self._predict_gaussian(image, tiling)
        out = np.empty((self.out_channels, *spatial), dtype=np.float32)

        def sink(block: Block, y: np.ndarray) -> None:
            out[(slice(None), *block.inner)] = y[(slice(None), *block.local)]

        self.run_blocks(image, tiling, tiling, sink)
        return out

    def predict_to(
        self, image: ArrayLike, output: Any, chunks: Sequence[int] | None = None, *, aligned: bool = True
    ) -> Tiling:
        """Predict ``image`` into ``output`` (shape ``(C_out, *spatial)``), block by block.

        ``output`` may be a NumPy array, a Zarr array or a :class:`~tilenorm_bmz.data.io.OutputArray`;
        memory stays bounded by a few tiles. With ``aligned`` (default) each block of a chunked output writes
        whole chunks (its inner region is made of the output's chunks, or of ``chunks`` when given);
        ``aligned=False`` tiles as for an in-memory output and lets blocks write parts of chunks, which is
        safe here because one writer thread writes the blocks one after another (not for concurrent
        writers). Returns the tiling.
        """
        if self.blend != "none":
            raise ValueError("blend='gaussian' needs the whole output in memory: use predict()")
        spatial = self.check_image(image.shape)
        expected = (self.out_channels, *spatial)
        if tuple(output.shape) != expected:
            raise ValueError(f"output has shape {tuple(output.shape)} but the prediction is {expected}")
        if aligned and chunks is None:
            chunks = _output_chunks(output)
        tiling = self.tiling(spatial, chunks if aligned else None)
        logger.info("tiled prediction: %s", tiling.describe())

        def sink(block: Block, y: np.ndarray) -> None:
            output[(slice(None), *block.inner)] = y[(slice(None), *block.local)]

        self.run_blocks(image, tiling, tiling, sink)
        return tiling

    # -- pipeline -----------------------------------------------------------------------------------
    def read_tile(self, image: ArrayLike, block: Block) -> np.ndarray:
        """The network input of ``block``: read, preprocess, zero-pad (float32 ``(C, *tile)``)."""
        x = np.asarray(image[(slice(None), *block.read)], dtype=np.float32)
        if self.preprocess is not None:
            y = np.asarray(self.preprocess(x), dtype=np.float32)
            if y.shape != x.shape:
                raise ValueError(f"preprocess changed the tile shape from {x.shape} to {y.shape}")
            x = y
        if any(after for _, after in block.pad):
            x = np.pad(x, ((0, 0), *block.pad))
        return x

    def run_blocks(
        self,
        image: ArrayLike,
        tiling: Tiling,
        blocks: Iterable[Block],
        sink: Callable[[Block, np.ndarray], None],
        *,
        total: int | None = None,
    ) -> None:
        """Run ``blocks`` of ``tiling`` and call ``sink(block, tile_output)`` for each (in a writer thread).

        ``tile_output`` is the network output for the whole tile ``(C_out, *tile)``; crop it with
        ``block.local``. Reading runs ``prefetch`` batches ahead in a reader thread.
        """
        batches = _batches(blocks, self.batch_size)
        n_total = (
            total if total is not None else (len(blocks) if isinstance(blocks, Sequence | Tiling) else None)
        )
        reader = ThreadPoolExecutor(1, thread_name_prefix="tilenorm-read")
        writer = ThreadPoolExecutor(1, thread_name_prefix="tilenorm-write")
        pending: deque[tuple[list[Block], Future[np.ndarray | torch.Tensor]]] = deque()
        written: deque[Future[None]] = deque()

        pin = self.device.type == "cuda"

        def read(batch: list[Block]) -> np.ndarray | torch.Tensor:
            x = np.stack([self.read_tile(image, b) for b in batch])
            # on CUDA the batch goes to page-locked memory here, in the reader thread, so the copy to the
            # device is asynchronous and overlaps the previous forward
            return torch.from_numpy(x).pin_memory() if pin else x

        def write(batch: list[Block], y: np.ndarray) -> None:
            for b, yb in zip(batch, y, strict=True):
                sink(b, yb)

        def submit_next() -> None:
            batch = next(batches, None)
            if batch is not None:
                pending.append((batch, reader.submit(read, batch)))

        bar = progress_bar(self.progress, n_total, "tiles")
        try:
            with bar as advance:
                for _ in range(self.prefetch):
                    submit_next()
                while pending:
                    batch, fut = pending.popleft()
                    x = fut.result()
                    submit_next()
                    y = self._forward(x)
                    written.append(writer.submit(write, batch, y))
                    while len(written) > self.prefetch or (written and written[0].done()):
                        written.popleft().result()
                    advance(len(batch))
                while written:
                    written.popleft().result()
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=True)

    def _forward(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Network output for a batch of tiles (NumPy, or a pinned tensor); splits the batch on device OOM."""
        if self.prepared is None:
            self.prepared = (
                prepare_for_inference(self.model, self.dims, int(x.shape[1]), self.divisor, self.device)
                if self.optimize
                else Prepared(self.model, layout_of(self.model, self.dims), 0)
            )
        try:
            t = (x if isinstance(x, torch.Tensor) else torch.from_numpy(x)).to(self.device, non_blocking=True)
            ctx = (
                torch.autocast(self.device.type, dtype=self._autocast_dtype)
                if self._autocast_dtype is not None
                else nullcontext()
            )
            with torch.inference_mode(), ctx:
                y = self.prepared.module(t)
            if not isinstance(y, torch.Tensor):
                raise TypeError(
                    f"the model returned {type(y).__name__}, expected one tensor (B, C_out, *spatial)"
                )
            if y.shape[0] != x.shape[0] or tuple(y.shape[2:]) != tuple(x.shape[2:]):
                raise ValueError(
                    f"the model maps {tuple(x.shape)} to {tuple(y.shape)}: tiled prediction needs a network "
                    "that keeps the spatial size ('same' padding)"
                )
            return y.float().cpu().numpy()
        except RuntimeError as e:  # torch's OutOfMemoryError is a RuntimeError
            if not _is_oom(e):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if x.shape[0] > 1:
                h = x.shape[0] // 2
                logger.warning("out of memory with %d tiles per batch; retrying with %d", x.shape[0], h)
                return np.concatenate([self._forward(x[:h]), self._forward(x[h:])])
            raise MemoryError(
                f"a single tile of {tuple(x.shape[2:])} does not fit in {self.device} memory: "
                "use a smaller tile (--tile) or another device"
            ) from None

    def _predict_gaussian(self, image: ArrayLike, tiling: Tiling) -> np.ndarray:
        spatial = tiling.image_shape
        weights = _gaussian_weights(tiling.effective_tile_shape)
        acc: np.ndarray | None = None
        wsum = np.zeros(spatial, dtype=np.float32)

        def sink(block: Block, y: np.ndarray) -> None:
            nonlocal acc
            if acc is None:
                acc = np.zeros((y.shape[0], *spatial), dtype=np.float32)
            crop = tuple(slice(0, r.stop - r.start) for r in block.read)
            acc[(slice(None), *block.read)] += y[(slice(None), *crop)] * weights[crop]
            wsum[block.read] += weights[crop]

        self.run_blocks(image, tiling, tiling, sink)
        assert acc is not None
        return acc / wsum

    # -- pickling (dask workers) ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model"] = _ModelPayload.of(self.model)
        state.pop("device")
        state["prepared"] = None  # prepared again where it runs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        payload = state.pop("model")
        self.__dict__.update(state)
        self.device = resolve_device(self._device_request)
        self._autocast_dtype = _autocast_dtype(self.autocast, self.device)
        self.model = payload.load().to(self.device).eval()

    def __repr__(self) -> str:
        return (
            f"TiledPredictor(tile_shape={self.tile_shape}, halo={self.halo}, divisor={self.divisor}, "
            f"batch_size={self.batch_size}, device={self.device}, blend={self.blend!r})"
        )


class _ModelPayload:
    """A picklable form of a network: TorchScript bytes, architecture + state dict, or the module itself."""

    def __init__(self, kind: str, data: Any) -> None:
        self.kind = kind
        self.data = data

    @classmethod
    def of(cls, model: nn.Module) -> _ModelPayload:
        if isinstance(model, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(model, buf)
            return cls("torchscript", buf.getvalue())
        from ..checkpoint import architecture_of

        spec = architecture_of(model)
        if spec is not None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            return cls("architecture", (spec.model_dump(mode="json"), state))
        return cls("module", model)

    def load(self) -> nn.Module:
        if self.kind == "torchscript":
            return torch.jit.load(io.BytesIO(self.data), map_location="cpu")
        if self.kind == "architecture":
            from ..checkpoint import ArchitectureSpec, build_model

            spec, state = self.data
            # the spec was built in the submitting process already (its trust decision was made there)
            model = build_model(ArchitectureSpec.model_validate(spec), trust_code=True)
            model.load_state_dict(state)
            return model
        return self.data


def forward_whole(
    model: nn.Module,
    image: ArrayLike,
    *,
    divisor: int | Sequence[int] | None = None,
    device: str | torch.device = "auto",
    preprocess: Preprocess | None = None,
    autocast: bool | str | torch.dtype | None = None,
    optimize: bool = True,
) -> np.ndarray:
    """The reference for tiled prediction: one forward pass of the whole image.

    ``image`` ``(C, *spatial)`` is preprocessed, zero-padded once at the end to a multiple of the divisor,
    run through ``model`` in eval mode, and the output cropped back to ``(C_out, *spatial)``.
    ``optimize``: as in :class:`TiledPredictor` (the same rewrites, so the same kernels, as the tiles).
    """
    x = np.asarray(image[...] if not isinstance(image, np.ndarray) else image, dtype=np.float32)
    dims = x.ndim - 1
    div = model_divisor(model, dims, divisor)
    if preprocess is not None:
        x = np.asarray(preprocess(x), dtype=np.float32)
    spatial = x.shape[1:]
    padded = tuple(ceil_to(s, d) for s, d in zip(spatial, div, strict=True))
    if padded != spatial:
        x = np.pad(x, ((0, 0), *((0, p - s) for s, p in zip(spatial, padded, strict=True))))
    dev = resolve_device(device)
    model = model.to(dev).eval()
    if optimize:
        model = prepare_for_inference(model, dims, int(x.shape[0]), div, dev).module
    dtype = _autocast_dtype(autocast, dev)
    ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.inference_mode(), ctx:
        y = model(torch.from_numpy(np.ascontiguousarray(x))[None].to(dev))[0]
    return y.float().cpu().numpy()[(slice(None), *(slice(0, s) for s in spatial))]
