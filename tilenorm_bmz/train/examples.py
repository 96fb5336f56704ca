"""Example training configs (``tilenorm-bmz train --example 2d|3d``) and a commented YAML writer.

The examples train the paper's U-Net (2 downsamplings, 32/64/128 features, BatchRenorm) on the real data
embedded in the package, with a budget that runs on a laptop CPU; the comments say what to change for
the paper's full budget on a GPU. Comments come from the configs' field docstrings, so they cannot drift
from the code.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ..config import DataConfig, RenormSchedule, TrainConfig, UNetConfig

__all__ = ["commented_yaml", "example_config", "example_yaml"]

_HEADERS = {
    "2d": (
        "tilenorm-bmz training config: 2D nuclei (DSB2018 image embedded in the package), BatchRenorm U-Net.\n"
        "Run:  tilenorm-bmz train this.yaml --out runs/nuclei2d\n"
        "Budget: ~20 min on 2 CPU cores. Paper budget on a GPU: steps 25000, schedule.warmup_steps 5000,\n"
        "data.tile_shape [256, 256]."
    ),
    "3d": (
        "tilenorm-bmz training config: 3D nuclei (scikit-image cells3d, embedded), BatchRenorm U-Net.\n"
        "Run:  tilenorm-bmz train this.yaml --out runs/nuclei3d\n"
        "Budget: ~1 h on 2 CPU cores. Paper budget on a GPU: steps 25000, schedule.warmup_steps 5000,\n"
        "data.tile_shape [48, 128, 128] (or larger), amp bf16."
    ),
}


def example_config(kind: Literal["2d", "3d"]) -> TrainConfig:
    """A complete config that trains on the embedded sample data as it is."""
    if kind == "2d":
        return TrainConfig(
            model=UNetConfig(dims=2, depth=2, features=32, norm="batchrenorm"),
            data=DataConfig(sample="nuclei2d", tile_shape=(128, 128), min_foreground=0.05),
            schedule=RenormSchedule(warmup_steps=600, ramp_steps=600),
            steps=2000,
            batch_size=1,
            grad_accumulation=8,
            validate_every=250,
            checkpoint_every=250,
        )
    if kind == "3d":
        return TrainConfig(
            model=UNetConfig(dims=3, depth=2, features=32, norm="batchrenorm"),
            data=DataConfig(sample="nuclei3d", tile_shape=(32, 64, 64), min_foreground=0.05),
            schedule=RenormSchedule(warmup_steps=500, ramp_steps=500),
            steps=1500,
            batch_size=1,
            grad_accumulation=4,
            validate_every=250,
            checkpoint_every=250,
        )
    raise ValueError(f"example must be '2d' or '3d', got {kind!r}")


def _comment(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    return [f"{indent}# {line}".rstrip() for line in text.replace("``", "").strip().splitlines()]


def _flow(value: Any) -> str:
    """A value in YAML flow style on one line (``[32, 64, 64]``, ``null``, ``0.01``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    return text


def _emit(model: BaseModel, indent: str, lines: list[str]) -> None:
    dumped = model.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        lines.extend(_comment(info.description, indent))
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            _emit(value, indent + "  ", lines)
            continue
        lines.append(f"{indent}{name}: {_flow(dumped[name])}")


def commented_yaml(model: BaseModel, header: str | None = None) -> str:
    """YAML of ``model`` with every field's docstring as a comment above it.

    The result parses back to an equal model (``type(model).model_validate(yaml.safe_load(text))``).
    """
    lines: list[str] = _comment(header, "")
    if lines:
        lines.append("")
    _emit(model, "", lines)
    return "\n".join(lines) + "\n"


def example_yaml(kind: Literal["2d", "3d"]) -> str:
    """The commented example config for ``tilenorm-bmz train --example``."""
    return commented_yaml(example_config(kind), _HEADERS[kind])


def _check_round_trip(kind: Literal["2d", "3d"]) -> Any:  # used by the tests
    return TrainConfig.model_validate(yaml.safe_load(example_yaml(kind)))
