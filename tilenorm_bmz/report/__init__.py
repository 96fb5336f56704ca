"""Validation reports: ``report.json`` (every number) and a self-contained ``report.html`` with figures.

A report is a list of :class:`Check` rows (measured value, threshold, pass/fail, what to do) plus the
metric results it was computed from::

    from tilenorm_bmz.report import check_tile_mismatch, check_disparity, write_report

    checks = [check_tile_mismatch(mm), check_disparity(disp)]
    write_report("out/", checks=checks, accepted=all(c.passed is not False for c in checks),
                 tile_mismatch=mm, disparity=disp)
"""

from .checks import (
    Check,
    CheckStatus,
    check_disparity,
    check_halo,
    check_sweep,
    check_tile_mismatch,
    check_tiled_vs_whole,
)
from .document import DataInfo, Environment, Report, ReportPaths, write_report
from .html import render_html

__all__ = [
    "Check",
    "CheckStatus",
    "DataInfo",
    "Environment",
    "Report",
    "ReportPaths",
    "check_disparity",
    "check_halo",
    "check_sweep",
    "check_tile_mismatch",
    "check_tiled_vs_whole",
    "render_html",
    "write_report",
]
