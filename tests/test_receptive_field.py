"""Receptive field: analytic == numerical on known networks, coupling detection, halo recommendation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilenorm_bmz.models import UNet
from tilenorm_bmz.tiling import (
    RFReport,
    analytic_receptive_field,
    receptive_field,
    recommend_halo,
    round_halo,
    tile_coupling_layers,
)

from .conftest import randomize_norm_stats


def _conv_stack(n: int, dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [conv(1 if i == 0 else 3, 3, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers).eval()


class _Functional(nn.Module):
    """Convolutions applied in ``forward`` with functional ReLU: not analysable, measured numerically."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else 3, 3, 3, padding=1) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = F.relu(c(x))
        return x


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_stack_of_3x3_convolutions_has_rf_1_plus_2n(n):
    stack = _conv_stack(n)
    assert analytic_receptive_field(stack, 2) == ((n, n), (n, n))
    rf = receptive_field(stack, 2, n_samples=2)
    assert rf.numerical_left == rf.numerical_right == (n, n)
    assert rf.theoretical == (n, n) and rf.theoretical_size == (1 + 2 * n, 1 + 2 * n)
    assert rf.confirmed and rf.method == "analytic" and rf.recommended_halo == (n, n)
    functional = receptive_field(_Functional(n), 2, n_samples=4, in_channels=1)
    assert functional.method == "numerical" and functional.theoretical == (n, n)


def test_pooling_and_transposed_convolution_taps_are_counted():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.ConvTranspose2d(2, 2, 2, stride=2),
        nn.Conv2d(2, 1, 3, padding=1),
    )
    analytic = analytic_receptive_field(net, 2, divisor=2)
    # output 2m: last conv [2m-1, 2m+1] -> up-conv coarse [m-1, m] -> conv [m-2, m+1] -> pool [2m-4, 2m+3]
    # -> first conv [2m-5, 2m+4]: 5 left, 4 right; the odd phase mirrors it: 4 left, 5 right
    assert analytic == ((5, 5), (5, 5))
    rf = receptive_field(net, 2, divisor=2, n_samples=2)
    assert (rf.numerical_left, rf.numerical_right) == analytic and rf.confirmed


@pytest.mark.parametrize("depth, expected", [(1, 9), (2, 23), (3, 51)])
def test_unet_analytic_equals_numerical(depth, expected):
    net = randomize_norm_stats(UNet(dims=2, features=4, depth=depth, norm="batchrenorm")).eval()
    rf = receptive_field(net, 2, n_samples=2)
    assert rf.analytic_left == rf.analytic_right == (expected, expected)
    assert rf.numerical_left == rf.numerical_right == (expected, expected)
    assert rf.confirmed and not rf.normalization_couples_tile
    assert rf.recommended_halo == round_halo((expected,) * 2, (2**depth,) * 2)
    assert 2 * rf.recommended_halo[0] % 2**depth == 0 and rf.recommended_halo[0] >= expected


def test_anisotropic_3d_unet():
    net = UNet(dims=3, features=4, depth=2, norm="batchnorm", pool_factors=[(1, 2, 2), (1, 2, 2)]).eval()
    rf = receptive_field(net, 3, n_samples=1)
    assert rf.analytic_left == rf.numerical_left == (10, 23, 23) and rf.confirmed
    assert rf.divisor == (1, 4, 4) and rf.recommended_halo == (10, 24, 24)
    assert rf.log_gradient().shape == rf.input_shape[1:]


def test_round_halo_makes_twice_the_halo_a_multiple_of_the_divisor():
    assert round_halo((23, 23, 10), (4, 4, 1)) == (24, 24, 10)
    assert round_halo((21, 4), (8, 3)) == (24, 6)
    assert recommend_halo(UNet(dims=2, features=4, depth=2), 2) == (24, 24)


@pytest.mark.parametrize("norm", ["instancenorm", "groupnorm"])
def test_tile_wise_normalization_couples_the_tile(norm):
    net = UNet(dims=2, features=4, depth=2, norm=norm).eval()
    rf = receptive_field(net, 2, n_samples=2)
    assert rf.normalization_couples_tile
    assert {"instancenorm": "InstanceNorm2d", "groupnorm": "GroupNorm"}[norm] in (rf.coupling_reason or "")
    assert "reaches every input voxel" in (rf.coupling_reason or "")
    assert rf.theoretical == (23, 23)  # the local (convolutional) path is still reported


def test_batchnorm_couples_the_tile_only_in_train_mode():
    net = randomize_norm_stats(UNet(dims=2, features=4, depth=1, norm="batchnorm")).eval()
    assert not receptive_field(net, 2, n_samples=1).normalization_couples_tile
    train = receptive_field(net, 2, n_samples=1, train_norm=True)
    assert train.normalization_couples_tile and train.mode == "train"
    assert not net.training and all(not m.training for m in net.modules())  # the model is not modified
    no_stats = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False))
    assert tile_coupling_layers(no_stats)[0][0] == "1"


def test_torchscript_is_measured_numerically():
    scripted = torch.jit.script(
        randomize_norm_stats(UNet(dims=2, features=4, depth=1, norm="batchnorm")).eval()
    )
    rf = receptive_field(scripted, 2, divisor=2, n_samples=8)
    assert rf.method == "numerical" and rf.analytic_left is None
    assert rf.theoretical == (9, 9) and rf.recommended_halo == (9, 9)
    coupled = torch.jit.script(UNet(dims=2, features=4, depth=1, norm="instancenorm").eval())
    rf = receptive_field(coupled, 2, divisor=2, n_samples=1)
    assert rf.normalization_couples_tile and rf.theoretical is None and rf.method == "none"


def test_erf_is_inside_the_trf_and_uses_given_data():
    net = randomize_norm_stats(UNet(dims=2, features=4, depth=2, norm="batchrenorm")).eval()
    tiles = np.random.default_rng(0).random((3, 1, 80, 80)).astype(np.float32)
    rf = receptive_field(net, 2, n_samples=3, data=tiles)
    assert rf.data == "given"
    assert all(e95 <= e99 <= t for e95, e99, t in zip(rf.erf95, rf.erf99, rf.theoretical, strict=True))
    g = rf.mean_abs_gradient
    c = rf.input_shape[0] // 2 // 4 * 4
    assert g.shape == rf.input_shape and g[c, c] > 0 and g[0, 0] == 0  # zero outside the TRF
    with pytest.raises(ValueError, match="smaller than the measurement input"):
        receptive_field(net, 2, n_samples=1, data=tiles[:, :, :20, :20])


def test_report_round_trips_through_json():
    rf = receptive_field(_conv_stack(2), 2, n_samples=1)
    again = RFReport.model_validate_json(rf.model_dump_json())
    assert again.model_dump() == rf.model_dump() and again.mean_abs_gradient is None
    with pytest.raises(ValueError, match="carries no gradient image"):
        again.log_gradient()


class _ThirdPartyUNet(nn.Module):
    """A norm-free 2D U-Net as a third party writes it (4 max-poolings, nearest upsampling): not ours."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList(nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(4))
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.dec = nn.ModuleList(nn.Conv2d(8, 4, 3, padding=1) for _ in range(4))
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv in self.enc:
            x = torch.relu(conv(x))
            skips.append(x)
            x = self.pool(x)
        x = torch.relu(self.mid(x))
        for i, conv in enumerate(self.dec):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = torch.relu(conv(torch.cat([x, skips[len(skips) - 1 - i]], 1)))
        return self.out(x)


def test_a_torchscript_network_is_measured_with_the_package_step_as_divisor():
    # the package's size step (16) is a multiple of the network's own; every phase of it is measured and the
    # probe grows until the support is interior, so the step does not make the TRF unmeasurable
    torch.manual_seed(1)
    eager = _ThirdPartyUNet().eval()
    true = receptive_field(eager, 2, divisor=(16, 16)).theoretical  # the edited eager copy: the exact TRF
    scripted = torch.jit.script(eager)
    own = receptive_field(scripted, 2, divisor=(1, 1), n_samples=4)  # phase 0 only: sees less
    step = receptive_field(scripted, 2, divisor=(16, 16), n_samples=4)
    assert true is not None and min(true) >= 50  # 4 levels of 3x3 convolutions: a wide field
    assert step.theoretical is not None and own.theoretical is not None
    assert all(0.85 * t <= s <= t for s, t in zip(step.theoretical, true, strict=True))
    assert all(s >= o for s, o in zip(step.theoretical, own.theoretical, strict=True))
    assert step.recommended_halo[0] >= step.theoretical[0] and not step.normalization_couples_tile
    assert not any("reaches the border" in n for n in step.notes)
