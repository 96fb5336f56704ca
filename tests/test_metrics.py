"""Metrics: Dice, tile mismatch, train/eval disparity, tiled vs whole, halo sufficiency, tile-size sweep."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch import nn

from tests.conftest import randomize_norm_stats
from tilenorm_bmz.metrics import (
    COUPLED,
    dice,
    halo_sufficiency,
    mismatch_geometry,
    norm_layers,
    tile_mismatch,
    tile_size_sweep,
    tiled_vs_whole,
    train_eval_disparity,
)
from tilenorm_bmz.models import UNet
from tilenorm_bmz.tiling import receptive_field
from tilenorm_bmz.tiling.predictor import TiledPredictor

HALO = 24  # >= the one-sided receptive field (23) of UNet(depth=2)


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth, globally normalized float32 image (1, *shape) with blob-like structure."""
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.standard_normal(shape), 3)
    x = (x - x.mean()) / x.std()
    return x[None].astype(np.float32)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), f"{k} changed"


# ----------------------------------------------------------------------------------------------------
# dice
# ----------------------------------------------------------------------------------------------------
def test_dice_edge_cases():
    empty = np.zeros((2, 8, 8))
    np.testing.assert_array_equal(dice(empty, empty), [1.0, 1.0])  # both empty -> 1
    full = np.ones((2, 8, 8))
    np.testing.assert_array_equal(dice(full, empty), [0.0, 0.0])  # one empty -> 0
    a = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    b = np.array([[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(dice(a, b), [2 * 1 / 3, 0.0])
    assert dice(a[0], b[0], channel_axis=None) == pytest.approx(2 / 3)


def test_dice_thresholds_probabilities_and_accepts_torch():
    p = torch.tensor([[0.9, 0.6, 0.4, 0.1]])
    q = np.array([[True, False, False, False]])
    np.testing.assert_allclose(dice(p, q), [2 / 3])  # 0.9, 0.6 > 0.5
    np.testing.assert_allclose(dice(p, q, threshold=0.7), [1.0])
    np.testing.assert_allclose(dice(np.zeros((3, 2)), np.zeros((3, 2)), channel_axis=1), [1.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((1, 4)), np.zeros((1, 5)))


# ----------------------------------------------------------------------------------------------------
# tile mismatch
# ----------------------------------------------------------------------------------------------------
def test_geometry_paper_defaults():
    g3 = mismatch_geometry((192, 192, 288), halo=HALO, divisor=4)
    assert (g3.crop_shape, g3.long_axis, g3.tile, g3.offset) == ((192, 192, 288), 2, 192, 96)
    assert g3.valid == (96 + HALO, 192 - HALO) and len(g3.origins) == 1 and not g3.scaled_down
    g2 = mismatch_geometry((320, 416), halo=HALO, divisor=4)
    assert (g2.crop_shape, g2.long_axis, g2.stride) == ((192, 288), 1, (64, 64))
    assert g2.origins == [(y, x) for y in (0, 64, 128) for x in (0, 64, 128)]


def test_geometry_scales_down_with_warning_and_respects_divisor(caplog):
    with caplog.at_level(logging.WARNING, logger="tilenorm_bmz.metrics"):
        g = mismatch_geometry((100, 200), halo=10, divisor=8)
    assert g.scaled_down and g.adjustments and "scaled down" in caplog.text
    assert g.tile % 8 == 0 and g.offset % 8 == 0 and g.crop_shape[0] % 8 == 0
    assert g.tile + g.offset <= 200 and g.crop_shape[0] <= 100
    assert g.valid[1] > g.valid[0]
    r = mismatch_geometry((512, 512), halo=0, divisor=16, tile=130, offset=60)
    assert (r.tile, r.offset) == (128, 48) and any("rounded" in a for a in r.adjustments)


def test_geometry_errors_say_what_to_change():
    with pytest.raises(ValueError, match="use tile >= "):
        mismatch_geometry((512, 512), halo=40, divisor=4, tile=128)
    with pytest.raises(ValueError, match="too few"):
        mismatch_geometry((64, 80), halo=40, divisor=4)


@pytest.mark.parametrize("norm", ["batchrenorm", "batchnorm"])
def test_tile_local_network_is_seamless(tiny_unet_factory, norm):
    net = tiny_unet_factory(2, norm)
    img = blobs((64, 248))
    r = tile_mismatch(net, img, halo=HALO, crop_shape=(64, 216), tile=144, stride=32, device="cpu")
    assert r.geometry.valid == (72 + HALO, 144 - HALO)
    assert len(r.geometry.origins) == 2
    assert r.max_dist == 0.0 and r.seamless and r.verdict == "no"
    assert r.mismatch == [0.0, 0.0]
    # the halo matters: without it the tiles' zero-padded borders disagree
    r0 = tile_mismatch(net, img, halo=0, tile=144, stride=32, device="cpu")
    assert r0.max_dist > 1e-4 and not r0.seamless


def test_tile_coupled_network_mismatches(tiny_unet_factory):
    net = tiny_unet_factory(2, "instancenorm")
    img = blobs((64, 248))
    r = tile_mismatch(net, img, halo=HALO, tile=144, stride=32, device="cpu", batch_size=4)
    assert r.max_dist > 1e-3 and r.verdict == "yes"
    assert max(r.max_dist_per_channel) == r.max_dist == max(r.crop_max_dist)
    # where the worst crop was, for the report figure
    f = r.figure
    assert f is not None and f.tile1.shape == f.tile2.shape == (2, 64, 144) and f.input.shape == (64, 216)
    lo, hi = f.valid[0] - f.offset, f.valid[1] - f.offset
    assert f.overlap_difference[:, :, lo:hi].max() == pytest.approx(r.max_dist)
    dumped = r.model_dump(mode="json")
    assert "figure" not in dumped and dumped["seamless"] is False
    json.dumps(dumped)


def test_tile_mismatch_3d_and_model_state_untouched(tiny_unet_factory):
    net = tiny_unet_factory(3, "batchrenorm").train()
    before = state(net)
    img = blobs((16, 16, 160))
    r = tile_mismatch(
        net, img, halo=(8, 8, HALO), crop_shape=(16, 16, 156), tile=104, stride=16, device="cpu"
    )
    assert r.geometry.crop_shape == (16, 16, 156) and r.max_dist == 0.0
    assert r.figure is not None and r.figure.tile1.shape == (2, 16, 104)
    assert all(m.training for m in net.modules())  # modes restored
    assert_same_state(before, net)


def test_tile_mismatch_on_any_predictor():
    img = blobs((32, 160))

    def per_tile_normalized(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x - x.mean(dim=(2, 3), keepdim=True))

    assert tile_mismatch(torch.sigmoid, img, halo=0, tile=96, device="cpu").max_dist == 0.0
    assert tile_mismatch(per_tile_normalized, img, halo=0, tile=96, device="cpu").max_dist > 1e-3


# ----------------------------------------------------------------------------------------------------
# train/eval disparity
# ----------------------------------------------------------------------------------------------------
def _calibrate_exactly(net: nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the statistics of ``batch`` (biased variance)."""
    counts: dict[nn.Module, int] = {}
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]

    def count(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        counts[m] = args[0].numel() // args[0].shape[1]

    hooks = [m.register_forward_pre_hook(count) for m in bns]
    for m in bns:
        m.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(batch)
        for m in bns:  # running_var is unbiased; train mode normalizes with the biased variance
            m.running_var.mul_((counts[m] - 1) / counts[m])
            m.momentum = 0.1
    for h in hooks:
        h.remove()
    net.eval()


def test_disparity_zero_when_running_stats_equal_batch_stats():
    net = UNet(dims=2, features=4, depth=2, norm="batchnorm")
    tiles = list(blobs((2, 64, 64))[0][:, None])  # two tiles (1, 64, 64)
    _calibrate_exactly(net, torch.from_numpy(np.stack(tiles)))
    r = train_eval_disparity(net, tiles, batch_size=2, device="cpu")
    assert r.applicable and r.n_batches == 1 and r.origins is None
    assert r.max_abs_diff < 1e-4
    assert max(r.disparity) < 1e-3


def test_disparity_positive_when_running_stats_mismatch():
    net = randomize_norm_stats(UNet(dims=2, features=4, depth=2, norm="batchnorm"), seed=3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
                m.running_var.mul_(4.0)
    img = blobs((96, 96))
    r = train_eval_disparity(net.eval(), img, n_tiles=3, tile_shape=48, batch_size=2, device="cpu")
    assert r.applicable and r.max_disparity > 0.05 and r.max_abs_diff > 0.05
    assert r.n_batches == 2 and "the last one has 1" in r.batch_composition
    assert len(r.per_tile) == 3 and len(r.origins) == 3 and r.norm_layers == {"BatchNorm2d": 10}
    assert r.figure is not None and r.figure.eval.shape == r.figure.train.shape == (2, 48, 48)


@pytest.mark.parametrize("norm", ["batchnorm", "batchrenorm"])
def test_disparity_restores_buffers_and_modes_bit_identically(tiny_unet_factory, norm):
    net = tiny_unet_factory(2, norm)
    for m in net.modules():
        if hasattr(m, "set_renorm_limits"):
            m.set_renorm_limits(3.0, 5.0)
        if hasattr(m, "num_batches_tracked"):
            m.num_batches_tracked.fill_(1234)
    net.train()
    before = state(net)
    r = train_eval_disparity(net, blobs((64, 64)), n_tiles=2, tile_shape=32, device="cpu")
    assert r.applicable
    assert_same_state(before, net)
    assert all(m.training for m in net.modules())
    if norm == "batchrenorm":
        assert r.renorm_limits == [(3.0, 5.0)]


def test_disparity_keeps_dropout_off():
    unet = UNet(dims=2, features=4, depth=2, norm="batchnorm", final_activation="none")
    net = nn.Sequential(unet, nn.Dropout(p=0.5), nn.Sigmoid())
    seen: list[bool] = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    img = blobs((64, 64))
    r1 = train_eval_disparity(net, img, n_tiles=2, tile_shape=32, device="cpu", divisor=4)
    r2 = train_eval_disparity(net, img, n_tiles=2, tile_shape=32, device="cpu", divisor=4)
    assert seen and not any(seen)
    assert r1.per_tile == r2.per_tile and r1.max_abs_diff == r2.max_abs_diff


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_disparity_not_applicable_cases(tiny_unet_factory):
    img = blobs((64, 64))
    r = train_eval_disparity(
        tiny_unet_factory(2, "instancenorm"), img, n_tiles=1, tile_shape=32, device="cpu"
    )
    assert (
        not r.applicable and r.disparity is None and r.mode_independent_norm_layers == {"InstanceNorm2d": 10}
    )
    bn = tiny_unet_factory(2, "batchnorm")
    traced = torch.jit.trace(bn, torch.zeros(1, 1, 32, 32), check_trace=False)
    r = train_eval_disparity(traced, img, n_tiles=1, tile_shape=32, device="cpu", divisor=4)
    assert not r.applicable and "frozen" in r.reason
    scripted = torch.jit.script(bn)
    r = train_eval_disparity(scripted, img, n_tiles=1, tile_shape=32, device="cpu", divisor=4)
    assert r.applicable and r.norm_layers == {"BatchNorm2d": 10}
    dependent, _ = norm_layers(scripted)
    assert len(dependent) == 10


# ----------------------------------------------------------------------------------------------------
# tiled vs whole, halo sufficiency
# ----------------------------------------------------------------------------------------------------
def test_tiled_vs_whole(tiny_unet_factory):
    img = blobs((70, 90))  # not a multiple of the divisor: padded once, like the tiled predictor
    bn = tiny_unet_factory(2, "batchrenorm")
    r = tiled_vs_whole(TiledPredictor(bn, (64, 64), HALO, device="cpu").predict, bn, img, device="cpu")
    assert r.max_abs_diff < 1e-5 and r.image_shape == (70, 90)
    inn = tiny_unet_factory(2, "instancenorm")
    r = tiled_vs_whole(TiledPredictor(inn, (64, 64), HALO, device="cpu").predict, inn, img, device="cpu")
    assert r.max_abs_diff > 1e-3 and r.seamless is False
    assert r.figure is not None and r.figure.seam_map.shape == (70, 90)
    assert r.figure.seam_map.max() == pytest.approx(r.max_abs_diff)
    skipped = tiled_vs_whole(lambda x: x, lambda x: x, img, max_voxels=100)
    assert skipped.skipped and "max_voxels" in skipped.reason and skipped.seamless is None


def test_halo_sufficiency(tiny_unet_factory):
    rf = receptive_field(tiny_unet_factory(2, "batchnorm"), 2, n_samples=2)
    short = halo_sufficiency(8, rf)
    assert short.sufficient is False and short.shortfall == (15, 15)
    assert "increase the halo to 24x24" in short.message
    ok = halo_sufficiency(rf.recommended_halo, rf)
    assert ok.sufficient and ok.shortfall == (0, 0)
    rf_in = receptive_field(tiny_unet_factory(2, "instancenorm"), 2, n_samples=2)
    coupled = halo_sufficiency(1000, rf_in)
    assert coupled.coupled and coupled.sufficient is False and coupled.measured == COUPLED
    assert coupled.measured_trf is None and "tilenorm-bmz convert" in coupled.message


# ----------------------------------------------------------------------------------------------------
# tile-size sweep
# ----------------------------------------------------------------------------------------------------
def test_sweep_with_labels_and_without(tiny_unet_factory):
    img = blobs((96, 96))
    labels = np.stack([img[0] > 0.5, img[0] < -0.5])
    net = tiny_unet_factory(2, "batchrenorm").train()
    r = tile_size_sweep(net, img, labels, halo=HALO, tile_sizes=(32, 64, 80, 96, 200), device="cpu")
    assert all(m.training for m in net.modules())  # the tiled predictors' eval() is undone
    assert r.reference == "labels"
    assert [p.tile_shape for p in r.points] == [(64, 64), (80, 80), (96, 96)]
    assert len(r.skipped_sizes) == 2  # 32 < 2 * halo + divisor; 200 clipped to the image = 96
    for p in r.points:
        assert len(p.dice_to_labels) == 2 and p.score == p.dice_to_labels
        assert p.max_abs_diff_to_largest < 1e-5 and p.agreement_with_largest == [1.0, 1.0]
    inn = tiny_unet_factory(2, "instancenorm")
    r = tile_size_sweep(inn, img, halo=HALO, tile_sizes=(64, 96), device="cpu")
    assert r.reference == "largest tile" and r.points[0].dice_to_labels is None
    assert r.points[0].max_abs_diff_to_largest > 1e-3 and r.points[-1].max_abs_diff_to_largest == 0.0
    json.dumps(r.model_dump(mode="json"))


def test_sweep_uses_a_given_predictor_factory():
    img = blobs((64, 64))
    calls: list[tuple[int, ...]] = []

    def factory(tile_shape):
        calls.append(tile_shape)
        return lambda x: x * 0 + tile_shape[0] / 50  # 16 -> 0.32 (empty mask), 32 -> 0.64 (full mask)

    r = tile_size_sweep(
        torch.sigmoid, img, halo=0, tile_sizes=(16, 32), divisor=1, predictor_factory=factory, device="cpu"
    )
    assert set(calls) == {(16, 16), (32, 32)}
    assert r.points[0].max_abs_diff_to_largest == pytest.approx(0.32)
    assert r.points[0].agreement_with_largest == [0.0] and r.score_range == [1.0]
