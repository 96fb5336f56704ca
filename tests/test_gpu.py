"""CUDA paths (run where a GPU is present: `pytest -m gpu`). Each compares against the CPU result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm
from tilenorm_bmz.tiling import TiledPredictor
from tilenorm_bmz.tiling.predictor import forward_whole

from .conftest import randomize_norm_stats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_batchrenorm_cuda_statistics_match_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 10, 11) * 3 + 5
    cpu = BatchRenorm(6, dims=3, momentum=0.3)
    gpu = BatchRenorm(6, dims=3, momentum=0.3).cuda()
    for m in (cpu, gpu):
        m.set_renorm_limits(2.0, 1.0)
    y_cpu = cpu(x)
    y_gpu = gpu(x.cuda())
    torch.testing.assert_close(gpu.running_mean.cpu(), cpu.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchrenorm_autocast_keeps_float32_statistics(dtype) -> None:
    torch.manual_seed(1)
    x = (torch.randn(2, 4, 16, 16) * 50 + 2000).cuda()
    ref = BatchRenorm(4, dims=2, momentum=0.5).cuda()
    amp = BatchRenorm(4, dims=2, momentum=0.5).cuda()
    ref(x)
    with torch.autocast("cuda", dtype=dtype):
        y = amp(x.to(dtype))
    assert amp.running_var.dtype == torch.float32
    torch.testing.assert_close(amp.running_mean, ref.running_mean, rtol=1e-2, atol=0.0)
    torch.testing.assert_close(amp.running_var, ref.running_var, rtol=5e-2, atol=0.0)
    assert torch.isfinite(y).all()
    y.float().sum().backward()


def test_tiled_equals_whole_on_cuda() -> None:
    net = randomize_norm_stats(UNet(dims=3, features=4, norm="batchrenorm")).eval()
    image = np.random.default_rng(0).random((1, 40, 52, 44), dtype=np.float32)
    tiled = TiledPredictor(net, (32, 32, 32), 12, batch_size=2, device="cuda").predict(image)
    whole = forward_whole(net, image, device="cuda")
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)
    cpu = forward_whole(net, image, device="cpu")
    np.testing.assert_allclose(whole, cpu, rtol=1e-3, atol=1e-4)


def test_training_step_with_bf16_autocast(tmp_path) -> None:
    from tilenorm_bmz.config import TrainConfig
    from tilenorm_bmz.train import Trainer

    cfg = TrainConfig.model_validate({
        "model": {"dims": 2, "features": 4},
        "data": {"sample": "synthetic", "tile_shape": [64, 64], "synthetic": {"shape": [128, 160]}},
        "schedule": {"warmup_steps": 1, "ramp_steps": 1},
        "steps": 3, "batch_size": 2, "grad_accumulation": 1, "validate_every": 3, "device": "cuda", "amp": "bf16",
    })
    result = Trainer(cfg, tmp_path / "run").fit()
    assert result.step == 3 and all(np.isfinite(h.loss) for h in result.history)
