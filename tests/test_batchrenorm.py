"""BatchRenorm against nn.BatchNorm and the reference math of ARCHITECTURE.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilenorm_bmz.config import RenormSchedule
from tilenorm_bmz.norm import BatchRenorm, BatchRenorm1d, BatchRenorm3d


def reference_brn(x, weight, bias, running_mean, running_var, r_max, d_max, eps, momentum):
    """Ioffe 2017 written out literally (float64), returning y and the updated running statistics."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims)
    var = x.var(dims, unbiased=False)
    n = x.numel() // x.shape[1]
    sigma_b = torch.sqrt(var + eps)
    sigma_r = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_b / sigma_r, 1 / r_max, r_max).detach()
    d = torch.clamp((mu - running_mean) / sigma_r, -d_max, d_max).detach()
    xhat = (x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    y = weight.view(shape) * xhat + bias.view(shape)
    new_mean = running_mean + momentum * (mu.detach() - running_mean)
    new_var = running_var + momentum * (var.detach() * n / (n - 1) - running_var)
    return y, new_mean, new_var


def _pair(c: int = 5, dims: int = 3, seed: int = 0) -> tuple[nn.Module, BatchRenorm]:
    torch.manual_seed(seed)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c, momentum=0.01)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    brn = BatchRenorm(c, dims=dims)
    brn.load_state_dict(bn.state_dict())
    return bn, brn


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_equals_batchnorm_train_when_not_clipping(dims: int) -> None:
    bn, brn = _pair(dims=dims)
    x = torch.randn(3, 5, *([6] * dims)) * 2 + 0.7
    for _ in range(3):  # several steps: running statistics must track identically
        y_bn, y_brn = bn(x), brn(x)
        assert torch.equal(y_bn, y_brn)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-6, atol=1e-7)
    assert int(brn.num_batches_tracked) == int(bn.num_batches_tracked) == 3


def test_equals_batchnorm_in_eval() -> None:
    bn, brn = _pair()
    brn.set_renorm_limits(3.0, 5.0)
    bn.eval()
    brn.eval()
    x = torch.randn(2, 5, 7, 6, 5)
    assert torch.equal(bn(x), brn(x))


def test_reference_math_forward_and_gradients_when_clipping() -> None:
    torch.manual_seed(1)
    brn = BatchRenorm(4, dims=2, momentum=0.1)
    with torch.no_grad():
        brn.weight.uniform_(0.5, 1.5)
        brn.bias.uniform_(-0.5, 0.5)
        # running statistics far from the batch: r and d clip on every channel
        brn.running_mean.copy_(torch.tensor([3.0, -3.0, 0.5, 0.0]))
        brn.running_var.copy_(torch.tensor([0.05, 20.0, 1.0, 0.01]))
    brn.set_renorm_limits(1.5, 0.5)
    x = (torch.randn(2, 4, 9, 9) * 2).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w64 = brn.weight.detach().double().requires_grad_()
    b64 = brn.bias.detach().double().requires_grad_()
    rm, rv = brn.running_mean.double().clone(), brn.running_var.double().clone()

    y = brn(x)
    y_ref, m_ref, v_ref = reference_brn(x64, w64, b64, rm, rv, 1.5, 0.5, brn.eps, 0.1)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.running_mean.double(), m_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(brn.running_var.double(), v_ref, rtol=1e-6, atol=1e-6)

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(brn.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(brn.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)


def test_clipping_changes_output_only_when_limits_allow() -> None:
    bn, brn = _pair(dims=2)
    x = torch.randn(2, 5, 8, 8) * 3 + 2  # far from the running statistics
    y_plain = brn(x.clone())
    brn.load_state_dict(bn.state_dict())  # reset running statistics
    brn.set_renorm_limits(3.0, 5.0)
    y_renorm = brn(x.clone())
    assert not torch.allclose(y_plain, y_renorm)


def test_running_stats_use_old_values_for_r_and_d() -> None:
    # With momentum 1 the running stats become the batch stats; if r, d were computed after the
    # update they would be exactly 1 and 0 and the output would equal plain batch norm.
    torch.manual_seed(2)
    brn = BatchRenorm(3, dims=2, momentum=1.0)
    brn.set_renorm_limits(3.0, 5.0)
    x = torch.randn(2, 3, 6, 6) * 2 + 1
    y = brn(x)
    plain = nn.functional.batch_norm(x, None, None, brn.weight, brn.bias, True, 0.0, brn.eps)
    assert not torch.allclose(y, plain)


def test_batch_size_one_and_constant_channel_are_finite() -> None:
    brn = BatchRenorm3d(2)
    brn.set_renorm_limits(3.0, 5.0)
    x = torch.zeros(1, 2, 4, 4, 4)
    x[:, 1] = torch.randn(4, 4, 4)
    y = brn(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(brn.weight.grad).all()
    assert torch.isfinite(brn.running_var).all() and torch.isfinite(brn.running_mean).all()


def test_single_value_per_channel_is_a_clear_error() -> None:
    brn = BatchRenorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        brn(torch.randn(1, 3))


def test_wrong_input_rank_and_channels() -> None:
    brn = BatchRenorm(4, dims=3)
    with pytest.raises(ValueError, match="5 dimensions"):
        brn(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="4 channels"):
        brn(torch.randn(2, 3, 4, 4, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_in_float32_under_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, 6) * 100 + 1000  # large offset: half-precision statistics would be wrong
    ref = BatchRenorm(4, dims=2, momentum=0.5)
    brn = BatchRenorm(4, dims=2, momentum=0.5)
    ref(x)
    with torch.autocast("cpu", dtype=dtype):
        y = brn(x.to(dtype))
    assert brn.running_mean.dtype == torch.float32 and brn.running_var.dtype == torch.float32
    torch.testing.assert_close(brn.running_mean, ref.running_mean, rtol=1e-2, atol=0.0)
    torch.testing.assert_close(brn.running_var, ref.running_var, rtol=5e-2, atol=0.0)
    assert torch.isfinite(y).all()


def test_limits_live_in_the_state_dict_and_can_be_set() -> None:
    brn = BatchRenorm(3, dims=2)
    brn.r_max = 2.5
    brn.d_max = 4.0
    state = brn.state_dict()
    assert float(state["r_max"]) == 2.5 and float(state["d_max"]) == 4.0
    other = BatchRenorm(3, dims=2)
    other.load_state_dict(state)
    assert float(other.r_max) == 2.5 and float(other.d_max) == 4.0
    with pytest.raises(ValueError, match="r_max"):
        brn.r_max = 0.5
    with pytest.raises(ValueError, match="d_max"):
        brn.set_renorm_limits(2.0, -1.0)


def test_batchnorm_state_dict_loads_strictly() -> None:
    bn, _ = _pair(dims=2)
    brn = BatchRenorm(5, dims=2)
    brn.set_renorm_limits(2.0, 1.0)
    state = bn.state_dict()
    keys = set(state)
    brn.load_state_dict(state, strict=True)
    assert set(state) == keys  # the caller's dict is not modified
    assert float(brn.r_max) == 2.0  # limits kept
    torch.testing.assert_close(brn.running_var, bn.running_var)


def test_cumulative_average_when_momentum_none() -> None:
    brn = BatchRenorm(2, dims=2, momentum=None)
    bn = nn.BatchNorm2d(2, momentum=None)
    for i in range(4):
        x = torch.randn(2, 2, 5, 5) + i
        bn(x)
        brn(x)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-6, atol=1e-7)


def test_schedule_limits_and_apply() -> None:
    s = RenormSchedule(warmup_steps=100, ramp_steps=1000, r_max=3.0, d_max=5.0)
    assert s.limits(0) == (1.0, 0.0)
    assert s.limits(99) == (1.0, 0.0)
    assert s.limits(100) == (1.0, 0.0)
    assert s.limits(600) == pytest.approx((2.0, 2.5))
    assert s.limits(1100) == pytest.approx((3.0, 5.0))
    assert s.limits(10**6) == pytest.approx((3.0, 5.0))
    assert RenormSchedule(warmup_steps=0, ramp_steps=0).limits(0) == (3.0, 5.0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), BatchRenorm(3, dims=2), nn.Sequential(BatchRenorm(3, dims=2)))
    assert s.apply(model, 600) == pytest.approx((2.0, 2.5))
    for m in model.modules():
        if isinstance(m, BatchRenorm):
            assert float(m.r_max) == pytest.approx(2.0) and float(m.d_max) == pytest.approx(2.5)


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e4])
def test_batch_statistics_are_accurate_for_any_offset(offset: float) -> None:
    # the fast CPU statistics path must fall back to the exact form when the mean dwarfs the spread
    torch.manual_seed(4)
    x = torch.randn(2, 3, 7, 7, 7) * 0.5 + offset
    brn = BatchRenorm(3, dims=3, momentum=1.0)
    brn(x)
    x64 = x.double()
    torch.testing.assert_close(brn.running_mean.double(), x64.mean((0, 2, 3, 4)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(brn.running_var.double(), x64.var((0, 2, 3, 4), unbiased=True), rtol=1e-4, atol=0)
