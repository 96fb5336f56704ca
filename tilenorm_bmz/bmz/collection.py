"""The gate as a partner check of the bioimage.io collection: its tool-compatibility report format.

The collection's CI (``bioimage-io/collection``, ``scripts/check_compatibility_*.py``) stores one report per
tool and version as ``<tool>_<version>.json``, the JSON dump of its ``ToolCompatibilityReport``
(``backoffice/compatibility.py``): ``status`` (passed | failed | not-applicable), ``score`` (0..1),
``error`` (the message when failed), ``details`` (a ``ToolReportDetails`` mapping: ``status``,
``warnings``, ``traceback``, ``metadata_completeness``, further keys allowed), ``badge`` (icon, label, url)
and ``links`` (bioimage.io resources the checked one should link). The tool name and version are not in the
file; they make its name. As in ``check_compatibility_bioimageio_core.py``, ``error`` joins at most three
messages.

The gate writes: ``passed`` when accepted, ``failed`` when rejected or when it could not run on a broken
input, ``not-applicable`` for resources it does not handle (not a model, no PyTorch weights). There is no
badge (the tool has no per-resource page).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._version import __version__
from ..config import atomic_write_text

if TYPE_CHECKING:
    from .gate import GateReport

__all__ = ["COLLECTION_TOOL", "collection_report", "write_collection_report"]

#: The tool name the reports are filed under.
COLLECTION_TOOL = "tilenorm-bmz"


def _error(messages: list[str]) -> str | None:
    if not messages:
        return None
    return "\n\n".join(messages if len(messages) <= 3 else [*messages[:3], "..."])


def collection_report(report: GateReport | None = None, *, error: Exception | None = None) -> dict[str, Any]:
    """The tool-compatibility report of a gate run (``report``) or of an input it could not run on (``error``)."""
    if report is None:
        if error is None:
            raise ValueError("give the gate report or the error that stopped it")
        not_applicable = bool(getattr(error, "not_applicable", False))
        status: Literal["passed", "failed", "not-applicable"] = "not-applicable" if not_applicable else "failed"
        return {
            "status": status,
            "score": 0.0,
            "error": None if not_applicable else str(error),
            "details": str(error),
            "badge": None,
            "links": [],
        }
    failed = [c for c in report.checks if c.status == "failed"]
    warnings = {c.name: c.advice for c in report.checks if c.status == "info" and c.advice}
    warnings.update({f"note {i + 1}": w for i, w in enumerate(report.warnings)})
    status = "passed" if report.accepted else "failed"
    details: dict[str, Any] = {
        "status": status,
        "warnings": warnings or None,
        "traceback": None,
        "metadata_completeness": None,
        "tool": COLLECTION_TOOL,
        "tool_version": __version__,
        "summary": report.summary(),
        "checks": [c.model_dump(mode="json") for c in report.checks],
        "figures": report.figures(),
    }
    return {
        "status": status,
        "score": 1.0 if report.accepted else 0.0,
        "error": _error([f"{c.name}: {c.advice or 'failed'}" for c in failed]),
        "details": details,
        "badge": None,
        "links": [],
    }


def write_collection_report(out_dir: str | os.PathLike[str], content: dict[str, Any]) -> Path:
    """Write ``<out_dir>/tilenorm-bmz_<version>.json`` (atomically); returns its path."""
    path = Path(out_dir) / f"{COLLECTION_TOOL}_{__version__}.json"
    return atomic_write_text(path, json.dumps(content, indent=2, default=str) + "\n")
