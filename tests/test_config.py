"""Configs are strict and round-trip through YAML."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tilenorm_bmz.config import NormConfig, RenormSchedule, UNetConfig

CONFIGS = [
    UNetConfig(),
    UNetConfig(dims=2, features=[8, 16, 32], norm="groupnorm", pool_factors=[2, (2, 2)]),
    UNetConfig(dims=3, depth=2, pool_factors=[(1, 2, 2), 2], final_activation="softmax", out_channels=3),
    NormConfig(kind="instancenorm", eps=1e-3),
    RenormSchedule(warmup_steps=500, ramp_steps=100),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_yaml_round_trip(cfg, tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    again = type(cfg).from_yaml(path)
    assert again == cfg
    assert type(cfg).model_validate(cfg.model_dump(mode="json")) == cfg


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        UNetConfig.model_validate({"dims": 2, "featurs": 8})


def test_messages_say_what_to_change() -> None:
    with pytest.raises(ValidationError, match="depth \\+ 1 = 3"):
        UNetConfig(depth=2, features=[8, 16])
    with pytest.raises(ValidationError, match="one factor"):
        UNetConfig(depth=2, pool_factors=[2])
    with pytest.raises(ValidationError, match="norm must be one of"):
        UNetConfig(norm="layernorm")


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UNetConfig.from_yaml(tmp_path / "nope.yaml")


def test_vocabularies_are_defined_once() -> None:
    import typing

    from tilenorm_bmz import config, models
    from tilenorm_bmz.models import unet

    assert config.NORM_KINDS == typing.get_args(config.NormKind)
    assert models.NORM_KINDS is config.NORM_KINDS
    # models/unet.py ships standalone (torch only), so it spells the names out; they must agree
    assert unet.NORM_KINDS == config.NORM_KINDS
    assert config.GATE_CHECKS == typing.get_args(config.GateCheck)
    assert config.GATE_CONSUMERS == typing.get_args(config.GateConsumer)


def test_config_does_not_import_data() -> None:
    import subprocess
    import sys

    code = "import sys, tilenorm_bmz.config; print(any(m.startswith('tilenorm_bmz.data') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
