"""The report: checks, metric results, environment and data, written as ``report.json`` + ``report.html``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

from .._json import jsonable
from .._version import __version__
from ..config import atomic_write_text
from ..metrics import (
    DisparityResult,
    HaloSufficiencyResult,
    SweepResult,
    TiledVsWholeResult,
    TileMismatchResult,
)
from .checks import Check

if TYPE_CHECKING:
    from ..tiling import RFReport

__all__ = ["DataInfo", "Environment", "Report", "ReportPaths", "write_report"]

logger = logging.getLogger(__name__)

#: Identifies the layout of ``report.json``; bumped on incompatible changes.
REPORT_SCHEMA = "tilenorm_bmz.report/1"

_VERSIONED = ("torch", "numpy", "bioimageio.core", "bioimageio.spec", "pydantic", "matplotlib")


class ReportPaths(NamedTuple):
    """Where :func:`write_report` wrote the report."""

    json: Path
    html: Path


class DataInfo(BaseModel):
    """An input the report was computed on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """File path or a short description (e.g. "package test input")."""
    role: str = "image"
    """``image`` or ``labels`` (or another role the caller names)."""
    shape: tuple[int, ...]
    dtype: str
    note: str = ""
    """E.g. "the package's own test input: real data is better"."""

    @classmethod
    def from_array(cls, name: str, array: Any, role: str = "image", note: str = "") -> DataInfo:
        arr = np.asarray(array) if not hasattr(array, "shape") else array
        return cls(
            name=name, role=role, shape=tuple(int(s) for s in arr.shape), dtype=str(arr.dtype), note=note
        )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Environment(BaseModel):
    """Versions and hardware the results were measured with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tilenorm_bmz: str
    python: str
    platform: str
    packages: dict[str, str | None]
    """Installed versions (read from package metadata; nothing is imported)."""
    device: str
    """The device the metrics ran on (e.g. ``cuda:0``)."""
    device_name: str | None = None
    """GPU model, when the device is a GPU."""
    created: str
    """UTC time of writing, ISO 8601."""

    @classmethod
    def collect(cls, device: str | None = None) -> Environment:
        """The current environment; ``device`` as used by the metrics (default: ``auto`` resolved)."""
        import torch

        from ..introspect import resolve_device

        dev = resolve_device(device or "auto")
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
        return cls(
            tilenorm_bmz=__version__,
            python=sys.version.split()[0],
            platform=platform.platform(),
            packages={p: _version(p) for p in _VERSIONED},
            device=str(dev),
            device_name=name,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )


class Report(BaseModel):
    """Everything a validation report shows. Build it, then :meth:`write` it (or use :func:`write_report`).

    Results are optional: a section appears in the HTML for each one given. ``seams`` holds one
    tiled-vs-whole result per predictor (e.g. ``{"TiledPredictor": r1, "bioimageio.core": r2}``).
    ``extra`` takes further JSON-serializable sections (a bioimage.io test summary, ...), shown as JSON.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    title: str = "tilenorm-bmz validation report"
    subject: str = ""
    """What was validated (a package path, a checkpoint, a model name)."""
    accepted: bool | None = None
    """The decision (None: no decision, the report only shows measurements)."""
    checks: list[Check] = Field(default_factory=list)
    data: list[DataInfo] = Field(default_factory=list)
    tile_mismatch: TileMismatchResult | None = None
    disparity: DisparityResult | None = None
    seams: dict[str, TiledVsWholeResult] = Field(default_factory=dict)
    halo: HaloSufficiencyResult | None = None
    sweep: SweepResult | None = None
    receptive_field: Any = None
    """A :class:`tilenorm_bmz.tiling.RFReport` (its gradient image is plotted)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    environment: Environment = Field(default_factory=Environment.collect)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "failed"]

    def to_json_dict(self) -> dict[str, Any]:
        """The ``report.json`` content (figures are numbers here; images only in the HTML)."""
        rf: RFReport | None = self.receptive_field
        results: dict[str, Any] = {}
        if self.tile_mismatch is not None:
            results["tile_mismatch"] = self.tile_mismatch.model_dump(mode="json")
        if self.disparity is not None:
            results["train_eval_disparity"] = self.disparity.model_dump(mode="json")
        if self.seams:
            results["tiled_vs_whole"] = {k: v.model_dump(mode="json") for k, v in self.seams.items()}
        if self.halo is not None:
            results["halo_sufficiency"] = self.halo.model_dump(mode="json")
        if self.sweep is not None:
            results["tile_size_sweep"] = self.sweep.model_dump(mode="json")
        if rf is not None:
            results["receptive_field"] = rf.model_dump(mode="json") if hasattr(rf, "model_dump") else rf
        return {
            "schema": REPORT_SCHEMA,
            "title": self.title,
            "subject": self.subject,
            "accepted": self.accepted,
            "failed_checks": self.failed_checks,
            "checks": [c.model_dump(mode="json") for c in self.checks],
            "results": results,
            "data": [d.model_dump(mode="json") for d in self.data],
            "environment": self.environment.model_dump(mode="json"),
            "extra": jsonable(self.extra),
        }

    def to_html(self) -> str:
        """The self-contained HTML page (inline CSS and PNG figures, no external resources)."""
        from .html import render_html

        return render_html(self)

    def write(self, out_dir: str | os.PathLike[str]) -> ReportPaths:
        """Write ``report.json`` and ``report.html`` into ``out_dir`` (created; files replaced atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = atomic_write_text(out / "report.json", json.dumps(self.to_json_dict(), indent=2) + "\n")
        html_path = atomic_write_text(out / "report.html", self.to_html())
        logger.info("wrote %s and %s", json_path, html_path)
        return ReportPaths(json=json_path, html=html_path)


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    checks: Sequence[Check] = (),
    accepted: bool | None = None,
    title: str = "tilenorm-bmz validation report",
    subject: str = "",
    data: Sequence[DataInfo] = (),
    tile_mismatch: TileMismatchResult | None = None,
    disparity: DisparityResult | None = None,
    seams: Mapping[str, TiledVsWholeResult] | None = None,
    halo: HaloSufficiencyResult | None = None,
    sweep: SweepResult | None = None,
    receptive_field: RFReport | None = None,
    extra: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> ReportPaths:
    """Write ``report.json`` and a self-contained ``report.html`` into ``out_dir``.

    Parameters
    ----------
    out_dir
        Output folder (created when missing; existing report files are replaced atomically).
    checks
        Rows of the summary table (see :mod:`tilenorm_bmz.report.checks` for builders).
    accepted
        The decision shown in the banner (None: no decision).
    title, subject
        Page title and what was validated.
    data
        The inputs used (:meth:`DataInfo.from_array`).
    tile_mismatch, disparity, seams, halo, sweep, receptive_field
        Metric results; each one given gets a section with its figure.
    extra
        Further JSON-serializable sections.
    device
        Device the metrics ran on, for the environment record (default: ``auto`` resolved).

    Returns
    -------
    ReportPaths
        ``(json, html)`` paths.
    """
    report = Report(
        title=title,
        subject=subject,
        accepted=accepted,
        checks=list(checks),
        data=list(data),
        tile_mismatch=tile_mismatch,
        disparity=disparity,
        seams=dict(seams or {}),
        halo=halo,
        sweep=sweep,
        receptive_field=receptive_field,
        extra=dict(extra or {}),
        environment=Environment.collect(device),
    )
    return report.write(out_dir)
