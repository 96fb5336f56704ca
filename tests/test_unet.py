"""UNet construction, sizes, norm kinds, TorchScript."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilenorm_bmz.config import UNetConfig
from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm

KIND_TO_TYPE = {
    "batchrenorm": BatchRenorm,
    "batchnorm": nn.modules.batchnorm._BatchNorm,
    "instancenorm": nn.modules.instancenorm._InstanceNorm,
    "groupnorm": nn.GroupNorm,
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["batchrenorm", "batchnorm", "instancenorm", "groupnorm", "none"])
def test_shapes_and_norm_layers(dims: int, norm: str) -> None:
    net = UNet(dims=dims, in_channels=2, out_channels=3, depth=2, features=4, norm=norm).eval()
    x = torch.randn(1, 2, *([8] * dims))
    y = net(x)
    assert y.shape == (1, 3, *([8] * dims))
    n_norm = sum(isinstance(m, KIND_TO_TYPE.get(norm, ())) for m in net.modules()) if norm != "none" else 0
    assert n_norm == (10 if norm != "none" else 0)  # 2 per conv block, 5 blocks at depth 2
    assert net.norm_kind == norm


def test_paper_architecture_features() -> None:
    net = UNet(dims=3, depth=2, features=32)
    assert net.features == [32, 64, 128]
    assert net.divisor == (4, 4, 4)


def test_activations() -> None:
    x = torch.randn(1, 1, 8, 8)
    sig = UNet(dims=2, features=4, out_channels=2, final_activation="sigmoid").eval()(x)
    assert ((sig >= 0) & (sig <= 1)).all()
    soft = UNet(dims=2, features=4, out_channels=3, final_activation="softmax").eval()(x)
    torch.testing.assert_close(soft.sum(1), torch.ones(1, 8, 8))
    net = UNet(dims=2, features=4, out_channels=2, final_activation="none").eval()
    with torch.no_grad():
        net.head.bias.fill_(-5.0)
    assert (net(x) < 0).all()


def test_anisotropic_pooling_divisor_and_forward() -> None:
    net = UNet(dims=3, features=4, depth=2, pool_factors=[(1, 2, 2), (1, 2, 2)]).eval()
    assert net.divisor == (1, 4, 4)
    assert net(torch.randn(1, 1, 5, 8, 12)).shape == (1, 2, 5, 8, 12)


def test_bad_size_names_valid_sizes() -> None:
    net = UNet(dims=2, features=4, depth=3)
    with pytest.raises(ValueError, match=r"Y=30 \(use 24 or 32: a multiple of 8\)"):
        net(torch.randn(1, 1, 30, 32))


def test_bad_channels_and_rank() -> None:
    net = UNet(dims=3, features=4, in_channels=2)
    with pytest.raises(ValueError, match="2 input channel"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="expects input of shape"):
        net(torch.randn(1, 2, 8, 8))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet(dims=2, norm="layernorm")
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        UNet(dims=4)
    with pytest.raises(ValueError, match="pool_factors needs 2"):
        UNet(dims=2, depth=2, pool_factors=[2])


def test_from_config_equals_kwargs() -> None:
    cfg = UNetConfig(dims=2, in_channels=1, out_channels=2, depth=2, features=8, norm="groupnorm",
                     pool_factors=[2, (2, 2)], final_activation="none")
    net = UNet.from_config(cfg)
    assert net.divisor == cfg.divisor == (4, 4)
    again = UNet(**net.init_kwargs)
    assert [k for k in again.state_dict()] == [k for k in net.state_dict()]


@pytest.mark.parametrize("dims", [2, 3])
def test_torchscript_matches_eager_on_several_sizes(dims: int) -> None:
    net = UNet(dims=dims, features=4, norm="batchnorm").eval()
    scripted = torch.jit.script(net)
    for size in (8, 12, 16):
        for batch in (1, 2):
            x = torch.randn(batch, 1, *([size] * dims))
            torch.testing.assert_close(scripted(x), net(x))
