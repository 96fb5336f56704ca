"""The measurements behind the gate's verdicts on other people's networks: receptive fields of networks of any
kind (softmax heads, a divisor that is not the network's own, ONNX without gradients), tile mismatch with fixed
tiles, regression outputs, deepImageJ's tiles."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilenorm_bmz.bmz.consumers import DEEPIMAGEJ_MAX_PIXELS, deepimagej_tile_shape
from tilenorm_bmz.metrics import mismatch_geometry, tile_mismatch, train_eval_disparity
from tilenorm_bmz.tiling import receptive_field


class _TwoLevel(nn.Module):
    """A hand-written encoder/decoder (pools twice, so its own divisor is 4) ending in a softmax over channels."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.d2, self.d1, self.head = nn.Conv2d(32, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.bn = nn.BatchNorm2d(8) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.c1(x)))
        b = F.relu(self.c2(F.max_pool2d(a, 2)))
        c = F.relu(self.c4(F.relu(self.c3(F.max_pool2d(b, 2)))))
        d = F.relu(self.d2(torch.cat([F.interpolate(c, scale_factor=2.0, mode="nearest"), b], 1)))
        e = F.relu(self.d1(torch.cat([F.interpolate(d, scale_factor=2.0, mode="nearest"), a], 1)))
        return torch.softmax(self.head(e), dim=1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _TwoLevel().eval()


def test_a_softmax_head_does_not_hide_the_receptive_field():
    """The channels of a softmax sum to 1 everywhere: the gradient of their plain sum is zero."""
    rf = receptive_field(_net(), 2, divisor=(4, 4), in_channels=1, n_samples=2)
    assert rf.theoretical == (17, 17)


@pytest.mark.parametrize("divisor", [(1, 1), (4, 4), (16, 16)])
def test_the_receptive_field_does_not_depend_on_the_declared_divisor(divisor):
    """A package's size step need not be the network's own divisor; the TRF is the same whatever is declared, for
    the network as written, traced and scripted."""
    traced = torch.jit.trace(_net(), torch.rand(1, 1, 64, 64))
    scripted = torch.jit.script(_net())
    for model in (_net(), traced, scripted):
        rf = receptive_field(model, 2, divisor=divisor, in_channels=1, n_samples=2)
        assert rf.theoretical == (17, 17), (type(model).__name__, divisor, rf.notes)


def test_onnx_weights_are_measured_by_their_impulse_response():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tilenorm_bmz.bmz.package_io import OnnxNetwork

    buf = io.BytesIO()
    with pytest.warns(DeprecationWarning):  # the TorchScript-based exporter, as the fixture's generator uses
        torch.onnx.export(_net(), torch.rand(1, 1, 64, 64), buf, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b", 2: "y", 3: "x"}})
    onnx_net = OnnxNetwork(buf.getvalue(), "test.onnx")
    x = torch.rand(1, 1, 96, 64)
    assert torch.allclose(onnx_net(x), _net()(x), atol=1e-5)
    rf = receptive_field(onnx_net, 2, divisor=(16, 16), in_channels=1, n_samples=2)
    assert rf.theoretical == (17, 17) and any("impulse response" in n for n in rf.notes)
    with pytest.raises(TypeError):  # tracing an onnxruntime session (torch.fx) is refused, not crashed
        torch.fx.symbolic_trace(onnx_net)


def test_fixed_tiles_keep_their_shape_and_only_the_offset_adapts():
    g = mismatch_geometry((384, 256), halo=0, divisor=4, tile_shape=(256, 256))
    assert g.tile_shape == (256, 256) and g.long_axis == 0 and g.offset == 128 and g.valid == (128, 256)
    g = mismatch_geometry((300, 256), halo=16, divisor=4, tile_shape=(256, 256))
    assert g.tile_shape == (256, 256) and g.offset == 44 and g.valid == (60, 240) and g.adjustments
    with pytest.raises(ValueError, match=r"exactly 256x256.*at least 260"):
        mismatch_geometry((256, 256), halo=0, divisor=4, tile_shape=(256, 256))
    with pytest.raises(ValueError, match="at least"):
        mismatch_geometry((384, 200), halo=0, divisor=4, tile_shape=(256, 256))


def test_tile_mismatch_with_fixed_tiles_runs_the_network_at_its_size_only():
    seen: set[tuple[int, ...]] = set()
    net = _net()

    def fixed_only(x: torch.Tensor) -> torch.Tensor:
        seen.add(tuple(x.shape[2:]))
        return net(x)

    img = np.random.default_rng(0).random((1, 160, 96), dtype=np.float32)
    r = tile_mismatch(fixed_only, img, halo=20, divisor=4, tile_shape=(96, 96), max_crops=2)
    assert seen == {(96, 96)} and r.max_dist == 0.0


def test_regression_outputs_are_compared_relative_to_their_range():
    torch.manual_seed(0)
    net = _TwoLevel(norm=True)
    with torch.no_grad():
        net.bn.running_mean.add_(0.5)
    scaled = nn.Sequential(net, nn.Conv2d(2, 1, 1)).eval()
    with torch.no_grad():
        scaled[1].weight.copy_(torch.tensor([500.0, 0.0]).view(1, 2, 1, 1))  # a denoiser's scale: hundreds
    img = np.random.default_rng(0).random((1, 96, 96), dtype=np.float32)
    prob = train_eval_disparity(scaled, img, n_tiles=2, tile_shape=48, device="cpu")
    reg = train_eval_disparity(scaled, img, n_tiles=2, tile_shape=48, device="cpu", output="regression")
    assert reg.output == "regression" and reg.applicable
    assert reg.disparity[0] > 0 and reg.disparity != prob.disparity
    assert len(reg.per_tile) == 2 and all(0 <= v[0] for v in reg.per_tile)
    # tile mismatch of a seamed regression network: the relative value is the raw one over the range
    r = tile_mismatch(scaled, img, halo=0, tile=64, offset=32, divisor=4)
    assert r.output_range is not None and r.output_range[0] > 1
    assert r.relative_max_dist == pytest.approx(r.max_dist / r.output_range[0])


def test_deepimagej_tiles_reach_the_image_plus_halo_rounded_down_to_the_step():
    assert deepimagej_tile_shape((300, 200), (32, 32), (16, 16), (8, 8)) == (304, 208)
    assert deepimagej_tile_shape((384, 416), (256, 256), (0, 0), (16, 16)) == (256, 256)  # fixed: as it is
    big = deepimagej_tile_shape((20000, 20000), (32, 32), (16, 16), (0, 0))
    assert np.prod(big) <= DEEPIMAGEJ_MAX_PIXELS


def test_outputs_on_another_grid_map_losslessly_onto_the_input_grid():
    from tilenorm_bmz.bmz.subject import to_input_grid

    coarse = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    up = to_input_grid(coarse, (-2, -2))  # half resolution: each voxel repeated 2 x 2 times
    assert up.shape == (1, 2, 6, 8) and torch.equal(up[:, :, ::2, ::2], coarse)
    assert np.array_equal(to_input_grid(coarse.numpy(), (-2, -2)), up.numpy())
    fine = torch.arange(1 * 1 * 6 * 4, dtype=torch.float32).reshape(1, 1, 6, 4)
    depth = to_input_grid(fine, (3, 1))  # three times finer in y: runs of 3 voxels become 3 channels
    assert depth.shape == (1, 3, 2, 4)
    assert sorted(depth.flatten().tolist()) == sorted(fine.flatten().tolist())  # nothing lost
    assert torch.equal(depth[0, :, 0, 0], fine[0, 0, 0:3, 0])
    assert np.array_equal(to_input_grid(fine.numpy(), (3, 1)), depth.numpy())


def test_metrics_take_one_run_context_and_keyword_overrides():
    from tilenorm_bmz.metrics import RunContext, run_context

    ctx = RunContext(device="cpu", batch_size=3, divisor=4, threshold=0.3)
    assert run_context(ctx, {"threshold": 0.7}).threshold == 0.7 and run_context(ctx, {}) is ctx
    with pytest.raises(TypeError, match="unexpected keyword"):
        run_context(ctx, {"devcie": "cpu"})
    img = np.random.default_rng(0).random((1, 96, 128), dtype=np.float32)
    a = tile_mismatch(_net(), img, halo=8, tile=64, offset=32, context=ctx)
    b = tile_mismatch(_net(), img, halo=8, tile=64, offset=32, device="cpu", batch_size=3, divisor=4, threshold=0.3)
    assert a.batch_size == b.batch_size == 3 and a.threshold == b.threshold == 0.3 and a.max_dist == b.max_dist
    assert a.geometry.divisor == (4, 4)
