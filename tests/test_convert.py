"""convert_norm / calibrate_norm on our UNet and on hand-written networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm, calibrate_norm, convert_norm

from .conftest import randomize_norm_stats


class HandWritten(nn.Module):
    """A foreign network: norm before conv (torch-em style), GroupNorm, LayerNorm and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm3d(8, affine=False)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv3d(8, 2, 1)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        return self.conv2(self.drop(torch.relu(self.inorm(self.gn(self.conv1(x))))))


@pytest.mark.parametrize("dims", [2, 3])
def test_batchnorm_unet_conversion_is_bit_identical_in_eval(dims: int) -> None:
    net = randomize_norm_stats(UNet(dims=dims, features=4, norm="batchnorm")).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 1, *([16] * dims))
    y = net(x)
    conv, report = convert_norm(net, to="batchrenorm")
    assert conv is not net
    assert len(report.converted) == 10 and not report.skipped and not report.needs_calibration
    assert all(c.statistics == "carried" for c in report.converted)
    assert torch.equal(conv(x), y)
    # every original value is carried over unchanged; the original model is untouched
    state = conv.state_dict()
    for k, v in before.items():
        assert torch.equal(state[k], v), k
        assert torch.equal(net.state_dict()[k], v), k
    assert {"r_max", "d_max"} <= {k.rsplit(".", 1)[-1] for k in state}


def test_reverse_conversion_for_export_is_identical() -> None:
    net = randomize_norm_stats(UNet(dims=3, features=4, norm="batchrenorm"))
    for m in net.modules():
        if isinstance(m, BatchRenorm):
            m.set_renorm_limits(3.0, 5.0)
    net.eval()
    x = torch.randn(1, 1, 12, 12, 12)
    exported, _ = convert_norm(net, to="batchnorm")
    assert not any(isinstance(m, BatchRenorm) for m in exported.modules())
    assert sum(isinstance(m, nn.BatchNorm3d) for m in exported.modules()) == 10
    assert torch.equal(exported(x), net(x))
    # a plain BatchNorm state dict (no r_max/d_max) loads back into a BatchRenorm UNet
    back = UNet(dims=3, features=4, norm="batchrenorm")
    back.load_state_dict(exported.state_dict(), strict=True)
    assert torch.equal(back.eval()(x), net(x))


def test_foreign_network_with_instance_group_and_layer_norm() -> None:
    net = HandWritten()
    conv, report = convert_norm(net)
    by_name = {c.name: c for c in report.converted}
    assert set(by_name) == {"gn", "inorm"}
    assert by_name["gn"].statistics == "initialized" and by_name["gn"].affine == "carried"
    assert by_name["inorm"].affine == "identity" and by_name["inorm"].dims == 3
    assert by_name["gn"].dims == 3  # inferred from the preceding Conv3d
    assert [s.name for s in report.skipped] == ["ln"]
    assert report.needs_calibration
    torch.testing.assert_close(conv.gn.weight, net.gn.weight)
    assert isinstance(net.gn, nn.GroupNorm)  # copy by default
    convert_norm(net, inplace=True)
    assert isinstance(net.gn, BatchRenorm)


def test_instancenorm_with_running_stats_carries_them() -> None:
    seq = nn.Sequential(nn.Conv2d(1, 3, 3), nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    seq.train()
    seq(torch.randn(4, 1, 10, 10) * 3)
    _, report = convert_norm(seq, inplace=True)
    assert report.converted[0].statistics == "carried"


def test_calibration_recovers_population_statistics_and_restores_state() -> None:
    net = HandWritten()
    convert_norm(net, inplace=True)
    net.gn.set_renorm_limits(3.0, 5.0)
    net.eval()
    torch.manual_seed(0)
    batches = [torch.randn(1, 1, 8, 8, 8) * 2 + 1 for _ in range(5)]
    n = calibrate_norm(net, batches)
    assert n == 5
    # expected: cumulative average of the per-batch statistics of the gn input
    with torch.no_grad():
        feats = [net.conv1(b) for b in batches]
    means = torch.stack([f.mean((0, 2, 3, 4)) for f in feats]).mean(0)
    variances = torch.stack([f.var((0, 2, 3, 4), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net.gn.running_mean, means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.gn.running_var, variances, rtol=1e-4, atol=1e-5)
    assert float(net.gn.r_max) == 3.0 and float(net.gn.d_max) == 5.0 and net.gn.momentum == 0.01
    assert not net.training and not net.drop.training and not net.gn.training


def test_calibration_keeps_dropout_off() -> None:
    net = HandWritten()
    convert_norm(net, inplace=True)
    net.drop.p = 1.0  # if dropout ran, the second conv would see zeros only
    seen = []
    net.conv2.register_forward_hook(lambda m, i, o: seen.append(i[0].abs().sum().item()))
    calibrate_norm(net, [torch.randn(1, 1, 6, 6, 6)])
    assert seen and seen[0] > 0


def test_calibrate_without_batchrenorm_is_an_error() -> None:
    with pytest.raises(ValueError, match="no BatchRenorm"):
        calibrate_norm(nn.Sequential(nn.Conv2d(1, 1, 3)), [torch.randn(1, 1, 4, 4)])


def test_convert_rejects_bad_target() -> None:
    with pytest.raises(ValueError, match="to must be"):
        convert_norm(nn.Sequential(), to="layernorm")  # type: ignore[arg-type]
