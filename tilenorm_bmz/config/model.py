"""Network configs: feature normalization (:class:`NormConfig`), the U-Net architecture (:class:`UNetConfig`)
and the BatchRenorm clipping schedule (:class:`RenormSchedule`)."""

from __future__ import annotations

import math
from typing import Any, Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from ._base import StrictModel

__all__ = ["NORM_KINDS", "NormConfig", "NormKind", "PoolFactor", "RenormSchedule", "UNetConfig"]

NormKind = Literal["batchrenorm", "batchnorm", "instancenorm", "groupnorm", "none"]
#: The normalization kinds a :class:`UNetConfig` may name. These names keep their meaning forever.
NORM_KINDS: tuple[str, ...] = get_args(NormKind)


class NormConfig(StrictModel):
    """Feature normalization of a network.

    ``kind`` is one of ``batchrenorm``, ``batchnorm``, ``instancenorm``, ``groupnorm``, ``none``.
    ``groups`` is only used by ``groupnorm`` (capped at the channel count, and reduced to a divisor of it).
    ``momentum`` follows PyTorch's convention (the paper uses 0.01).
    """

    kind: NormKind = "batchrenorm"
    """batchrenorm | batchnorm | instancenorm | groupnorm | none."""
    momentum: float = Field(0.01, gt=0.0, le=1.0)
    """Running-statistics momentum (PyTorch convention; the paper: 0.01)."""
    eps: float = Field(1e-5, gt=0.0)
    groups: int = Field(8, ge=1)
    """Groups of groupnorm (capped at, and made a divisor of, the channel count)."""


PoolFactor = tuple[int, ...]


class UNetConfig(StrictModel):
    """Architecture of a :class:`tilenorm_bmz.models.UNet` (the keyword arguments of its constructor).

    ``features`` is the channel count of the first level (doubled at every downsampling) or the explicit
    list of ``depth + 1`` channel counts. ``pool_factors`` has one entry per downsampling, each an int or
    a per-axis tuple (e.g. ``(1, 2, 2)`` for stacks with few z slices); ``None`` means 2 on every axis.
    """

    dims: Literal[2, 3] = 3
    """Spatial dimensions."""
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(2, ge=1)
    """One per target channel (foreground, boundary[, background])."""
    depth: int = Field(2, ge=0, le=6)
    """Number of downsamplings (the paper: 2)."""
    features: int | list[int] = 32
    """Channels of the first level, doubled per level (32 -> 32/64/128), or a list of depth + 1 counts."""
    norm: NormConfig = Field(default_factory=NormConfig)
    pool_factors: list[PoolFactor] | None = None
    """One pooling factor per downsampling (int or per-axis list such as [1, 2, 2]); null: 2 everywhere."""
    final_activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"

    @field_validator("norm", mode="before")
    @classmethod
    def _norm_from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in NORM_KINDS:
                raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}; got {v!r}")
            return {"kind": v}
        return v

    @field_validator("pool_factors", mode="before")
    @classmethod
    def _pool_from_ints(cls, v: Any) -> Any:
        if v is None:
            return v
        return [tuple(f) if isinstance(f, list | tuple) else (f,) for f in v]

    @model_validator(mode="after")
    def _check(self) -> Self:
        if isinstance(self.features, list):
            if len(self.features) != self.depth + 1:
                raise ValueError(
                    f"features has {len(self.features)} entries but depth={self.depth} needs depth + 1 = "
                    f"{self.depth + 1} (one per level); or give a single int that is doubled per level"
                )
            if any(f < 1 for f in self.features):
                raise ValueError("every entry of features must be >= 1")
        elif self.features < 1:
            raise ValueError("features must be >= 1")
        if self.pool_factors is not None:
            if len(self.pool_factors) != self.depth:
                raise ValueError(
                    f"pool_factors has {len(self.pool_factors)} entries but depth={self.depth}: give one "
                    f"factor (int or a tuple of {self.dims}) per downsampling"
                )
            fixed: list[PoolFactor] = []
            for f in self.pool_factors:
                t = tuple(f)
                if len(t) == 1:
                    t = t * self.dims
                if len(t) != self.dims or any(int(x) < 1 for x in t):
                    raise ValueError(
                        f"pool factor {f} must be a positive int or a tuple of {self.dims} positive ints"
                    )
                fixed.append(tuple(int(x) for x in t))
            object.__setattr__(self, "pool_factors", fixed)
        return self

    @property
    def level_features(self) -> list[int]:
        """Channel count per level (``depth + 1`` entries)."""
        if isinstance(self.features, list):
            return list(self.features)
        return [self.features * 2**i for i in range(self.depth + 1)]

    @property
    def resolved_pool_factors(self) -> list[PoolFactor]:
        if self.pool_factors is None:
            return [(2,) * self.dims for _ in range(self.depth)]
        return list(self.pool_factors)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Input sizes must be multiples of this, per spatial axis (product of the pooling factors)."""
        return tuple(math.prod(f[a] for f in self.resolved_pool_factors) for a in range(self.dims))


class RenormSchedule(StrictModel):
    """BatchRenorm clipping schedule driven by the trainer's global step (Ioffe 2017; the paper's setting).

    For ``step < warmup_steps`` the limits are ``r_max = 1, d_max = 0`` (plain BatchNorm training), then
    both rise linearly to ``r_max``, ``d_max`` over ``ramp_steps`` steps and stay there. With momentum 0.01
    the running statistics need about 500 steps to settle, so the warm-up should be at least that long.
    """

    warmup_steps: int = Field(5000, ge=0)
    ramp_steps: int = Field(1000, ge=0)
    r_max: float = Field(3.0, ge=1.0)
    d_max: float = Field(5.0, ge=0.0)

    def limits(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` at global step ``step``."""
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.ramp_steps == 0:
            return float(self.r_max), float(self.d_max)
        t = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def apply(self, model: Any, step: int) -> tuple[float, float]:
        """Set the limits for ``step`` on every BatchRenorm layer of ``model``; returns them.

        Any module with a ``set_renorm_limits(r_max, d_max)`` method is updated (that is the BatchRenorm
        protocol), so the schedule does not depend on the layer implementation.
        """
        r_max, d_max = self.limits(step)
        for m in model.modules():
            setter = getattr(m, "set_renorm_limits", None)
            if callable(setter):
                setter(r_max, d_max)
        return r_max, d_max
