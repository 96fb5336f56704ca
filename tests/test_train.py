"""Training loop: loss goes down, exact resume, Ctrl-C, schedule, configs and CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from tilenorm_bmz.checkpoint import load_checkpoint, save_checkpoint
from tilenorm_bmz.cli import app
from tilenorm_bmz.config import TrainConfig
from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm
from tilenorm_bmz.train import Trainer, dice_loss, example_config, example_yaml

runner = CliRunner()


def tiny_config(dims: int = 2, **overrides) -> TrainConfig:
    tile = [32, 32] if dims == 2 else [16, 16, 16]
    shape = [96, 96] if dims == 2 else [32, 48, 48]
    data = {"sample": "synthetic", "tile_shape": tile, "synthetic": {"shape": shape, "seed": 1}}
    cfg = {
        "model": {"dims": dims, "features": 4, "depth": 2},
        "data": data,
        "schedule": {"warmup_steps": 3, "ramp_steps": 3},
        "steps": 6,
        "batch_size": 2,
        "grad_accumulation": 1,
        "validate_every": 3,
        "checkpoint_every": 3,
        "lr": 0.01,
        "device": "cpu",
        "disparity_tiles": 2,
    }
    cfg.update(overrides)
    return TrainConfig.model_validate(cfg)


def _states_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dice_loss_skips_empty_channels() -> None:
    p = torch.full((1, 2, 4, 4), 0.5)
    t = torch.zeros(1, 2, 4, 4)
    t[0, 0, :2] = 1
    loss = dice_loss(p, t)
    expected = 1 - (2 * 4 + 1e-6) / (8 + 8 + 1e-6)  # only channel 0 counts
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(dice_loss(p, torch.zeros_like(t))) == pytest.approx(0.5)  # all empty: mean prediction
    assert float(dice_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_loss_goes_down(tmp_path, dims) -> None:
    cfg = tiny_config(dims, steps=40 if dims == 2 else 25, validate_every=100, checkpoint_every=100,
                      disparity_tiles=0, schedule={"warmup_steps": 100})
    result = Trainer(cfg, tmp_path / "run").fit()
    losses = [h.loss for h in result.history]
    assert len(losses) == cfg.steps
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.02
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "curves.png").exists()
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == cfg.steps and rows[-1]["val_dice_foreground"] != ""


def test_schedule_follows_the_global_step(tmp_path) -> None:
    cfg = tiny_config(2, steps=8, validate_every=100, checkpoint_every=100, disparity_tiles=0,
                      grad_accumulation=2)
    result = Trainer(cfg, tmp_path / "run").fit()
    limits = [v for h in result.history for v in (h.r_max, h.d_max)]
    expected = [v for s in range(8) for v in cfg.schedule.limits(s)]
    assert limits == pytest.approx(expected)
    model, info = load_checkpoint(result.last)
    assert info.step == 8 and info.schedule == cfg.schedule
    # the limits of the last step travel with the checkpoint
    assert all(float(m.r_max) == 3.0 for m in model.modules() if isinstance(m, BatchRenorm))


def test_resume_is_exact(tmp_path) -> None:
    cfg = tiny_config(2, steps=6)
    straight = Trainer(cfg, tmp_path / "a")
    straight.fit()
    half = Trainer(cfg, tmp_path / "b")
    half.fit(3)
    resumed = Trainer.resume(tmp_path / "b" / "last.pt")
    assert resumed.step == 3
    resumed.fit()
    assert _states_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.data.train.state_dict() == resumed.data.train.state_dict()
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    with open(tmp_path / "b" / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 7))


def test_ctrl_c_saves_the_last_completed_step_and_resumes_exactly(tmp_path) -> None:
    cfg = tiny_config(2, steps=6, checkpoint_every=100)
    straight = Trainer(cfg, tmp_path / "a")
    straight.fit()
    t = Trainer(cfg, tmp_path / "b")
    real_step = t.train_step
    calls = {"n": 0}

    def interrupting_step() -> float:
        calls["n"] += 1
        if calls["n"] == 4:
            t.data.train.batch(cfg.batch_size)  # data consumed and buffers touched before the interrupt
            t.model.train()(torch.randn(2, 1, 32, 32))
            raise KeyboardInterrupt
        return real_step()

    t.train_step = interrupting_step  # type: ignore[method-assign]
    result = t.fit()
    assert result.interrupted and result.step == 3
    _, info = load_checkpoint(tmp_path / "b" / "last.pt")
    assert info.step == 3
    before = info.extra["train_seconds"]  # the time spent survives the interruption
    assert before > 0
    resumed = Trainer.resume(tmp_path / "b" / "last.pt")
    resumed.fit()
    assert _states_equal(straight.model.state_dict(), resumed.model.state_dict())
    _, info = load_checkpoint(tmp_path / "b" / "last.pt")
    assert info.extra["train_seconds"] > before


def test_other_norm_kinds_train(tmp_path) -> None:
    for norm in ("batchnorm", "instancenorm", "groupnorm", "none"):
        cfg = tiny_config(2, steps=2, validate_every=2, checkpoint_every=2,
                          model={"dims": 2, "features": 4, "depth": 2, "norm": norm})
        result = Trainer(cfg, tmp_path / norm).fit()
        _, info = load_checkpoint(result.last)
        assert info.norm_kind == norm
        assert info.schedule is None if norm != "batchrenorm" else True
        assert set(result.history[-1].val_dice) == {"foreground", "boundary"}


def test_checkpoint_records_data_for_packaging(tmp_path) -> None:
    result = Trainer(tiny_config(2, steps=3), tmp_path / "r").fit()
    _, info = load_checkpoint(result.last)
    assert info.extra["input_normalization"]["mode"] == "global"
    assert info.extra["channel_names"] == ["foreground", "boundary"]
    (val,) = info.extra["validation_data"]
    assert val["sample"] == "synthetic" and val["region"][0] == [0, 96]
    assert TrainConfig.model_validate(info.extra["train_config"]) == tiny_config(2, steps=3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"sample": "synthetic", "tile_shape": [30, 32]}}, r"not a multiple of the network's divisor"),
        ({"model": {"dims": 2, "features": 4, "out_channels": 3}}, "out_channels is 3"),
        ({"model": {"dims": 3, "features": 4}}, "model.dims is 3"),
        ({"steps": 0}, "greater than or equal to 1"),
        ({"optimizer": "sgd"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs(change, message) -> None:
    base = tiny_config(2).model_dump(mode="json")
    base.update(change)
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(base)


def test_advice_for_batchnorm_with_batch_one() -> None:
    cfg = tiny_config(2, batch_size=1, model={"dims": 2, "features": 4, "norm": "batchnorm"})
    assert any("train/eval disparity" in a for a in cfg.advice())


def test_missing_data_files_are_clear(tmp_path) -> None:
    cfg = tiny_config(2).model_dump(mode="json")
    cfg["data"] = {"images": ["nope.tif"], "labels": ["nope_labels.tif"], "tile_shape": [32, 32]}
    with pytest.raises(FileNotFoundError, match=r"nope\.tif"):
        Trainer(TrainConfig.model_validate(cfg), tmp_path / "r", base_dir=tmp_path)


def test_examples_round_trip_and_validate() -> None:
    for kind in ("2d", "3d"):
        text = example_yaml(kind)
        assert text.startswith("# tilenorm-bmz training config")
        assert TrainConfig.model_validate(yaml.safe_load(text)) == example_config(kind)


def test_cli_train_example_then_train_and_resume(tmp_path) -> None:
    result = runner.invoke(app, ["train", "--example", "3d"])
    assert result.exit_code == 0 and "sample: nuclei3d" in result.output
    cfg_path = tmp_path / "cfg.yaml"
    tiny_config(2, steps=2, validate_every=2, checkpoint_every=2).to_yaml(cfg_path)
    result = runner.invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "validation Dice" in result.output
    # a second run into the same folder must not overwrite it
    result = runner.invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run" / "last.pt"), "--out",
                                 str(tmp_path / "run"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "last.pt")[1].step == 3
    result = runner.invoke(app, ["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_convert_then_finetune(tmp_path) -> None:
    net = UNet(dims=2, features=4, norm="instancenorm")
    save_checkpoint(tmp_path / "in.pt", net)
    cfg_path = tmp_path / "ft.yaml"
    tiny_config(2, steps=2, validate_every=2, checkpoint_every=2, model=None).to_yaml(cfg_path)
    result = runner.invoke(app, ["convert", str(tmp_path / "in.pt"), "-o", str(tmp_path / "out.pt"),
                                 "--finetune", str(cfg_path)])
    assert result.exit_code == 0, result.output
    model, info = load_checkpoint(tmp_path / "out.pt")
    assert info.step == 2 and info.norm_kind == "batchrenorm"
    assert info.extra["source_kind"] == "checkpoint" and "validation" in info.extra
    assert any(m.num_batches_tracked > 0 for m in model.modules() if isinstance(m, BatchRenorm))
