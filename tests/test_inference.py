"""Inference preparation: concatenations split out of convolutions, channels-last weights; same outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilenorm_bmz.models import UNet
from tilenorm_bmz.tiling import TiledPredictor, forward_whole, recommend_halo
from tilenorm_bmz.tiling.inference import layout_of, prepare_for_inference, split_concatenations
from tilenorm_bmz.tiling.memory import peak_forward_bytes

from .conftest import randomize_norm_stats

CPU = torch.device("cpu")


def _unet(dims: int, depth: int = 2) -> UNet:
    net = UNet(dims=dims, in_channels=1, out_channels=2, depth=depth, features=4, norm="batchrenorm")
    return randomize_norm_stats(net).eval()


@pytest.mark.parametrize(("dims", "depth"), [(2, 3), (3, 2)])
def test_our_unet_is_split_and_channels_last_with_the_same_outputs(dims: int, depth: int) -> None:
    net = _unet(dims, depth)
    x = torch.rand(2, 1, *(48,) * dims)
    with torch.inference_mode():
        expected = net(x)
    prepared = prepare_for_inference(net, dims, 1, net.divisor, CPU)
    assert prepared.split == depth  # one concatenation per decoder level
    assert prepared.layout == "channels-last" == layout_of(prepared.module, dims)
    with torch.inference_mode():
        got = prepared.module(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert "concatenation" in prepared.describe()


def test_prepared_3d_unet_needs_less_memory() -> None:
    net = UNet(dims=3, in_channels=1, out_channels=2, depth=2, features=16, norm="batchrenorm").eval()
    shape = (1, 1, 96, 96, 96)  # measured: 340 -> 196 bytes/voxel
    given, _, _ = peak_forward_bytes(net, shape, "cpu")
    prepared = prepare_for_inference(net, 3, 1, net.divisor, CPU).module
    peak, _, _ = peak_forward_bytes(prepared, shape, "cpu")
    assert peak < 0.8 * given  # the concatenated tensor and the layout reorders are gone


class WeightStandardized(nn.Module):
    """A convolution that standardizes its weight with ``view`` (contiguous weights assumed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        flat = w.view(w.shape[0], -1)
        w = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view(w.shape)
        return F.conv2d(x, w, self.conv.bias, padding=1)


def test_a_network_that_breaks_in_channels_last_keeps_its_layout() -> None:
    net = WeightStandardized().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
    prepared = prepare_for_inference(net, 2, 3, (1, 1), CPU)
    assert prepared.layout == "contiguous" and "kept contiguous" in prepared.note
    assert net.conv.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(prepared.module(x), expected)


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it; the network runs as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if float(y.mean()) > 1e9:
            y = -y
        return self.b(torch.cat([y, y * 2], dim=1))


def test_untraceable_and_torchscript_networks_run_as_they_are_in_channels_last() -> None:
    x = torch.rand(1, 1, 32, 32)
    scripted = torch.jit.script(UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4, norm="batchnorm"))
    for net in (DataDependent().eval(), scripted.eval()):
        with torch.no_grad():
            expected = net(x)
        prepared = prepare_for_inference(net, 2, 1, (4, 4), CPU)
        assert prepared.split == 0 and prepared.module is net
        with torch.no_grad():
            assert torch.allclose(prepared.module(x), expected, atol=1e-5)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.fx raises on control flow
        split_concatenations(DataDependent(), x)


def test_tiled_equals_whole_for_the_prepared_network_and_optimize_false_leaves_the_model() -> None:
    net = _unet(3)
    plain = copy.deepcopy(net)
    image = np.random.default_rng(0).normal(size=(1, 70, 52, 61)).astype(np.float32)
    halo = recommend_halo(net, 3)
    tile = tuple(2 * h + 8 for h in halo)
    tiled = TiledPredictor(net, tile, halo, device="cpu").predict(image)
    whole = forward_whole(net, image, device="cpu")
    assert np.abs(tiled - whole).max() <= 1e-6  # float rounding: oneDNN's kernels vary with the tile shape
    TiledPredictor(plain, tile, halo, device="cpu", optimize=False).predict(image)
    assert layout_of(plain, 3) == "contiguous"
    assert np.allclose(forward_whole(plain, image, device="cpu", optimize=False), whole, atol=1e-5)
