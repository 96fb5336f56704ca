"""TiledPredictor: tiled == whole-image forward for tile-local networks, and not for InstanceNorm."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from tilenorm_bmz.config import InputNormalization
from tilenorm_bmz.data import fit_normalization
from tilenorm_bmz.introspect import ceil_to
from tilenorm_bmz.models import UNet
from tilenorm_bmz.tiling import TiledPredictor, forward_whole, min_tile_size, recommend_halo

from .conftest import randomize_norm_stats

HALO = 24  # one-sided TRF of a depth-2 UNet is 23, rounded so 2*halo is a multiple of the divisor 4


def _unet(dims: int, norm: str, **kw) -> UNet:
    kw.setdefault("final_activation", "none")  # compare raw outputs, not saturated sigmoids
    return randomize_norm_stats(UNet(dims=dims, features=4, depth=2, norm=norm, **kw)).eval()


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_exact(tiled: np.ndarray, whole: np.ndarray) -> None:
    scale = float(np.abs(whole).max())
    assert scale > 0
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5 * scale)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("norm", ["batchrenorm", "batchnorm", "none"])
@pytest.mark.parametrize(
    "dims, shape, tile",
    [
        (2, (1, 150, 97), (64, 64)),  # not a multiple of the tile nor of the divisor: 7 x 4 tiles
        (2, (1, 30, 41), (64, 64)),  # smaller than one tile
        (3, (1, 37, 70, 61), (32, 56, 56)),  # 3D (z pooled 1x, y/x 4x): 2 x 3 x 2 tiles
        (3, (1, 11, 20, 17), (56, 56, 56)),  # 3D smaller than one tile
    ],
)
def test_tiled_equals_whole_for_tile_local_networks(norm, dims, shape, tile):
    model = _unet(dims, norm, pool_factors=[(1, 2, 2), (1, 2, 2)] if dims == 3 else None)
    halo = recommend_halo(model, dims)
    assert halo == ((HALO,) * 2 if dims == 2 else (10, HALO, HALO))
    predictor = TiledPredictor(model, tile, halo, batch_size=3, device="cpu")
    tiling = predictor.tiling(shape[1:])
    if max(shape[1:]) > max(tile):
        assert len(tiling) > 3, "the test must have seams"
    x = _image(shape)
    tiled = predictor.predict(x)
    assert tiled.shape == (2, *shape[1:]) and tiled.dtype == np.float32
    _assert_exact(tiled, forward_whole(model, x, device="cpu"))


def test_tiled_equals_whole_3d_isotropic_batchrenorm():
    model = _unet(3, "batchrenorm")
    predictor = TiledPredictor(model, 56, recommend_halo(model, 3), batch_size=2, device="cpu")
    x = _image((1, 60, 63, 61))
    assert predictor.tiling(x.shape[1:]).grid_shape == (2, 2, 2)
    _assert_exact(predictor.predict(x), forward_whole(model, x, device="cpu"))


def test_instancenorm_network_is_not_tile_local():
    model = _unet(2, "instancenorm")
    x = _image((1, 150, 97))
    tiled = TiledPredictor(model, (64, 64), HALO, device="cpu").predict(x)
    whole = forward_whole(model, x, device="cpu")
    assert _rel_diff(tiled, whole) > 1e-3


def test_a_halo_below_the_receptive_field_is_not_exact():
    model = _unet(2, "batchrenorm")
    x = _image((1, 150, 97))
    tiled = TiledPredictor(model, (64, 64), 4, device="cpu").predict(x)
    assert _rel_diff(tiled, forward_whole(model, x, device="cpu")) > 1e-4  # 10x the exactness tolerance


def test_global_normalization_per_block_keeps_tiling_exact_and_tilewise_does_not():
    model = _unet(2, "batchrenorm")
    ramp = np.linspace(0.0, 3000.0, 150, dtype=np.float32)[None, :, None]  # tiles differ in brightness
    x = (np.random.default_rng(1).gamma(2.0, 300.0, (1, 150, 97)) + ramp).astype(np.float32)
    fitted = fit_normalization(InputNormalization(), x)  # global: fitted once on the whole image
    tiled = TiledPredictor(model, (64, 64), HALO, device="cpu", preprocess=fitted.apply).predict(x)
    _assert_exact(tiled, forward_whole(model, x, device="cpu", preprocess=fitted.apply))
    tilewise = fit_normalization(InputNormalization(mode="tilewise"), x)
    per_tile = TiledPredictor(model, (64, 64), HALO, device="cpu", preprocess=tilewise.apply).predict(x)
    assert _rel_diff(per_tile, tiled) > 1e-4  # 10x the exactness tolerance


def test_torchscript_module_with_divisor_argument():
    model = _unet(2, "batchnorm")
    scripted = torch.jit.script(model)
    x = _image((1, 90, 77))
    predictor = TiledPredictor(scripted, (64, 64), HALO, device="cpu", divisor=4)
    assert predictor.divisor == (4, 4) and predictor.in_channels == 1
    _assert_exact(predictor.predict(x), forward_whole(model, x, device="cpu"))


def test_monai_unet_with_its_measured_halo():
    monai = pytest.importorskip("monai.networks.nets")
    from tilenorm_bmz.tiling import receptive_field

    net = monai.UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=0,
        norm="batch",
    )
    randomize_norm_stats(net).eval()
    rf = receptive_field(net, 2, divisor=4, n_samples=2)
    assert rf.method == "numerical" and not rf.normalization_couples_tile
    x = _image((1, 100, 90))
    predictor = TiledPredictor(net, (64, 64), rf.recommended_halo, device="cpu", divisor=4)
    assert len(predictor.tiling(x.shape[1:])) > 1
    _assert_exact(predictor.predict(x), forward_whole(net, x, device="cpu", divisor=4))


def test_predictor_pickles_for_workers():
    model = _unet(2, "batchrenorm")
    x = _image((1, 80, 70))
    for net in (model, torch.jit.script(_unet(2, "batchnorm"))):
        p = TiledPredictor(net, (64, 64), HALO, device="cpu", divisor=4, batch_size=2)
        p2 = pickle.loads(pickle.dumps(p))
        assert p2.model is not p.model
        np.testing.assert_array_equal(p2.predict(x), p.predict(x))


def test_gaussian_blend_is_for_comparison_only():
    pointwise = nn.Conv2d(1, 2, 1)  # no receptive field: blending weights cancel exactly
    x = _image((1, 90, 77))
    p = TiledPredictor(pointwise, (32, 32), 4, device="cpu", blend="gaussian")
    np.testing.assert_allclose(p.predict(x), forward_whole(pointwise, x, device="cpu"), rtol=1e-5, atol=1e-6)
    model = _unet(2, "batchrenorm")
    x = _image((1, 150, 97))
    blended = TiledPredictor(model, (64, 64), HALO, device="cpu", blend="gaussian").predict(x)
    assert _rel_diff(blended, forward_whole(model, x, device="cpu")) > 1e-4  # whole tiles include borders
    with pytest.raises(ValueError, match="use predict"):
        TiledPredictor(model, (64, 64), HALO, device="cpu", blend="gaussian").predict_to(
            x, np.zeros((2, 150, 97))
        )


class _CountingImage:
    """An array that records the regions read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.reads: list[tuple[int, ...]] = []

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(out.shape)
        return out


def test_reads_only_tiles_and_batches_them():
    model = _unet(2, "batchrenorm")
    img = _CountingImage(_image((1, 200, 180)))
    predictor = TiledPredictor(model, (64, 64), HALO, device="cpu", batch_size=4)
    calls = []
    original = predictor._forward
    predictor._forward = lambda x: (calls.append(x.shape[0]), original(x))[1]  # type: ignore[method-assign]
    out = np.zeros((2, 200, 180), np.float32)
    tiling = predictor.predict_to(img, out)
    assert max(int(np.prod(s[1:])) for s in img.reads) <= 64 * 64
    assert len(img.reads) == len(tiling)
    assert calls == [4] * (len(tiling) // 4) + ([len(tiling) % 4] if len(tiling) % 4 else [])


@pytest.mark.parametrize(
    "kwargs, image_shape, message",
    [
        (
            dict(tile_shape=(62, 64), halo=HALO),
            (1, 90, 90),
            r"tile 62 along Y is not a multiple .* use 60 or 64",
        ),
        (dict(tile_shape=(48, 48), halo=HALO), (1, 90, 90), r"use a tile of at least 52"),
        (dict(tile_shape=(64, 64, 64), halo=HALO), (1, 90, 90), r"the model is 2D but tile_shape"),
        (
            dict(tile_shape=(64, 64), halo=HALO),
            (2, 90, 90),
            r"expects 1 input channel\(s\) but the image has 2",
        ),
        (
            dict(tile_shape=(64, 64), halo=HALO),
            (1, 9, 90, 90),
            r"network is 2D and expects an image \(C, Y, X\) with 3 axes",
        ),
        (dict(tile_shape=(64, 64), halo=HALO, divisor=2), (1, 90, 90), r"not a multiple of the model's own"),
    ],
)
def test_bad_inputs_say_what_to_change(kwargs, image_shape, message):
    model = _unet(2, "batchrenorm")
    with pytest.raises(ValueError, match=message):
        TiledPredictor(model, device="cpu", **kwargs).predict(np.zeros(image_shape, np.float32))


def test_network_that_changes_the_size_is_refused():
    valid = nn.Conv2d(1, 1, 3)  # no padding: output smaller than the tile
    with pytest.raises(ValueError, match="same' padding"):
        TiledPredictor(valid, (32, 32), 2, device="cpu").predict(np.zeros((1, 40, 40), np.float32))


@pytest.mark.parametrize(("dims", "image", "budget_mib", "batch"), [(2, (3000, 2500), 48, 1), (3, (160, 200, 190), 384, 2)])
def test_a_forward_of_the_chosen_tile_stays_within_the_budget(dims, image, budget_mib, batch):
    # the plan extrapolates the memory measured on probe tiles; measure the chosen tile itself
    from tilenorm_bmz.tiling.memory import peak_forward_bytes, pipeline_bytes_per_voxel, plan_tile

    model = _unet(dims, "batchrenorm")
    budget = budget_mib * 2**20
    plan, mem, used = plan_tile(model, image, (HALO,) * dims, device="cpu", memory_budget_bytes=budget,
                                batch_size=batch)
    assert used == budget and plan.fits and all(t % 4 == 0 for t in plan.tile_shape)
    # the network as the predictor runs it (prepared for inference at its first forward pass)
    predictor = TiledPredictor(model, plan.tile_shape, HALO, batch_size=batch, device="cpu")
    predictor.predict(np.zeros((1, *(2 * t for t in plan.tile_shape[:-1]), plan.tile_shape[-1]), np.float32))
    peak, out_channels, method = peak_forward_bytes(predictor.prepared.module, (batch, 1, *plan.tile_shape), "cpu")
    assert "profiler" in method and out_channels == mem.out_channels == 2
    buffers = batch * pipeline_bytes_per_voxel(1, out_channels) * math.prod(plan.tile_shape)
    assert peak + buffers <= budget
    assert peak + buffers > budget / 8  # the budget is used, not wasted on needless tiles
    assert mem.bytes_per_voxel > 4 * 4  # at least the first feature maps


def _brute_force_cost(shape, halo, div, max_voxels):
    from tilenorm_bmz.tiling import Tiling

    ranges = [range(min_tile_size(h, d), ceil_to(s, d) + d, d) for s, h, d in zip(shape, halo, div, strict=True)]
    best = None
    for tile in itertools.product(*ranges):
        t = Tiling(shape, tile, halo, div)
        if math.prod(t.effective_tile_shape) <= max_voxels:
            cost = len(t) * math.prod(t.effective_tile_shape)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_processes_the_fewest_voxels(seed):
    from tilenorm_bmz.tiling import Tiling
    from tilenorm_bmz.tiling.plan import plan_tiles

    rng = np.random.default_rng(seed)
    dims = 2 + seed % 2
    shape = tuple(int(s) for s in rng.integers(40, 130 if dims == 2 else 90, dims))
    div = tuple(int(d) for d in rng.choice([1, 2, 4, 8], dims))
    halo = tuple(int(h) for h in rng.integers(0, 12, dims))
    max_voxels = float(rng.uniform(0.2, 1.2) * math.prod(shape))
    plan = plan_tiles(shape, halo, div, max_voxels)
    tiling = Tiling(shape, plan.tile_shape, halo, div)
    assert tiling.grid_shape == plan.grid and tiling.overhead == pytest.approx(plan.overhead)
    assert math.prod(plan.tile_shape) <= max_voxels or not plan.fits
    assert plan.n_tiles * math.prod(plan.tile_shape) == _brute_force_cost(shape, halo, div, max_voxels)


def test_flush_border_tiles_need_a_halo_on_one_side_only():
    from tilenorm_bmz.tiling.memory import ForwardMemory, plan_tile
    from tilenorm_bmz.tiling.plan import plan_tiles

    # 192^3, halo 24: two tiles of 120 per axis (1.95x the voxels), not three of 96 (3.4x)
    plan = plan_tiles((192,) * 3, (24,) * 3, (4,) * 3, 130**3)
    assert plan.tile_shape == (120,) * 3 and plan.grid == (2, 2, 2) and plan.overhead == pytest.approx(1.953, abs=1e-3)
    # concurrent writers: whole chunks of 96 still allow it
    assert plan_tiles((192,) * 3, (24,) * 3, (4,) * 3, 130**3, chunked=True).chunks == (96, 96, 96)
    # a budget of about 152^2 on a 160^2 image: one axis whole, two tiles of 104 (not 152) along the other
    mem = ForwardMemory(bytes_per_voxel=100.0, out_channels=1, method="given")
    per_voxel = 100 + 4 * (2 + 3 + 4)  # forward + pipeline buffers, 1 channel in and out
    plan, _, _ = plan_tile(_unet(2, "batchrenorm"), (160, 160), (24, 24), device="cpu",
                           memory_budget_bytes=per_voxel * 152 * 152, memory=mem)
    assert sorted(plan.tile_shape) == [104, 160] and plan.n_tiles == 2 and plan.overhead == pytest.approx(1.3)
    # too small a budget: the smallest valid tile, said to not fit
    plan, _, _ = plan_tile(_unet(2, "batchrenorm"), (5000, 5000), (HALO, HALO), device="cpu",
                           memory_budget_bytes=1, memory=mem)
    assert plan.tile_shape == (min_tile_size(HALO, 4),) * 2 and not plan.fits


def test_infer_divisor_from_strides_and_its_errors():
    monai = pytest.importorskip("monai.networks.nets")
    from tilenorm_bmz.tiling import infer_divisor

    net = monai.UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(2, 4, 8),
                     strides=((1, 2, 2), (2, 2, 2)), num_res_units=0)
    assert infer_divisor(net, 3) == (2, 4, 4)
    assert infer_divisor(_unet(2, "batchnorm"), 2) == (4, 4)

    class Shrinks(nn.Module):  # a valid convolution: the output is smaller than the input
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="--divisor"):
        infer_divisor(Shrinks(), 2)
