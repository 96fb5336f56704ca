"""Halo sufficiency: is the halo a package declares at least the network's one-sided receptive field?

For a tile-local network (global normalization: BatchNorm/BatchRenorm in eval mode) tiling is exact when
the halo on each side of a tile is at least the one-sided theoretical receptive field (TRF) measured by
:func:`tilenorm_bmz.tiling.receptive_field`. When a normalization layer couples the tile (InstanceNorm,
GroupNorm, LayerNorm, BatchNorm without running statistics) every output voxel depends on the whole tile:
no halo is sufficient, and the result says "normalization couples the tile" instead of giving a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import computed_field

from ._common import MetricResult, as_spatial_tuple

if TYPE_CHECKING:
    from tilenorm_bmz.tiling import RFReport

__all__ = ["COUPLED", "HaloSufficiencyResult", "halo_sufficiency"]

#: What the result says instead of a receptive-field number for tile-coupled networks.
COUPLED = "normalization couples the tile"


class HaloSufficiencyResult(MetricResult):
    """Result of :func:`halo_sufficiency` (all sizes per spatial axis, in voxels)."""

    axes: tuple[str, ...]
    declared_halo: tuple[int, ...]
    measured_trf: tuple[int, ...] | None
    """One-sided theoretical receptive field (None when coupled or not measurable)."""
    recommended_halo: tuple[int, ...]
    """The receptive-field report's recommendation (one-sided TRF, ``2 * halo`` a multiple of the divisor)."""
    coupled: bool
    coupling_reason: str | None = None
    sufficient: bool | None
    """``declared >= measured`` on every axis; False when normalization couples the tile (no halo
    suffices); None when the receptive field could not be measured."""
    method: str
    """Where the TRF comes from (``analytic`` / ``numerical`` / ``none``)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def shortfall(self) -> tuple[int, ...] | None:
        """Voxels missing per axis (0 where the halo suffices); None without a measured TRF."""
        if self.measured_trf is None:
            return None
        return tuple(max(0, m - d) for m, d in zip(self.measured_trf, self.declared_halo, strict=True))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def measured(self) -> str:
        """The measured requirement in words: the TRF per axis, or "normalization couples the tile"."""
        if self.coupled:
            return COUPLED
        if self.measured_trf is None:
            return "not measurable"
        return ", ".join(f"{a}: {m}" for a, m in zip(self.axes, self.measured_trf, strict=True))

    @property
    def message(self) -> str:
        """One sentence for a report: what was found and what to do."""
        declared = "x".join(map(str, self.declared_halo))
        if self.coupled:
            return (
                f"{COUPLED} ({self.coupling_reason or 'tile-wise normalization'}): no halo makes tiling "
                "exact; convert the network to BatchRenorm with `tilenorm-bmz convert`"
            )
        if self.sufficient is None:
            return f"the receptive field could not be measured; declared halo {declared} is unchecked"
        if self.sufficient:
            return f"declared halo {declared} covers the one-sided receptive field ({self.measured})"
        want = "x".join(
            str(max(r, d)) for r, d in zip(self.recommended_halo, self.declared_halo, strict=True)
        )
        return (
            f"declared halo {declared} is smaller than the one-sided receptive field ({self.measured}): "
            f"increase the halo to {want}"
        )


def halo_sufficiency(declared_halo: int | Sequence[int], rf_report: RFReport) -> HaloSufficiencyResult:
    """Compare a declared halo with the measured receptive field.

    Parameters
    ----------
    declared_halo
        The halo tiles are cropped by (e.g. a bioimage.io package's output ``halo``), an int or one per
        spatial axis, in voxels of the input (the networks here keep the spatial size).
    rf_report
        :func:`tilenorm_bmz.tiling.receptive_field` of the network, in eval mode.

    Returns
    -------
    HaloSufficiencyResult
        ``sufficient`` per the rule above, the shortfall, and a message saying what to do.

    Examples
    --------
    >>> from tilenorm_bmz.models import UNet
    >>> from tilenorm_bmz.tiling import receptive_field
    >>> rf = receptive_field(UNet(dims=2, features=4, depth=2, norm="batchnorm"), dims=2)
    >>> halo_sufficiency(8, rf).sufficient
    False
    """
    dims = int(rf_report.dims)
    declared = as_spatial_tuple(declared_halo, dims, "declared_halo")
    if min(declared) < 0:
        raise ValueError(f"declared_halo must be >= 0, got {declared}")
    coupled = bool(rf_report.normalization_couples_tile)
    trf = None if rf_report.theoretical is None or coupled else tuple(int(t) for t in rf_report.theoretical)
    if coupled:
        sufficient: bool | None = False
    elif trf is None:
        sufficient = None
    else:
        sufficient = all(d >= m for d, m in zip(declared, trf, strict=True))
    return HaloSufficiencyResult(
        axes=tuple(rf_report.axes),
        declared_halo=declared,
        measured_trf=trf,
        recommended_halo=tuple(int(h) for h in rf_report.recommended_halo),
        coupled=coupled,
        coupling_reason=rf_report.coupling_reason if coupled else None,
        sufficient=sufficient,
        method=str(rf_report.method),
    )
