"""BatchRenorm limits come from the layers (export and read back, for any BatchRenorm network), and a disparity
caused by data far from the training statistics is named as such."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tilenorm_bmz.bmz import export_package, read_package_model
from tilenorm_bmz.checkpoint import save_checkpoint
from tilenorm_bmz.config import RenormSchedule
from tilenorm_bmz.metrics import train_eval_disparity
from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm, calibrate_norm, renorm_limits
from tilenorm_bmz.report.checks import DATA_SHIFT_CLIPPED, check_disparity

from .conftest import randomize_norm_stats
from .test_bmz_export import CFG, blobs


@pytest.mark.bmz
def test_limits_set_without_our_trainer_survive_export_and_read(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = randomize_norm_stats(UNet(dims=2, features=4, depth=2, norm="batchrenorm")).eval()
    RenormSchedule(warmup_steps=10, ramp_steps=20).apply(net, 20)  # a schedule of one's own, mid-ramp
    layers = [m for m in net.modules() if isinstance(m, BatchRenorm)]
    layers[0].set_renorm_limits(2.5, 4.0)  # and one layer set by hand
    expected = renorm_limits(net)
    assert len(set(expected.values())) == 2
    ckpt = save_checkpoint(tmp_path / "own.pt", net)  # no schedule, no step, no trainer metadata
    result = export_package(ckpt, tmp_path / "own.zip", export_config=CFG, sample=blobs((64, 64)), test=False)
    back, _, extra = read_package_model(result.package)
    assert renorm_limits(back) == expected
    assert extra["renorm"]["source"] == "layers" and extra["renorm"]["r_max"] == 2.5
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():  # eval mode is unchanged by the limits
        torch.testing.assert_close(back.eval()(x), net.eval()(x))


def test_a_data_shift_is_named_apart_from_wrong_running_statistics() -> None:
    torch.manual_seed(0)
    net = UNet(dims=2, features=4, depth=2, norm="batchrenorm").eval()
    for m in net.modules():
        if isinstance(m, BatchRenorm):
            m.set_renorm_limits(3.0, 5.0)
    rng = np.random.default_rng(0)
    like_training = rng.normal(0.5, 0.2, (1, 96, 96)).astype("float32")
    tiles = [torch.from_numpy(like_training[:, i:i + 64, j:j + 64].copy())[None] for i in (0, 32) for j in (0, 32)]
    calibrate_norm(net, tiles)  # running statistics from data like the training data
    at_home = train_eval_disparity(net, like_training, n_tiles=2, tile_shape=64, device="cpu")
    shifted = train_eval_disparity(net, like_training * 40 + 300, n_tiles=2, tile_shape=64, device="cpu")
    assert at_home.renorm_clipped is not None and shifted.renorm_clipped is not None
    # trained with these limits, data like the training data never needs more correction than they allow
    assert max(at_home.renorm_clipped) == 0.0
    assert min(shifted.renorm_clipped) >= DATA_SHIFT_CLIPPED
    check = check_disparity(shifted, max_disparity=0.0)
    assert "data shift" in check.advice and "outside the training statistics" in check.advice
    wrong_stats = shifted.model_copy(update={"renorm_clipped": [0.0, 0.0]})
    advice = check_disparity(wrong_stats, max_disparity=0.0).advice
    assert "running statistics do not match" in advice and "data shift" not in advice
