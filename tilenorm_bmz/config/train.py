"""The training run config: :class:`TrainConfig` (network, data, optimizer, BatchRenorm schedule)."""

from __future__ import annotations

from typing import Literal, Self, get_args

from pydantic import Field, model_validator

from ._base import StrictModel
from .data import DataConfig
from .model import RenormSchedule, UNetConfig

__all__ = ["TrainConfig"]


ExampleKind = Literal["2d", "3d"]
"""The commented example configs ``tilenorm-bmz train --example`` prints."""
EXAMPLE_KINDS: tuple[str, ...] = get_args(ExampleKind)

StudyRunSet = Literal["all", "main", "seeds"]
"""What ``tilenorm-bmz study --runs`` trains: the main table, the repeats with other seeds, or both."""
STUDY_RUN_SETS: tuple[str, ...] = get_args(StudyRunSet)

class TrainConfig(StrictModel):
    """A training run: network, data, optimizer and the BatchRenorm schedule (``tilenorm-bmz train``).

    One ``steps`` is one optimizer step, made of ``grad_accumulation`` forward/backward passes of
    ``batch_size`` tiles each (the paper: batch 1, accumulation 8). The BatchRenorm schedule is driven by
    this global step. The same config trains every norm kind (``model.norm``), so they can be compared.
    """

    model: UNetConfig | None = None
    """The network; may be omitted only when fine-tuning an existing model (``convert --finetune``)."""
    data: DataConfig
    schedule: RenormSchedule = Field(default_factory=RenormSchedule)
    """BatchRenorm clipping schedule: r_max = 1, d_max = 0 for warmup_steps, then a linear ramp."""
    steps: int = Field(6000, ge=1)
    """Number of optimizer steps."""
    batch_size: int = Field(1, ge=1)
    """Tiles per forward pass (the batch the normalization layers see)."""
    grad_accumulation: int = Field(8, ge=1)
    """Forward/backward passes per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    """Adam learning rate."""
    weight_decay: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision on CUDA (BatchRenorm statistics stay float32)."""
    validate_every: int = Field(500, ge=1)
    """Validate (tiled Dice in eval mode, train/eval disparity) every this many steps, and at the end."""
    checkpoint_every: int = Field(500, ge=1)
    """Write ``last.pt`` every this many steps (and at the end, and on Ctrl-C)."""
    val_tile_shape: tuple[int, ...] | None = None
    """Tile of the validation prediction; default: the training tile enlarged to cover the halo well."""
    val_batch_size: int = Field(2, ge=1)
    disparity_tiles: int = Field(4, ge=0)
    """Validation tiles for the train/eval disparity probe (0 to skip)."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Binarization threshold of predictions for Dice."""
    seed: int = Field(0, ge=0)
    """Seeds the network initialization (the data has its own seed)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.model is None:
            return self
        m, d = self.model, self.data
        if m.dims != d.dims:
            raise ValueError(
                f"model.dims is {m.dims} but data.tile_shape {list(d.tile_shape)} is {d.dims}D; make them agree"
            )
        bad = [f"{t} (axis {a})" for a, (t, q) in enumerate(zip(d.tile_shape, m.divisor, strict=True)) if t % q]
        if bad:
            fixed = [max(q, round(t / q) * q) for t, q in zip(d.tile_shape, m.divisor, strict=True)]
            raise ValueError(
                f"data.tile_shape {list(d.tile_shape)} is not a multiple of the network's divisor "
                f"{list(m.divisor)} (product of the pooling factors) at {', '.join(bad)}; use e.g. {fixed}"
            )
        if self.val_tile_shape is not None:
            if len(self.val_tile_shape) != m.dims:
                raise ValueError(f"val_tile_shape needs {m.dims} sizes, got {list(self.val_tile_shape)}")
            if any(t % q for t, q in zip(self.val_tile_shape, m.divisor, strict=True)):
                raise ValueError(
                    f"val_tile_shape {list(self.val_tile_shape)} must be a multiple of the divisor {list(m.divisor)}"
                )
        n_targets = d.targets.n_channels
        if m.out_channels != n_targets:
            raise ValueError(
                f"model.out_channels is {m.out_channels} but the targets have {n_targets} channels "
                f"({', '.join(d.targets.channel_names)}); set model.out_channels: {n_targets}"
            )
        if m.final_activation == "softmax" and not d.targets.background:
            raise ValueError(
                "final_activation softmax needs mutually exclusive classes: set data.targets.background: true "
                "(foreground, boundary, background), or use sigmoid"
            )
        return self

    def advice(self) -> list[str]:
        """Warnings about settings that are valid but probably not what the user wants."""
        out: list[str] = []
        kind = self.model.norm.kind if self.model is not None else None
        if kind == "batchnorm" and self.batch_size < 8:
            out.append(
                f"batchnorm with batch_size {self.batch_size}: running statistics will disagree with the batch "
                "statistics the network trains with (train/eval disparity); use norm batchrenorm"
            )
        if kind in ("instancenorm", "groupnorm"):
            out.append(
                f"{kind} normalizes every tile on its own, so tiled predictions will show seams; use batchrenorm"
            )
        if kind == "batchrenorm" and self.schedule.warmup_steps < 500 <= self.steps:
            out.append(
                f"schedule.warmup_steps is {self.schedule.warmup_steps}: with momentum 0.01 the running "
                "statistics need about 500 steps to settle before r_max/d_max ramp up"
            )
        if kind == "batchrenorm" and self.schedule.warmup_steps >= self.steps:
            out.append(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) >= steps ({self.steps}): the run never "
                "leaves the plain-BatchNorm phase"
            )
        if self.data.input_normalization.mode == "tilewise":
            out.append("tilewise input normalization makes predictions depend on the tile (seams); the paper "
                       "compares it, use global for models you share")
        return out
