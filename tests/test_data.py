"""tilenorm_bmz.data: IO, normalization, targets, sampler, synthetic data, embedded samples, DataConfig."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from pydantic import ValidationError
from scipy import ndimage as ndi

from tilenorm_bmz.config import DataConfig, InputNormalization
from tilenorm_bmz.data import (
    Image,
    ImageFormatError,
    SamplerSource,
    TileSampler,
    build_training_data,
    clean_labels,
    create_output,
    fill_label_holes,
    fit_normalization,
    instances_to_targets,
    list_samples,
    load_sample,
    open_image,
    open_labels,
    sample_path,
    split_by_image,
    split_by_region,
    synthetic_blobs,
    write_tiff,
)


def _volume(shape=(2, 6, 20, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, size=shape, dtype=np.uint16)


REGION = (slice(None), slice(1, 5), slice(3, 17, 2), slice(5, 24))


# ------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_with_channel_axis(tmp_path: Path, compression):
    a = _volume()
    p = tmp_path / "czyx.tif"
    tifffile.imwrite(p, a, metadata={"axes": "CZYX"}, compression=compression)
    img = open_image(p)
    assert img.shape == a.shape and img.axes == "czyx" and img.dtype == np.uint16
    assert img.spatial_shape == a.shape[1:] and img.ndim == 4 and img.path == p
    np.testing.assert_array_equal(img.read(), a)
    np.testing.assert_array_equal(img[REGION], a[REGION])
    np.testing.assert_array_equal(img[1, 2], a[1, 2])
    np.testing.assert_array_equal(img[..., -3], a[..., -3])


def test_tiff_memmap_vs_zarr_path(tmp_path: Path):
    """Uncompressed TIFFs are memory-mapped, compressed ones read lazily through Zarr; same values."""
    a = _volume((1, 5, 16, 16))[0]
    tifffile.imwrite(tmp_path / "raw.tif", a)
    tifffile.imwrite(tmp_path / "z.tif", a, compression="zlib")
    raw, comp = open_image(tmp_path / "raw.tif"), open_image(tmp_path / "z.tif")
    raw[0, 0, 0, 0]
    comp[0, 0, 0, 0]
    assert isinstance(raw._source, np.memmap)
    assert isinstance(comp._source, zarr.Array)
    for img in (raw, comp):
        assert img.shape == (1, 5, 16, 16) and img.axes == "czyx"
        np.testing.assert_array_equal(img[0, 1:4, 2:9, 7], a[1:4, 2:9, 7])
        img.close()


def test_tiff_without_channel_axis_and_imagej_order(tmp_path: Path):
    a2 = _volume((30, 40))
    tifffile.imwrite(tmp_path / "yx.tif", a2)
    img = open_image(tmp_path / "yx.tif")
    assert img.shape == (1, 30, 40) and img.axes == "cyx"
    np.testing.assert_array_equal(img.read()[0], a2)
    np.testing.assert_array_equal(img[0, 5:9, 1:3], a2[5:9, 1:3])

    zcyx = _volume((4, 3, 10, 12))
    tifffile.imwrite(tmp_path / "ij.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
    img = open_image(tmp_path / "ij.tif")
    assert img.shape == (3, 4, 10, 12) and img.axes == "czyx" and img.source_axes == "ZCYX"
    expected = zcyx.transpose(1, 0, 2, 3)
    np.testing.assert_array_equal(img.read(), expected)
    np.testing.assert_array_equal(img[2, 1:3, :, 4:9], expected[2, 1:3, :, 4:9])

    rgb = np.random.default_rng(1).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    img = open_image(tmp_path / "rgb.tif")
    assert img.shape == (3, 8, 9)
    np.testing.assert_array_equal(img.read(), rgb.transpose(2, 0, 1))


def test_zarr_array_group_and_axes(tmp_path: Path):
    a = _volume()
    arr = zarr.open_array(
        str(tmp_path / "plain.zarr"), mode="w", shape=a.shape[1:], chunks=(2, 8, 8), dtype=a.dtype
    )
    arr[:] = a[0]
    img = open_image(tmp_path / "plain.zarr")  # no axis names: 3 axes are z, y, x
    assert img.shape == (1, *a.shape[1:]) and img.chunks == (1, 2, 8, 8)
    np.testing.assert_array_equal(img[REGION], a[:1][REGION])

    g = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    g.create_array("raw", shape=a.shape, chunks=(1, 3, 10, 10), dtype=a.dtype)
    g.create_array("other", shape=(3, 3), dtype="uint8")
    g["raw"][:] = a
    with pytest.raises(ImageFormatError, match="key=NAME"):
        open_image(tmp_path / "group.zarr")
    img = open_image(tmp_path / "group.zarr", key="raw")
    assert img.shape == a.shape
    np.testing.assert_array_equal(img[REGION], a[REGION])
    with pytest.raises(ImageFormatError, match="no array 'nope'"):
        open_image(tmp_path / "group.zarr", key="nope")


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reads_level_0(tmp_path: Path, version):
    a = _volume((2, 4, 16, 16))
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=fmt)
    g.create_array("s0", shape=a.shape, chunks=(1, 2, 8, 8), dtype=a.dtype)[:] = a
    g.create_array("s1", shape=(2, 4, 8, 8), dtype=a.dtype)[:] = a[..., ::2, ::2]
    ms = {
        "axes": [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "s0"}, {"path": "s1"}],
    }
    if version == "0.4":
        g.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    img = open_image(tmp_path / "img.ome.zarr")
    assert img.shape == a.shape and img.axes == "czyx"
    np.testing.assert_array_equal(img.read(), a)
    np.testing.assert_array_equal(img[REGION], a[REGION])


def test_npy_memmap_and_axes_override(tmp_path: Path):
    a = _volume((3, 20, 24))
    np.save(tmp_path / "a.npy", a)
    img = open_image(tmp_path / "a.npy")  # default: 3 axes are z, y, x
    assert img.shape == (1, 3, 20, 24)
    img = open_image(tmp_path / "a.npy", axes="cyx")
    assert img.shape == (3, 20, 24) and img.axes == "cyx"
    assert isinstance(img._source, np.memmap)
    out = img[1, 2:7, 3:9]
    np.testing.assert_array_equal(out, a[1, 2:7, 3:9])
    out[:] = 0  # the caller owns the result: the file is untouched
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)


def test_image_pickles_by_path(tmp_path: Path):
    a = _volume((1, 4, 8, 8))
    tifffile.imwrite(tmp_path / "a.tif", a[0], compression="zlib", photometric="minisblack")
    img = open_image(tmp_path / "a.tif")
    img[0, 0]
    clone = pickle.loads(pickle.dumps(img))
    assert clone._source is None  # re-opened on demand in the other process
    np.testing.assert_array_equal(clone[0, 1:3], a[0, 1:3])


def test_open_labels(tmp_path: Path):
    lab = np.zeros((1, 5, 6), np.uint16)
    lab[0, 1:3, 1:4] = 7
    tifffile.imwrite(tmp_path / "l.tif", lab, metadata={"axes": "CYX"})
    labels = open_labels(tmp_path / "l.tif")
    assert labels.shape == (5, 6) and labels.axes == "yx" and labels.is_labels
    np.testing.assert_array_equal(labels.read(), lab[0])

    tifffile.imwrite(tmp_path / "f.tif", lab[0].astype(np.float32))
    assert open_labels(tmp_path / "f.tif").read().dtype.kind == "u"
    tifffile.imwrite(tmp_path / "bad.tif", lab[0].astype(np.float32) + 0.5)
    with pytest.raises(ImageFormatError, match="integer"):
        open_labels(tmp_path / "bad.tif").read()
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 5, 6), np.uint16), metadata={"axes": "CYX"})
    with pytest.raises(ImageFormatError, match="one channel"):
        open_labels(tmp_path / "two.tif")


def test_bad_files_get_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image(tmp_path / "missing.tif")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(ImageFormatError, match=r"unsupported file type '\.png'.*TIFF.*Zarr.*\.npy"):
        open_image(tmp_path / "img.png")
    (tmp_path / "broken.tif").write_bytes(b"this is not a tiff file at all")
    with pytest.raises(ImageFormatError, match="cannot read it as TIFF"):
        open_image(tmp_path / "broken.tif")
    (tmp_path / "broken.npy").write_bytes(b"garbage")
    with pytest.raises(ImageFormatError, match=r"\.npy"):
        open_image(tmp_path / "broken.npy")
    tifffile.imwrite(
        tmp_path / "tzyx.tif",
        np.zeros((2, 3, 4, 5), np.uint8),
        metadata={"axes": "TZYX"},
        photometric="minisblack",
    )
    with pytest.raises(ImageFormatError, match=r"2D .* or 3D"):
        open_image(tmp_path / "tzyx.tif")
    img = open_image(tmp_path / "tzyx.tif", axes="czyx")  # the override says what the axes are
    assert img.shape == (2, 3, 4, 5)
    with pytest.raises(IndexError, match="out of bounds"):
        img[0, 5]


# ------------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------------
def test_create_output_is_atomic_and_readable(tmp_path: Path):
    path = tmp_path / "pred.zarr"
    data = np.random.default_rng(0).random((2, 8, 12), dtype=np.float32)
    with create_output(path, data.shape, np.float32, chunks=(2, 4, 4), axes="cyx") as out:
        for y in range(0, 8, 4):
            for x in range(0, 12, 4):
                out[:, y : y + 4, x : x + 4] = data[:, y : y + 4, x : x + 4]
        assert not path.exists()  # nothing under the final name until finalize
    assert path.exists() and not list(tmp_path.glob(".*tmp"))
    img = open_image(path)
    assert img.axes == "cyx"
    np.testing.assert_array_equal(img.read(), data)

    with pytest.raises(FileExistsError, match="overwrite"):
        create_output(path, data.shape)
    with (
        pytest.raises(RuntimeError, match="boom"),
        create_output(path, data.shape, np.float32, overwrite=True) as out,
    ):
        out[:, :4, :4] = 1
        raise RuntimeError("boom")
    np.testing.assert_array_equal(open_image(path).read(), data)  # the old output is untouched
    assert not list(tmp_path.glob(".*tmp"))


def test_create_output_concurrent_chunk_writers(tmp_path: Path):
    data = np.arange(16 * 20, dtype=np.int32).reshape(1, 16, 20)
    out = create_output(tmp_path / "o.zarr", data.shape, np.int32, chunks=(1, 8, 10), check_alignment=True)
    assert out.is_aligned((slice(None), slice(8, 16), slice(10, 20)))
    with pytest.raises(ValueError, match="not aligned"):
        out[:, 0:5, 0:10] = 0
    blocks = [(slice(None), slice(y, y + 8), slice(x, x + 10)) for y in (0, 8) for x in (0, 10)]

    def work(sl):  # what a dask task does: a pickled copy writes one block
        worker = pickle.loads(pickle.dumps(out))
        worker[sl] = data[sl]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, blocks))
    np.testing.assert_array_equal(open_image(out.finalize()).read(), data)


def test_write_tiff_atomic_roundtrip(tmp_path: Path):
    a = _volume((2, 3, 8, 9))
    p = write_tiff(tmp_path / "out.tif", a, axes="czyx")
    img = open_image(p)
    assert img.shape == a.shape and img.axes == "czyx"
    np.testing.assert_array_equal(img.read(), a)
    with pytest.raises(FileExistsError):
        write_tiff(p, a)
    write_tiff(p, a[:1], axes="czyx", overwrite=True)
    assert open_image(p).shape == (1, 3, 8, 9)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.tif"]


# ------------------------------------------------------------------------------------------------------
# normalization
# ------------------------------------------------------------------------------------------------------
def test_global_normalization_values():
    x = np.stack([np.arange(1000.0).reshape(10, 100), 5.0 * np.arange(1000.0).reshape(10, 100) + 7])
    fitted = fit_normalization(InputNormalization(), x)
    # numpy linear quantiles of 0..999: q * 999
    np.testing.assert_allclose(fitted.lo, [9.99, 5 * 9.99 + 7])
    np.testing.assert_allclose(fitted.hi, [979.02, 5 * 979.02 + 7])
    for c in range(2):
        lo, hi = np.quantile(x[c], [0.01, 0.98], method="linear")
        assert fitted.lo[c] == lo and fitted.hi[c] == hi
    y = fitted.apply(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    expected = np.clip((x[0] - 9.99) / (979.02 - 9.99 + 1e-6), 0, 1)
    np.testing.assert_allclose(y[0], expected, atol=1e-6)
    np.testing.assert_allclose(y[1], expected, atol=1e-6)  # a linear rescale of a channel changes nothing
    assert y.min() == 0.0 and y.max() == 1.0
    unclipped = fit_normalization(InputNormalization(clip=False), x).apply(x)
    assert unclipped.min() < 0 and unclipped.max() > 1
    with pytest.raises(ValueError, match="2 channel"):
        fitted.apply(x[:1])


def test_tilewise_fixed_and_sampled_normalization():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 100.0, size=(1, 64, 64)).astype(np.float32)
    tw = fit_normalization(InputNormalization(mode="tilewise"), x)
    assert tw.per_tile and tw.lo is None
    tile = x[:, :16, :16]
    lo, hi = np.quantile(tile, [0.01, 0.98])
    np.testing.assert_allclose(tw.apply(tile), np.clip((tile - lo) / (hi - lo + 1e-6), 0, 1), atol=1e-6)

    fixed = fit_normalization(InputNormalization(mode="fixed", low=[100.0], high=[300.0]), x)
    np.testing.assert_allclose(fixed.apply(np.array([[100.0, 200.0, 400.0]])), [[0.0, 0.5, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="one value per channel"):
        fit_normalization(InputNormalization(mode="fixed", low=[0.0, 0.0], high=[1.0, 1.0]), np.zeros((3, 4, 4)))

    z = zarr.open_array(
        zarr.storage.MemoryStore(), mode="w", shape=x.shape, chunks=(1, 16, 16), dtype=x.dtype
    )
    z[:] = x
    lazy = Image.from_array(z)  # a Zarr array is wrapped without loading it
    assert lazy._source is z and lazy.chunks == (1, 16, 16)
    np.testing.assert_array_equal(fit_normalization(InputNormalization(), z).lo, fit_normalization(InputNormalization(), x).lo)

    big = rng.uniform(0, 1000, size=(1, 256, 256)).astype(np.float32)
    settings = InputNormalization(max_sample_voxels=8192, seed=3)
    a, b = fit_normalization(settings, Image.from_array(big)), fit_normalization(settings, Image.from_array(big))
    assert a.estimated and a.sampled_voxels < big.size
    np.testing.assert_array_equal(a.lo, b.lo)  # the seed makes the estimate repeatable
    exact = np.quantile(big, [0.01, 0.98])
    np.testing.assert_allclose([a.lo[0], a.hi[0]], exact, atol=15)  # uniform 0..1000: a good estimate


def test_input_normalization_config_messages_and_roundtrip():
    with pytest.raises(ValidationError, match=r"upper is a quantile .* did you mean 0.98"):
        InputNormalization(lower=1.0, upper=98.0)
    with pytest.raises(ValidationError, match=r"lower is a quantile .* did you mean 0.02"):
        InputNormalization(lower=2.0)
    with pytest.raises(ValidationError, match="smaller than upper"):
        InputNormalization(lower=0.5, upper=0.4)
    with pytest.raises(ValidationError, match="needs low and high"):
        InputNormalization(mode="fixed")
    with pytest.raises(ValidationError, match="only used by mode 'fixed'"):
        InputNormalization(low=[0.0], high=[1.0])
    s = InputNormalization(mode="tilewise", lower=0.02)
    # checkpoints store model_dump(mode="json") as extra["input_normalization"]; conversion reads it back
    stored = json.loads(json.dumps(s.model_dump(mode="json")))
    assert InputNormalization.model_validate(stored) == s
    assert InputNormalization.from_yaml(s.to_yaml()) == s
    assert s.percentiles == (2.0, 98.0)


# ------------------------------------------------------------------------------------------------------
# labels -> targets
# ------------------------------------------------------------------------------------------------------
LABELS_2D = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 3, 3],
        [0, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 3, 3],
        [0, 1, 1, 1, 2, 2, 2, 0, 3, 3, 0, 3, 3],
        [0, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 3, 3],
        [0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
)


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


def test_targets_hand_made_2d():
    t = instances_to_targets(LABELS_2D)
    assert t.shape == (2, *LABELS_2D.shape) and t.dtype == np.uint8
    fg = _mask(
        [
            ".............",
            ".............",
            "..#..#...####",  # 1 and 2 touch: each keeps only its inner column; the image edge is no boundary
            "..#..#...####",  # the hole of 3 at (3, 10) is filled first
            ".........####",
            ".............",
            ".............",
        ]
    )
    np.testing.assert_array_equal(t[0].astype(bool), fg)
    filled = LABELS_2D.copy()
    filled[3, 10] = 3
    np.testing.assert_array_equal(t[1].astype(bool), (filled > 0) & ~fg)
    # foregrounds of touching objects never touch
    f1, f2 = (t[0] > 0) & (filled == 1), (t[0] > 0) & (filled == 2)
    assert not (ndi.binary_dilation(f1) & f2).any()

    wide = instances_to_targets(LABELS_2D, boundary_width=2, background=True, dtype=np.float32)
    assert wide.dtype == np.float32 and wide.shape[0] == 3
    assert set(zip(*np.nonzero(wide[0]), strict=True)) == {(3, 10), (3, 11), (3, 12)}
    np.testing.assert_array_equal(wide.sum(0), 1.0)  # one-hot with the background channel
    np.testing.assert_array_equal(wide[2].astype(bool), filled == 0)

    no_fill = instances_to_targets(LABELS_2D, fill_holes=False)
    assert no_fill[0, 3, 10] == 0 and no_fill[1, 3, 10] == 0
    assert no_fill[1, 2, 10] == 1 and no_fill[1, 3, 9] == 1  # the hole's rim becomes boundary


def test_targets_3d_cube():
    lab = np.zeros((7, 7, 7), np.uint16)
    lab[1:6, 1:6, 1:6] = 4
    t = instances_to_targets(lab)
    expected = np.zeros_like(lab, bool)
    expected[2:5, 2:5, 2:5] = True
    np.testing.assert_array_equal(t[0].astype(bool), expected)
    assert t[1].sum() == 5**3 - 3**3


def test_clean_labels_splits_and_fills():
    lab = np.zeros((8, 10), np.uint16)
    lab[1:4, 1:4] = 5  # piece A of id 5
    lab[2, 2] = 0  # a hole
    lab[5:7, 6:9] = 5  # piece B of id 5 (disconnected)
    lab[4, 4] = 5  # one pixel touching A only diagonally
    lab[6, 1:3] = 9
    out = clean_labels(lab)
    assert out.dtype == lab.dtype
    assert sorted(np.unique(out)) == [0, 1, 2, 3, 4]  # three pieces of 5, then 9, relabelled 1..4
    assert out[2, 2] == out[1, 1] == 1  # largest piece first, hole filled
    assert out[5, 6] == 2 and out[4, 4] == 3 and out[6, 1] == 4
    small = clean_labels(lab, min_size=2)
    assert small[4, 4] == 0 and small.max() == 3
    diagonal = clean_labels(lab, connectivity=2)
    assert diagonal[4, 4] == diagonal[1, 1]
    np.testing.assert_array_equal(fill_label_holes(lab)[2, 2], 5)
    assert lab[2, 2] == 0  # inputs are not modified


# ------------------------------------------------------------------------------------------------------
# sampler and splits
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blobs3d():
    return synthetic_blobs((24, 48, 48), seed=1)


def _sampler(blobs, **kw) -> TileSampler:
    image, labels = blobs
    kw.setdefault("seed", 7)
    return TileSampler([SamplerSource(image, labels)], (8, 16, 16), **kw)


def test_sampler_reproducible_and_resumes(blobs3d):
    a, b = _sampler(blobs3d), _sampler(blobs3d)
    first = [a.sample() for _ in range(3)]
    for t in first:
        u = b.sample()
        np.testing.assert_array_equal(t.image, u.image)
        np.testing.assert_array_equal(t.target, u.target)
    state = json.loads(json.dumps(a.state_dict()))
    after = [a.sample() for _ in range(3)]
    resumed = _sampler(blobs3d)
    resumed.load_state_dict(state)
    for t in after:
        u = resumed.sample()
        assert (u.index, u.slices, u.flipped) == (t.index, t.slices, t.flipped)
        np.testing.assert_array_equal(t.image, u.image)
    other = _sampler(blobs3d, seed=8).sample()
    assert other.slices != first[0].slices or other.flipped != first[0].flipped
    with pytest.raises(ValueError, match="seed"):
        _sampler(blobs3d, seed=8).load_state_dict(state)


def test_sampler_tiles_flips_and_normalization(blobs3d):
    image, labels = blobs3d
    s = _sampler(blobs3d)
    fitted = fit_normalization(InputNormalization(), image)
    targets = instances_to_targets(labels)
    counts = np.zeros(3)
    for _ in range(60):
        t = s.sample()
        assert t.image.shape == (1, 8, 16, 16) and t.image.dtype == np.float32
        assert t.target.shape == (2, 8, 16, 16) and t.target.dtype == np.uint8
        want_img = fitted.apply(image[(slice(None), *t.slices)])  # global: fitted on the whole image
        want_tgt = targets[(slice(None), *t.slices)]
        ax = tuple(a + 1 for a in t.flipped)
        np.testing.assert_array_equal(t.image, np.flip(want_img, ax) if ax else want_img)
        np.testing.assert_array_equal(t.target, np.flip(want_tgt, ax) if ax else want_tgt)
        counts[list(t.flipped)] += 1
    assert np.all((counts > 15) & (counts < 45))  # p = 0.5 per axis
    assert not any(_sampler(blobs3d, flips=False).sample().flipped for _ in range(10))

    tw = _sampler(blobs3d, normalization=InputNormalization(mode="tilewise")).sample()
    raw = image[(slice(None), *tw.slices)]
    lo, hi = np.quantile(raw, [0.01, 0.98])
    want = np.clip((raw - lo) / (hi - lo + 1e-6), 0, 1)
    ax = tuple(a + 1 for a in tw.flipped)
    np.testing.assert_allclose(tw.image, np.flip(want, ax) if ax else want, atol=1e-6)


def test_sampler_foreground_rule_region_and_lazy_targets(blobs3d):
    image, labels = blobs3d
    plain, rich = _sampler(blobs3d), _sampler(blobs3d, min_foreground=0.4)
    tiles = [rich.sample() for _ in range(20)]
    assert all(t.foreground >= 0.4 or t.tries == 20 for t in tiles)
    assert sum(t.foreground >= 0.4 for t in tiles) >= 15
    assert np.mean([t.foreground for t in tiles]) > np.mean([plain.sample().foreground for _ in range(20)])
    impossible = _sampler(blobs3d, min_foreground=1.0, max_tries=5).sample()
    assert impossible.tries == 5 and impossible.foreground < 1.0  # the best of the tries is used

    train, _ = split_by_region(labels.shape, 0.5, axis=-1)
    s = TileSampler([SamplerSource(image, labels, train)], (8, 16, 16), seed=1)
    for _ in range(20):
        t = s.sample()
        assert t.slices[2].start >= 0 and t.slices[2].stop <= 24
    lazy = TileSampler([SamplerSource(image, labels, train)], (8, 16, 16), seed=1, precompute_max_voxels=0)
    s = TileSampler([SamplerSource(image, labels, train)], (8, 16, 16), seed=1)
    for _ in range(5):  # targets per tile (labels read with a margin) equal the whole-image targets
        np.testing.assert_array_equal(lazy.sample().target, s.sample().target)
    with pytest.raises(ValueError, match="smaller tile_shape"):
        TileSampler([SamplerSource(image, labels, train)], (8, 16, 32))


def test_splits():
    train, val = split_by_region((60, 256, 256), 0.7, axis=-1)
    assert train == (slice(0, 60), slice(0, 256), slice(0, 179))
    assert val == (slice(0, 60), slice(0, 256), slice(179, 256))
    train, val = split_by_region((60, 256, 256), 0.7, axis=0)
    assert (train[0], val[0]) == (slice(0, 42), slice(42, 60))
    assert split_by_image(["a", "b", "c", "d"], 0.7) == (["a", "b", "c"], ["d"])
    with pytest.raises(ValueError, match="by region"):
        split_by_image(["a"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_by_region((10, 10), 1.0)


# ------------------------------------------------------------------------------------------------------
# synthetic data and embedded samples
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 128), (24, 48, 64)])
def test_synthetic_blobs(shape):
    image, labels = synthetic_blobs(shape, seed=3)
    assert image.shape == (1, *shape) and image.dtype == np.float32
    assert labels.shape == shape and labels.dtype == np.uint16
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0, 1..N
    assert 0.1 < (labels > 0).mean() < 0.5
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        assert ndi.label(labels[sl] == lab)[1] == 1  # every id is one piece
    flat, flat_labels = synthetic_blobs(shape, seed=3, gradient=0.0)
    np.testing.assert_array_equal(labels, flat_labels)
    ramp = 1.0 + 3.0 * np.linspace(
        0.0, 1.0, shape[-1], dtype=np.float32
    )  # gradient=3: 4x brighter on the right
    np.testing.assert_allclose(image, flat * ramp, rtol=1e-5, atol=1e-6)
    fitted = fit_normalization(InputNormalization(), image)  # tiles at the two ends have different statistics
    left, right = image[..., : shape[-1] // 4], image[..., -shape[-1] // 4 :]
    assert np.quantile(right, 0.5) > 2 * np.quantile(left, 0.5)
    assert fitted.lo[0] < np.quantile(right, 0.01)
    again, _ = synthetic_blobs(shape, seed=3)
    np.testing.assert_array_equal(image, again)
    u16, _ = synthetic_blobs(shape, seed=3, dtype="uint16")
    assert u16.dtype == np.uint16


def test_embedded_samples_load_offline(no_network):
    assert list_samples() == ["nuclei2d", "nuclei3d"]
    for name, shape, n_ids in [("nuclei2d", (512, 512), 125), ("nuclei3d", (60, 256, 256), 20)]:
        image, labels = load_sample(name)
        assert image.shape == (1, *shape) and image.dtype == np.uint16
        assert labels.shape == shape
        np.testing.assert_array_equal(np.unique(labels), np.arange(n_ids + 1))
        ip, lp = sample_path(name)
        assert ip.is_file() and lp.is_file() and ip.stat().st_size < 6_000_000
        with tifffile.TiffFile(ip) as tf:
            assert tf.pages[0].compression == 8  # zlib (adobe deflate)
    _, lab3 = load_sample("nuclei3d")
    assert np.array_equal(fill_label_holes(lab3, slicewise=True), lab3)  # cleaned: no holes left
    with pytest.raises(ValueError, match="nuclei2d, nuclei3d"):
        load_sample("cells")


# ------------------------------------------------------------------------------------------------------
# DataConfig and build_training_data
# ------------------------------------------------------------------------------------------------------
def test_data_config_messages_and_roundtrip(tmp_path: Path):
    cfg = DataConfig(sample="nuclei3d", tile_shape=(32, 64, 64), input_normalization={"mode": "tilewise"})
    assert DataConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.targets.channel_names == ["foreground", "boundary"] and cfg.dims == 3
    with pytest.raises(ValidationError, match="not both"):
        DataConfig(sample="nuclei2d", images=["a.tif"], labels=["b.tif"], tile_shape=(64, 64))
    with pytest.raises(ValidationError, match="one instance label image per image"):
        DataConfig(images=["a.tif", "b.tif"], labels=["a_lab.tif"], tile_shape=(64, 64))
    with pytest.raises(ValidationError, match="has no images"):
        DataConfig(tile_shape=(64, 64))
    with pytest.raises(ValidationError, match="nuclei2d' is 2D"):
        DataConfig(sample="nuclei2d", tile_shape=(32, 64, 64))
    with pytest.raises(ValidationError, match="at least 2 images"):
        DataConfig(sample="nuclei2d", tile_shape=(64, 64), split={"by": "image"})
    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        DataConfig(sample="nuclei2d", tile_shape=(64, 64), split={"fraction": 70})
    with pytest.raises(ValidationError, match="tile_shape needs 2"):
        DataConfig(sample="synthetic", tile_shape=(64,))
    rel = DataConfig(images=["a.tif"], labels=["l.tif"], tile_shape=(8, 8)).resolve_paths(tmp_path)
    assert rel.images == [tmp_path / "a.tif"]


def test_build_training_data_from_files(tmp_path: Path):
    for i in range(3):
        image, labels = synthetic_blobs((48, 64), seed=i, dtype="uint16")
        write_tiff(tmp_path / f"img{i}.tif", image, axes="cyx")
        write_tiff(tmp_path / f"lab{i}.tif", labels, axes="yx")
    cfg = DataConfig(
        images=[f"img{i}.tif" for i in range(3)],
        labels=[f"lab{i}.tif" for i in range(3)],
        tile_shape=(32, 32),
        split={"by": "image", "fraction": 0.7},
        targets={"background": True},
    )
    data = build_training_data(cfg, base_dir=tmp_path)
    assert len(data.train.images) == 2 and len(data.validation) == 1
    assert data.in_channels == 1 and data.out_channels == 3 and data.dims == 2
    images, targets = data.train.batch(4)
    assert images.shape == (4, 1, 32, 32) and targets.shape == (4, 3, 32, 32)
    val = data.validation[0]
    assert val.targets.shape == (3, 48, 64) and val.normalized().shape == (1, 48, 64)

    region = build_training_data(DataConfig(sample="nuclei2d", tile_shape=(64, 64)))
    (train_region,) = region.train.regions
    assert train_region[-1] == slice(0, 358) and region.validation[0].region[-1] == slice(358, 512)
