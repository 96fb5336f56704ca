"""Tiling metadata of a package: size step, minimum size and halo per spatial axis.

Rules (see ../shared/reference/bioimageio.md, P5, and deepImageJ's tile calculator):

* ``step`` is the network's size divisor along the axis (product of its pooling factors);
* ``2 * halo`` is a multiple of ``step``, so an image padded by the halo on both sides keeps a valid size
  (bioimage.io.core pads whole-image inputs by the halo);
* ``min`` is a multiple of ``step`` (deepImageJ only accepts such tiles) and at least ``2 * halo + step``,
  so the smallest tile still has a non-empty valid centre.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..introspect import round_halo

__all__ = ["AxisGeometry", "package_geometry"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AxisGeometry:
    """Size rule and halo of one spatial input/output axis."""

    axis: str
    step: int
    min: int
    halo: int
    measured_halo: int | None
    """The halo the receptive field asks for (None when it was not measured)."""

    def valid_size(self, n: int) -> int:
        """The ``n``-th valid input size, ``min + n * step``."""
        return self.min + n * self.step

    def largest_valid_size(self, limit: int) -> int | None:
        """The largest valid size ``<= limit`` (None when even ``min`` exceeds it)."""
        if limit < self.min:
            return None
        return self.min + ((limit - self.min) // self.step) * self.step


def package_geometry(
    axes: Sequence[str],
    divisor: Sequence[int],
    measured_halo: Sequence[int] | None,
    override: int | Sequence[int] | None = None,
) -> tuple[AxisGeometry, ...]:
    """Per-axis step, min and halo.

    Parameters
    ----------
    axes
        Spatial axis ids, e.g. ``("z", "y", "x")``.
    divisor
        The network's size divisor per axis (the ``step``).
    measured_halo
        The recommended halo per axis from the receptive field, or None when unknown (then ``override``
        is required).
    override
        A user-chosen halo (one int or one per axis). A value below the measured halo is used but logged
        as a warning: tiles will then differ from whole-image predictions near tile borders.
    """
    n = len(axes)
    if len(divisor) != n:
        raise ValueError(f"divisor has {len(divisor)} entries for {n} axes")
    if measured_halo is not None and len(measured_halo) != n:
        raise ValueError(f"measured halo has {len(measured_halo)} entries for {n} axes")
    if override is None:
        if measured_halo is None:
            raise ValueError("the halo could not be measured: give it explicitly (--halo N)")
        wanted = [int(h) for h in measured_halo]
    else:
        wanted = [int(override)] * n if isinstance(override, int) else [int(h) for h in override]
        if len(wanted) != n:
            raise ValueError(f"--halo needs one value or one per spatial axis ({n}), got {len(wanted)}")
        if measured_halo is not None:
            short = [
                f"{a}: {h} < {m}" for a, h, m in zip(axes, wanted, measured_halo, strict=True) if h < int(m)
            ]
            if short:
                logger.warning(
                    "halo override below the measured receptive field (%s): tiled predictions will differ "
                    "from whole-image predictions near tile borders; use at least the measured halo",
                    ", ".join(short),
                )
    out = []
    for a, step, h, m in zip(axes, divisor, wanted, measured_halo or [None] * n, strict=True):
        step = int(step)
        halo = round_halo(h, step)
        if halo != h:
            logger.info("halo on %s rounded up from %d to %d so that 2*halo is a multiple of %d", a, h, halo, step)
        minimum = math.ceil((2 * halo + step) / step) * step
        out.append(AxisGeometry(axis=a, step=step, min=minimum, halo=halo,
                                measured_halo=None if m is None else int(m)))
    return tuple(out)
