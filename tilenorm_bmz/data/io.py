"""Lazy image and label IO (TIFF, Zarr / OME-Zarr, NumPy) and atomic writers for outputs.

Reading
-------
:func:`open_image` returns an :class:`Image`: a lazy view of a file whose ``shape`` is always
``(C, *spatial)`` (a channel axis of size 1 is added when the file has none) and whose ``[...]`` reads
only the requested region. :func:`open_labels` returns the same class without a channel axis
(``shape == spatial``): an instance label image is one channel by definition.

How axes are found:

* TIFF: tifffile's series axes (ImageJ hyperstacks, OME-TIFF, tifffile's own shaped description).
  ``C`` and ``S`` (samples, e.g. RGB) are channels and move to the front; other singleton axes are
  dropped; of the remaining axes ``Y`` and ``X`` are y, x and one further axis (``Z``, or ``Q``/``I``/``T``
  when the file does not say) is z. Uncompressed contiguous TIFFs are memory-mapped; compressed or tiled
  ones are read through tifffile's Zarr store, page by page / tile by tile.
* OME-Zarr (0.4 and 0.5): the first dataset of the first multiscale (the full resolution, level 0) and the
  axes named in the metadata.
* Plain Zarr arrays (or ``group`` + ``key``): the array's ``dimension_names`` (or xarray's
  ``_ARRAY_DIMENSIONS``) when present.
* ``.npy`` (memory-mapped) and Zarr arrays without axis names: 2 axes are ``yx``, 3 are ``zyx``, 4 are
  ``czyx``. Pass ``axes=`` (e.g. ``"cyx"``) when that guess is wrong.

Writing
-------
:func:`create_output` opens a Zarr array under a temporary name next to the target; writes go there and
:meth:`OutputArray.finalize` renames it into place, so a failed run leaves nothing half-written under the
final name. The object pickles (it re-opens the array by path), so dask workers can write disjoint,
chunk-aligned blocks concurrently. :func:`write_tiff` writes an in-memory array atomically.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import numpy as np

from ..atomic import publish, remove_stale, temp_sibling
from ..errors import TilenormError

__all__ = [
    "IMAGE_SUFFIXES",
    "Image",
    "ImageFormatError",
    "NonFiniteError",
    "OutputArray",
    "as_image",
    "create_output",
    "open_image",
    "open_labels",
    "write_tiff",
]

logger = logging.getLogger(__name__)

#: File suffixes :func:`open_image` reads (``.ome.tif``/``.ome.zarr`` included); Zarr may also be any
#: folder holding ``zarr.json``, ``.zarray`` or ``.zgroup``.
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".zarr", ".npy")
_SUPPORTED_TEXT = "TIFF (.tif, .tiff, .ome.tif), Zarr / OME-Zarr (.zarr folder), NumPy (.npy)"

Index = int | slice
_CHANNEL_LETTERS = "CS"
_SPATIAL_RANK = {"Z": 0, "Y": 1, "X": 2}


class NonFiniteError(TilenormError, ValueError):
    """An image holds NaN or Inf voxels and the command was not told what to do with them."""


class ImageFormatError(TilenormError, ValueError):
    """A file cannot be read as an image: unsupported suffix, unreadable content, or unsupported axes."""


class _ArraySource(Protocol):
    shape: tuple[int, ...]
    dtype: Any

    def __getitem__(self, key: Any) -> Any: ...


# ------------------------------------------------------------------------------------------------------
# axes
# ------------------------------------------------------------------------------------------------------
def _default_axes(ndim: int, path: Any) -> str:
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "ZYX"
    if ndim == 4:
        return "CZYX"
    raise ImageFormatError(
        f"{path}: an array with {ndim} axes has no default axis order (2: yx, 3: zyx, 4: czyx); pass axes=..."
    )


class _AxisMap:
    """How the axes of a stored array map onto the canonical ``(C, *spatial)`` (or ``spatial``) axes.

    ``raw_to_canon[i]`` is the canonical position of stored axis ``i``, or ``None`` when the stored axis is
    a dropped singleton (read with index 0).
    """

    def __init__(self, source_axes: str, shape: tuple[int, ...], *, labels: bool, path: Any) -> None:
        axes = source_axes.upper()
        if len(axes) != len(shape):
            raise ImageFormatError(
                f"{path}: axes {source_axes!r} do not match the array's {len(shape)} dimensions"
            )
        dup = sorted({a for a in axes if axes.count(a) > 1 and a != "Q"})
        if dup:
            raise ImageFormatError(f"{path}: axes {source_axes!r} name {dup} more than once")
        channel = [i for i, a in enumerate(axes) if a in _CHANNEL_LETTERS]
        if len(channel) > 1:
            channel = [i for i in channel if shape[i] > 1] or channel[:1]
        if len(channel) > 1:
            raise ImageFormatError(
                f"{path}: axes {source_axes!r} (shape {shape}) have several channel axes "
                f"({', '.join(axes[i] for i in channel)}); save the image with one channel axis"
            )
        others = [i for i in range(len(axes)) if axes[i] not in _CHANNEL_LETTERS]
        spatial = [i for i in others if axes[i] in "YX" or shape[i] > 1]
        if len(spatial) < 2:  # keep singleton axes rather than drop below 2D (e.g. a 1 x N image)
            spatial = others[-2:]
        if len(spatial) not in (2, 3):
            raise ImageFormatError(
                f"{path}: axes {source_axes!r} (shape {shape}) leave {len(spatial)} non-channel axes "
                f"({''.join(axes[i] for i in spatial)}); tilenorm-bmz reads 2D (yx) or 3D (zyx) images with "
                f"an optional channel axis. Save one time point / one volume per file, or pass axes=..."
            )
        letters = [axes[i] for i in spatial]
        if "Y" not in letters or "X" not in letters:
            # unnamed axes: the last two are y, x
            ranks = {i: r for r, i in enumerate(spatial)}
        else:
            extra = [i for i in spatial if axes[i] not in "YX"]
            if len(extra) > 1:
                raise ImageFormatError(f"{path}: axes {source_axes!r} have more than one axis besides Y, X")
            if extra and axes[extra[0]] == "T":
                logger.warning("%s: treating the time axis T as z (one 3D volume)", path)
            ranks = {i: _SPATIAL_RANK.get(axes[i], 0) for i in spatial}
        spatial_sorted = sorted(spatial, key=lambda i: ranks[i])
        if labels and channel and shape[channel[0]] != 1:
            raise ImageFormatError(
                f"{path}: a label image must have one channel (instance ids), this one has "
                f"{shape[channel[0]]} along {axes[channel[0]]!r}; save each label image separately"
            )
        self.labels = labels
        self.source_axes = source_axes
        self.has_channel = bool(channel) and not labels
        offset = 0 if labels else 1
        self.raw_to_canon: list[int | None] = [None] * len(axes)
        if self.has_channel:
            self.raw_to_canon[channel[0]] = 0
        for k, i in enumerate(spatial_sorted):
            self.raw_to_canon[i] = offset + k
        spatial_names = "zyx"[3 - len(spatial_sorted) :]
        self.axes = spatial_names if labels else "c" + spatial_names
        nch = shape[channel[0]] if self.has_channel else 1
        spatial_shape = tuple(shape[i] for i in spatial_sorted)
        self.shape: tuple[int, ...] = spatial_shape if labels else (nch, *spatial_shape)


def _normalize_key(key: Any, shape: tuple[int, ...]) -> list[Index]:
    """Expand ``key`` (ints, slices, one Ellipsis) to one int or slice per axis, bounds-checked."""
    if not isinstance(key, tuple):
        key = (key,)
    ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        i = ellipses[0]
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices: {len(key)} for an image with {len(shape)} axes {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    out: list[Index] = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step < 1:
                raise IndexError("image regions are read with positive steps only; flip the result instead")
            out.append(slice(start, max(start, stop), step))
        elif isinstance(k, int | np.integer):
            k = int(k)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            out.append(k % n)
        else:
            raise IndexError(
                f"images support integer and slice indexing only (got {type(k).__name__}); "
                f"read a region first"
            )
    return out


# ------------------------------------------------------------------------------------------------------
# Image
# ------------------------------------------------------------------------------------------------------
class Image:
    """A lazily read image (``shape == (C, *spatial)``) or label image (``shape == spatial``).

    Indexing with ints and positive-step slices (``img[:, 10:74, 0:64, 0:64]``) reads only that region and
    returns a new ``numpy.ndarray`` the caller owns, in canonical axis order. :meth:`read` reads it all.
    ``np.asarray(img)`` works too. Images pickle by path (the file is re-opened on first access), so they
    can be handed to dask tasks or data-loader workers; in-memory images pickle their array.

    Attributes
    ----------
    path
        The file, or ``None`` for an in-memory array.
    axes
        Canonical axis names, ``"czyx"``/``"cyx"`` for images, ``"zyx"``/``"yx"`` for labels.
    source_axes
        The axes as stored (``"ZCYX"``, ``"QYX"``, ...).
    chunks
        The storage chunk shape in canonical order when the file is chunked (Zarr, compressed TIFF), or None.
    """

    def __init__(
        self,
        source: _ArraySource | None,
        axis_map: _AxisMap,
        *,
        path: Path | None = None,
        opener: Callable[[], tuple[_ArraySource, Callable[[], None] | None]] | None = None,
        closer: Callable[[], None] | None = None,
        raw_shape: tuple[int, ...] | None = None,
        dtype: np.dtype | None = None,
    ) -> None:
        self._source = source
        self._map = axis_map
        self._opener = opener
        self._closer = closer
        self.path = path
        if source is not None:
            raw_shape = tuple(source.shape) if raw_shape is None else raw_shape
            dtype = source.dtype if dtype is None else dtype
        if raw_shape is None or dtype is None:
            raise ValueError("an Image without an open source needs raw_shape and dtype")
        self._raw_shape = tuple(raw_shape)
        self.dtype = np.dtype(dtype)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_array(cls, array: Any, axes: str | None = None, *, labels: bool = False) -> Image:
        """Wrap an array: a NumPy array, or a lazy array-like (``zarr.Array``, ``dask.array.Array``: anything
        with ``shape``, ``dtype`` and slicing), which stays lazy. ``axes`` as in :func:`open_image` (default
        by the number of dimensions)."""
        if not _is_array_like(array):
            array = np.asarray(array)
        shape = tuple(int(s) for s in array.shape)
        if axes is None:
            axes = _default_axes(len(shape), "array")
        return cls(
            array, _AxisMap(axes, shape, labels=labels, path="array"), raw_shape=shape, dtype=array.dtype
        )

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._map.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def axes(self) -> str:
        return self._map.axes

    @property
    def source_axes(self) -> str:
        return self._map.source_axes

    @property
    def is_labels(self) -> bool:
        return self._map.labels

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape if self.is_labels else self.shape[1:]

    @property
    def spatial_ndim(self) -> int:
        return len(self.spatial_shape)

    @property
    def n_channels(self) -> int:
        """Number of channels (1 for label images)."""
        return 1 if self.is_labels else self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """Storage chunks in canonical order (Zarr, compressed TIFF pages/tiles), or None (memmap, array)."""
        raw = getattr(self._get_source(), "chunks", None)
        if raw is None or len(raw) != len(self._raw_shape):
            return None
        out = list(self.shape)
        for i, c in enumerate(self._map.raw_to_canon):
            if c is not None:
                out[c] = int(raw[i])
        return tuple(out)

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        kind = "labels" if self.is_labels else "image"
        return f"Image({kind}, shape={self.shape}, axes={self.axes!r}, dtype={self.dtype}, {where})"

    def __len__(self) -> int:
        return self.shape[0]

    # -- reading --------------------------------------------------------------------------------------
    def _get_source(self) -> _ArraySource:
        if self._source is None:
            if self._opener is None:
                raise ValueError("this image was closed and cannot be re-opened")
            self._source, self._closer = self._opener()
        return self._source

    def __getitem__(self, key: Any) -> np.ndarray:
        canon = _normalize_key(key, self.shape)
        # read ints as length-1 slices and drop those axes at the end
        as_slices = [k if isinstance(k, slice) else slice(k, k + 1) for k in canon]
        raw_key: list[Index] = []
        kept: list[int] = []
        for c in self._map.raw_to_canon:
            if c is None:
                raw_key.append(0)
            else:
                raw_key.append(as_slices[c])
                kept.append(c)
        src = self._get_source()
        # numpy sources (arrays, memmaps) return views, which are copied below; Zarr returns new arrays
        fresh = not isinstance(src, np.ndarray)
        data = np.asarray(src[tuple(raw_key)])
        data = np.transpose(data, np.argsort(kept)) if kept != sorted(kept) else data
        if not self.is_labels and not self._map.has_channel:
            data = data[None][as_slices[0]]
        ints = tuple(0 if isinstance(k, int) else slice(None) for k in canon)
        out = data[ints]
        if not fresh or not out.flags.writeable:  # a new array the caller owns
            out = np.array(out)
        if self.is_labels and out.dtype.kind == "f":
            out = _float_labels_to_int(out, self.path)
        elif out.dtype.kind in "fc" and self.nonfinite != "allow":
            out = self._finite(out, canon)
        return out

    #: What a read does with NaN/Inf voxels: ``"allow"`` (returned as stored), ``"error"`` (raise
    #: :class:`NonFiniteError` with their count and the first position), or a number that replaces them.
    nonfinite: Literal["allow", "error"] | float = "allow"

    def with_nonfinite(self, policy: Literal["allow", "error"] | float) -> Image:
        """The same image whose reads apply ``policy`` to NaN/Inf voxels (see :attr:`nonfinite`)."""
        import copy

        other = copy.copy(self)
        other.nonfinite = policy
        return other

    def _finite(self, out: np.ndarray, canon: list[Index]) -> np.ndarray:
        bad = ~np.isfinite(out)
        if not bad.any():
            return out
        if self.nonfinite == "error":
            starts = [k if isinstance(k, int) else k.start for k in canon]
            steps = [1 if isinstance(k, int) else k.step for k in canon]
            local = np.unravel_index(int(np.argmax(bad.reshape(-1))), bad.shape)
            local_full = iter(local)
            first = tuple(int(s + st * next(local_full)) if not isinstance(k, int) else int(k)
                          for s, st, k in zip(starts, steps, canon, strict=True))
            where = "the image" if all(isinstance(k, slice) and k.start == 0 and k.stop == n
                                       for k, n in zip(canon, self.shape, strict=True)) else "the region read"
            raise NonFiniteError(
                f"{self.path or 'the input'} has {int(bad.sum())} NaN/Inf voxel(s) in {where}, the first at "
                f"({', '.join(map(str, first))}) in {self.axes} order: repair the image, or replace them with "
                "--fill-nonfinite VALUE"
            )
        return np.where(bad, np.asarray(self.nonfinite, dtype=out.dtype), out)

    def read(self) -> np.ndarray:
        """The whole image as an in-memory array (``shape == self.shape``)."""
        return self[...]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the open file (it is re-opened on the next read)."""
        if self._closer is not None:
            self._closer()
            self._closer = None
        if self._opener is not None:
            self._source = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._opener is not None:  # file-backed: re-open by path in the other process
            state["_source"] = None
            state["_closer"] = None
        return state


def _is_array_like(x: Any) -> bool:
    return all(hasattr(x, a) for a in ("shape", "dtype", "__getitem__")) and not isinstance(x, str | bytes)


def _float_labels_to_int(a: np.ndarray, path: Any) -> np.ndarray:
    r = np.rint(a)
    if not np.array_equal(r, a) or (a.size and a.min() < 0):
        raise ImageFormatError(
            f"{path}: label images hold non-negative integer instance ids; this one has non-integer or "
            f"negative values. Convert it to an integer label image"
        )
    return r.astype(np.uint32 if (not a.size or a.max() < 2**32) else np.uint64)


# ------------------------------------------------------------------------------------------------------
# format-specific openers
# ------------------------------------------------------------------------------------------------------
def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("zarr.json", ".zarray", ".zgroup"))


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".zarr") or _is_zarr_dir(path):
        return "zarr"
    raise ImageFormatError(
        f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; supported: {_SUPPORTED_TEXT}"
    )


def _tiff_info(path: Path, series: int) -> tuple[str, tuple[int, ...], np.dtype, bool]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise ImageFormatError(f"{path}: the TIFF file holds no image series")
            if not 0 <= series < len(tf.series):
                raise ImageFormatError(
                    f"{path}: series {series} requested but the file has {len(tf.series)} (use key=0..)"
                )
            s = tf.series[series]
            return s.axes, tuple(s.shape), np.dtype(s.dtype), s.dataoffset is not None
    except ImageFormatError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as e:
        raise ImageFormatError(f"{path}: cannot read it as TIFF ({type(e).__name__}: {e})") from e


def _open_tiff(path: Path, series: int, contiguous: bool) -> tuple[_ArraySource, Callable[[], None] | None]:
    import tifffile

    if contiguous:
        try:
            return tifffile.memmap(path, mode="r", series=series), None
        except ValueError:
            pass  # not memory-mappable after all (e.g. non-native byte order): read through Zarr
    import zarr

    store = tifffile.imread(path, aszarr=True, series=series, level=0)
    arr = zarr.open(store, mode="r")
    return arr, store.close


def _ome_multiscale(attrs: dict[str, Any]) -> dict[str, Any] | None:
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], dict):
        return ms[0]
    return None


def _ome_axes(ms: dict[str, Any]) -> str | None:
    axes = ms.get("axes")
    if not isinstance(axes, list):
        return None
    out = []
    for a in axes:
        if isinstance(a, str):
            name, typ = a, None
        else:
            name, typ = a.get("name", ""), a.get("type")
        if typ == "channel" or name.lower() == "c":
            out.append("C")
        elif typ == "time" or name.lower() == "t":
            out.append("T")
        else:
            out.append(name.upper()[:1] or "Q")
    return "".join(out)


def _zarr_axes(arr: Any) -> str | None:
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    if not names:
        names = dict(arr.attrs).get("_ARRAY_DIMENSIONS")
    if names and all(isinstance(n, str) and n for n in names):
        return "".join(n.upper()[0] if n.lower() not in ("channel", "channels") else "C" for n in names)
    return None


def _resolve_zarr(path: Path, key: str | None) -> tuple[Any, str | None]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # zarr raises several types for a folder that is not a Zarr store
        raise ImageFormatError(f"{path}: cannot open it as Zarr ({type(e).__name__}: {e})") from e
    if isinstance(node, zarr.Array):
        if key:
            raise ImageFormatError(f"{path} is a Zarr array; key={key!r} only applies to groups")
        return node, _zarr_axes(node)
    ms = _ome_multiscale(dict(node.attrs))
    if key:
        try:
            arr = node[key]
        except KeyError:
            raise ImageFormatError(
                f"{path}: the group has no array {key!r}; it has {sorted(node.array_keys())}"
            ) from None
        ms_axes = _ome_axes(ms) if ms is not None else None
        return arr, _zarr_axes(arr) or ms_axes
    if ms is not None:
        datasets = ms.get("datasets") or []
        if not datasets or "path" not in datasets[0]:
            raise ImageFormatError(f"{path}: OME-Zarr multiscales metadata lists no datasets")
        level0 = datasets[0]["path"]
        return node[level0], _ome_axes(ms) or _zarr_axes(node[level0])
    arrays = sorted(node.array_keys())
    if len(arrays) == 1:
        return node[arrays[0]], _zarr_axes(node[arrays[0]])
    raise ImageFormatError(
        f"{path} is a Zarr group without OME-Zarr multiscales metadata and with {len(arrays)} arrays "
        f"{arrays[:10]}; choose one with key=NAME (or the path {path}/NAME)"
    )


def _open_npy(path: Path) -> tuple[_ArraySource, None]:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    except (ValueError, OSError) as e:
        raise ImageFormatError(f"{path}: cannot read it as a .npy array ({e})") from e


def _open_zarr(path: Path, key: str | None) -> tuple[_ArraySource, None]:
    return _resolve_zarr(path, key)[0], None


def _open(path: str | os.PathLike[str], *, key: str | int | None, axes: str | None, labels: bool) -> Image:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    fmt = _format_of(path)
    if fmt == "tiff":
        series = int(key) if key is not None else 0
        src_axes, shape, dtype, contiguous = _tiff_info(path, series)
        amap = _AxisMap(axes or src_axes, shape, labels=labels, path=path)
        img = Image(
            None,
            amap,
            path=path,
            opener=functools.partial(_open_tiff, path, series, contiguous),
            raw_shape=shape,
            dtype=dtype,
        )
    elif fmt == "npy":
        open_npy = functools.partial(_open_npy, path)
        arr, _ = open_npy()
        if arr.dtype.kind not in "biuf":
            raise ImageFormatError(
                f"{path}: dtype {arr.dtype} is not an image type (need bool, int or float)"
            )
        amap = _AxisMap(axes or _default_axes(arr.ndim, path), arr.shape, labels=labels, path=path)
        img = Image(arr, amap, path=path, opener=open_npy)
    else:
        arr, found_axes = _resolve_zarr(path, None if key is None else str(key))
        shape = tuple(arr.shape)
        amap = _AxisMap(
            axes or found_axes or _default_axes(len(shape), path), shape, labels=labels, path=path
        )
        img = Image(
            arr,
            amap,
            path=path,
            opener=functools.partial(_open_zarr, path, None if key is None else str(key)),
        )
    if labels and img.dtype.kind not in "buif":
        raise ImageFormatError(f"{path}: label images need an integer dtype, got {img.dtype}")
    if labels and img.dtype.kind == "f":
        logger.warning("%s: float label image; ids are checked to be integers and cast when read", path)
    return img


def open_image(
    path: str | os.PathLike[str], *, key: str | int | None = None, axes: str | None = None
) -> Image:
    """Open an image lazily; ``shape`` is ``(C, *spatial)``.

    Parameters
    ----------
    path
        ``.tif``/``.tiff`` (also OME-TIFF, ImageJ), ``.zarr`` (array, group, OME-Zarr), or ``.npy``.
    key
        TIFF: the series index (default 0). Zarr group: the array inside it (default: level 0 of the
        OME-Zarr multiscale, or the group's only array).
    axes
        The stored axes (e.g. ``"cyx"``, ``"zcyx"``) when the file does not record them or records them
        wrongly; letters ``c`` (or ``s``), ``z``, ``y``, ``x``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ImageFormatError
        Unsupported suffix (the message lists the supported ones), unreadable content, or axes that are
        not 2D/3D with an optional channel axis.
    """
    return _open(path, key=key, axes=axes, labels=False)


def open_labels(
    path: str | os.PathLike[str], *, key: str | int | None = None, axes: str | None = None
) -> Image:
    """Open an instance label image lazily; ``shape`` is ``spatial`` (no channel axis).

    A stored channel axis of size 1 is dropped; more channels are an error. Float label images (as
    some tools write them) are accepted when every value is a non-negative integer; they are cast to
    ``uint32`` when read. Parameters as in :func:`open_image`.
    """
    return _open(path, key=key, axes=axes, labels=True)


def as_image(
    x: Image | np.ndarray | Any | str | os.PathLike[str], *, labels: bool = False, axes: str | None = None
) -> Image:
    """An :class:`Image` from an Image (returned as is), a path, or an array (``(C, *spatial)`` for images
    unless ``axes`` says otherwise; ``spatial`` for labels). Lazy arrays (Zarr, dask) stay lazy."""
    if isinstance(x, Image):
        if x.is_labels != labels:
            raise ValueError(f"expected {'a label image' if labels else 'an image'}, got {x!r}")
        return x
    if isinstance(x, str | os.PathLike):
        return open_labels(x, axes=axes) if labels else open_image(x, axes=axes)
    a = x if _is_array_like(x) else np.asarray(x)
    if axes is None:
        if labels:
            axes = "yx" if len(a.shape) == 2 else "zyx" if len(a.shape) == 3 else None
        else:
            axes = "cyx" if len(a.shape) == 3 else "czyx" if len(a.shape) == 4 else None
        if axes is None:
            raise ValueError(
                f"an in-memory {'label image' if labels else 'image'} must be "
                f"{'(y, x) or (z, y, x)' if labels else '(C, y, x) or (C, z, y, x)'}; got shape {a.shape}"
            )
    return Image.from_array(a, axes, labels=labels)


# ------------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------------
def _zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def _sibling_tmp(path: Path, tag: str) -> Path:
    remove_stale(path)
    return temp_sibling(path, f".{tag}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


class OutputArray:
    """A Zarr array being written under a temporary name; :meth:`finalize` moves it to ``path``.

    Write with ``out[slices] = block`` (any region; with ``check_alignment=True`` only whole chunks,
    which is what concurrent writers need: two writers must never share a chunk). Use it as a context
    manager to finalize on success and remove the temporary array on an exception, or call
    :meth:`finalize` / :meth:`abort` yourself. It pickles by path, so dask tasks can write into it.
    """

    def __init__(
        self,
        path: Path,
        tmp_path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        *,
        overwrite: bool,
        check_alignment: bool,
        axes: str | None,
    ) -> None:
        self.path = path
        self.tmp_path = tmp_path
        self.shape = shape
        self.dtype = dtype
        self.chunks = chunks
        self.overwrite = overwrite
        self.check_alignment = check_alignment
        self.axes = axes
        self.finalized = False
        self._array: Any = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _arr(self) -> Any:
        if self._array is None:
            import zarr

            if not self.tmp_path.exists():
                raise ValueError(f"output {self.path} was already finalized or aborted; it cannot be written")
            self._array = zarr.open_array(str(self.tmp_path), mode="r+")
        return self._array

    def is_aligned(self, key: Any) -> bool:
        """Whether the region ``key`` covers whole chunks only (the array's end counts as a chunk edge)."""
        canon = _normalize_key(key, self.shape)
        for k, n, c in zip(canon, self.shape, self.chunks, strict=True):
            if isinstance(k, int):
                k = slice(k, k + 1)
            if k.step != 1 or k.start % c or (k.stop % c and k.stop != n):
                return False
        return True

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.check_alignment and not self.is_aligned(key):
            raise ValueError(
                f"write to {key} is not aligned with the output chunks {self.chunks}: concurrent "
                f"writers could corrupt shared chunks. Make blocks multiples of the chunk shape (or create "
                f"the output with chunks equal to the block shape)"
            )
        self._arr()[key] = np.asarray(value, dtype=self.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._arr()[key])

    def finalize(self) -> Path:
        """Move the finished array to ``path`` (replacing an existing one only if ``overwrite``)."""
        if self.finalized:
            return self.path
        if not self.tmp_path.exists():
            raise ValueError(f"output {self.path} was aborted; nothing to finalize")
        self._array = None
        old = None
        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                raise FileExistsError(
                    f"{self.path} appeared while writing; pass overwrite=True to replace it"
                )
            old = _sibling_tmp(self.path, "old")
            os.replace(self.path, old)
        try:
            publish(self.tmp_path, self.path)
        except BaseException:
            if old is not None:
                os.replace(old, self.path)
            raise
        if old is not None:
            _remove(old)
        self.finalized = True
        logger.info("wrote %s", self.path)
        return self.path

    def abort(self) -> None:
        """Delete the temporary array (the final ``path`` is left untouched)."""
        self._array = None
        _remove(self.tmp_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __repr__(self) -> str:
        return f"OutputArray({self.path}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"


def create_output(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    dtype: Any = np.float32,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    *,
    axes: str | None = None,
    fill_value: float = 0,
    check_alignment: bool = False,
) -> OutputArray:
    """Create a Zarr array to be written block by block and renamed into place when finished.

    Parameters
    ----------
    path
        Final location (a ``.zarr`` folder). Nothing appears there until :meth:`OutputArray.finalize`.
    shape, dtype
        Of the whole output, e.g. ``(C, Z, Y, X)`` float32.
    chunks
        Storage chunks; for out-of-core and concurrent writing make them equal to (a divisor of) the
        block shape. Default: the whole array along leading axes up to 64 per spatial axis (3D) / 256 (2D).
    overwrite
        Replace an existing ``path`` on finalize; otherwise an existing path is an error now.
    axes
        Axis names stored as the array's ``dimension_names`` (e.g. ``"czyx"``), so :func:`open_image`
        reads it back with the right axes.
    check_alignment
        Refuse writes that are not chunk-aligned (use with concurrent writers).

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    import zarr

    path = Path(path)
    shape = tuple(int(s) for s in shape)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; choose another output or pass overwrite=True (CLI: --overwrite)"
        )
    if axes is not None and len(axes) != len(shape):
        raise ValueError(f"axes {axes!r} do not match shape {shape}")
    if chunks is None:
        spatial_default = 64 if len(shape) >= 4 or (axes and "z" in axes.lower()) else 256
        chunks = tuple(
            1 if i == 0 and len(shape) > 2 else min(s, spatial_default) for i, s in enumerate(shape)
        )
    chunks = tuple(max(1, min(int(c), s if s > 0 else 1)) for c, s in zip(chunks, shape, strict=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_tmp(path, "tmp")
    kwargs: dict[str, Any] = {
        "shape": shape,
        "chunks": chunks,
        "dtype": np.dtype(dtype),
        "fill_value": fill_value,
    }
    if axes is not None and _zarr_major() >= 3:
        kwargs["dimension_names"] = list(axes.lower())
    try:
        arr = zarr.open_array(str(tmp), mode="w", **kwargs)
        if axes is not None and _zarr_major() < 3:
            arr.attrs["_ARRAY_DIMENSIONS"] = list(axes.lower())
    except BaseException:
        _remove(tmp)
        raise
    out = OutputArray(
        path,
        tmp,
        shape,
        np.dtype(dtype),
        chunks,
        overwrite=overwrite,
        check_alignment=check_alignment,
        axes=axes,
    )
    out._array = arr
    return out


def write_tiff(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    axes: str | None = None,
    overwrite: bool = False,
    compression: str | None = "zlib",
) -> Path:
    """Write ``array`` to a TIFF file atomically (temporary file in the same folder + rename).

    ``axes`` (e.g. ``"czyx"``) is recorded in tifffile's shaped description so that :func:`open_image`
    reads the file back with the same axes. ``compression`` is ``"zlib"`` (lossless, no extra package) or
    ``None``; uncompressed files are memory-mapped when read.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    import tifffile

    path = Path(path)
    array = np.asarray(array)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; choose another output or pass overwrite=True (CLI: --overwrite)"
        )
    if axes is not None and len(axes) != array.ndim:
        raise ValueError(f"axes {axes!r} do not match an array with {array.ndim} dimensions {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_tmp(path, "tmp")
    metadata: dict[str, Any] = {"axes": axes.upper()} if axes else {}
    try:
        tifffile.imwrite(
            tmp,
            array,
            metadata=metadata,
            compression=compression,
            photometric="minisblack",
            bigtiff=array.nbytes > 2**31,
        )
        publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path
