"""Self-contained HTML rendering of a :class:`~tilenorm_bmz.report.document.Report`.

The page has inline CSS and inline base64 PNG figures only: no scripts, fonts, style sheets or images are
fetched, so it can be attached to an issue, archived, or opened offline.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import figures
from .checks import Check

if TYPE_CHECKING:
    from .document import Report

__all__ = ["render_html"]

_CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --na: #6e7781; --info: #0969da; --line: #d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f8fa; color: #1f2328;
       font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.subject { color: #57606a; margin: 0 0 14px; word-break: break-all; }
.verdict { display: inline-block; padding: 6px 16px; border-radius: 6px; color: #fff; font-weight: 700;
           letter-spacing: .04em; }
.verdict.accepted { background: var(--ok); } .verdict.rejected { background: var(--bad); }
.verdict.none { background: var(--na); }
table { border-collapse: collapse; width: 100%; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.badge { display: inline-block; min-width: 92px; text-align: center; padding: 1px 8px; border-radius: 10px;
         color: #fff; font-size: 12px; font-weight: 600; white-space: nowrap; }
.badge.passed { background: var(--ok); } .badge.failed { background: var(--bad); }
.badge.not-applicable { background: var(--na); } .badge.info { background: var(--info); }
tr.failed td { background: #fff5f5; }
.advice { color: #57606a; font-size: 13px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0;
           font-size: 14px; }
dl.facts dt { color: #57606a; } dl.facts dd { margin: 0; font-family: ui-monospace, Menlo, monospace; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: #57606a; font-size: 13px; margin-top: 4px; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
.note { color: #9a6700; font-size: 13px; }
footer { margin-top: 36px; color: #6e7781; font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _img(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _facts(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_fmt(v))}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def _notes(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{_e(n)}</p>' for n in notes)


def _checks_table(checks: Sequence[Check]) -> str:
    if not checks:
        return "<p>No checks were run.</p>"
    rows = []
    for c in checks:
        advice = _e(c.advice)
        if c.details:
            advice += f'<div class="advice">{_e(c.details)}</div>'
        rows.append(
            f'<tr class="{c.status}"><td>{_e(c.name)}</td>'
            f'<td><span class="badge {c.status}">{_e(c.status)}</span></td>'
            f'<td class="num">{_e(_fmt(c.measured))}</td><td>{_e(_fmt(c.threshold))}</td>'
            f"<td>{advice}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("check", "result", "measured", "threshold", "what to do / details")
    )
    head = f"<tr>{head}</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _mismatch_section(report: Report) -> str:
    r = report.tile_mismatch
    if r is None:
        return ""
    g = r.geometry
    body = (
        "<p>Each crop is split along its long axis into two overlapping tiles, each predicted on its own in "
        "eval mode; the predictions are compared in the overlap after dropping the halo next to each tile's "
        "border (Buglakova et al. 2025, Fig. 3).</p>"
        + _facts(
            [
                ("tile mismatch", r.verdict),
                ("max_dist", r.max_dist),
                ("1 - Dice per channel", r.mismatch),
                ("max_dist per channel", r.max_dist_per_channel),
                (
                    "crops",
                    f"{len(g.origins)} of {g.n_crops_grid} ({_fmt(g.crop_shape)}, stride {_fmt(g.stride)})",
                ),
                ("tiles", f"{g.tile} voxels offset by {g.offset} along axis {g.long_axis}, halo {g.halo}"),
                ("valid overlap", f"[{g.valid[0]}, {g.valid[1]}) in crop coordinates"),
                ("worst voxel", f"{r.worst_voxel} (channel {r.worst_channel})"),
            ]
        )
        + _notes(g.adjustments)
        + _img(
            figures.tile_mismatch_figure(r),
            "two overlapping tiles and their difference",
            "Where the mismatch is worst: the input crop with both tiles, each tile's prediction at its "
            "place in the crop, and |tile 1 - tile 2| over the overlap (dashed: the valid part that is "
            "compared).",
        )
    )
    return _section("tile-mismatch", "Tile mismatch", body)


def _disparity_section(report: Report) -> str:
    r = report.disparity
    if r is None:
        return ""
    facts: list[tuple[str, Any]] = [("applicable", r.applicable)]
    if r.applicable:
        facts += [("1 - Dice per channel", r.disparity), ("max |P_train - P_eval|", r.max_abs_diff)]
    else:
        facts.append(("reason", r.reason))
    facts += [
        ("batch composition", r.batch_composition),
        (
            "normalization layers (train mode)",
            ", ".join(f"{k} x{v}" for k, v in r.norm_layers.items()) or None,
        ),
        (
            "mode-independent norm layers",
            ", ".join(f"{k} x{v}" for k, v in r.mode_independent_norm_layers.items()) or None,
        ),
    ]
    if r.renorm_limits:
        facts.append(("BatchRenorm (r_max, d_max)", "; ".join(f"({a:g}, {b:g})" for a, b in r.renorm_limits)))
    body = (
        "<p>The same tiles predicted with the normalization layers in eval mode (running statistics) and in "
        "train mode (batch statistics); dropout stays off. Disparity is 1 - Dice of the two binarized "
        "predictions.</p>"
        + _facts(facts)
        + _img(
            figures.disparity_figure(r),
            "train vs eval prediction",
            "The tile with the largest disparity: eval-mode and train-mode predictions side by side, and "
            "their difference.",
        )
    )
    return _section("disparity", "Train/eval disparity", body)


def _seams_section(report: Report) -> str:
    if not report.seams:
        return ""
    rows = []
    for name, r in report.seams.items():
        value = r.reason if r.skipped else _fmt(r.max_abs_diff)
        rows.append(
            f"<tr><td>{_e(name)}</td><td class='num'>{_e(value)}</td>"
            f"<td class='num'>{_e(_fmt(r.mean_abs_diff))}</td>"
            f"<td class='num'>{_e(r.worst_voxel if r.worst_voxel is not None else '—')}</td></tr>"
        )
    table = (
        "<table><tr><th>predictor</th><th>max |tiled - whole|</th><th>mean |tiled - whole|</th>"
        f"<th>worst voxel</th></tr>{''.join(rows)}</table>"
    )
    body = (
        "<p>The image predicted tiled and in one piece; any difference is a seam.</p>"
        + table
        + _img(
            figures.seam_figure(report.seams),
            "seam maps",
            "Seam map (maximum over channels of |tiled - whole|) and both predictions, per predictor.",
        )
    )
    return _section("seams", "Tiled vs whole image", body)


def _sweep_section(report: Report) -> str:
    r = report.sweep
    if r is None:
        return ""
    rows = "".join(
        f"<tr><td class='num'>{_e(_fmt(p.tile_shape))}</td><td class='num'>{_e(_fmt(p.score))}</td>"
        f"<td class='num'>{_e(_fmt(p.agreement_with_largest))}</td>"
        f"<td class='num'>{_e(_fmt(p.max_abs_diff_to_largest))}</td></tr>"
        for p in r.points
    )
    table = (
        f"<table><tr><th>tile</th><th>Dice against {_e(r.reference)}</th><th>Dice to largest tile</th>"
        f"<th>max |difference| to largest tile</th></tr>{rows}</table>"
    )
    body = (
        f"<p>The image predicted tiled with several tile sizes (halo {_e(_fmt(r.halo))}); a tile-local "
        "network gives the same segmentation for every size (Buglakova et al. 2025, Fig. 6).</p>"
        + table
        + _notes([f"skipped {s}" for s in r.skipped_sizes])
        + _img(
            figures.sweep_figure(r), "tile-size sweep", "Dice per channel and difference to the largest tile."
        )
    )
    return _section("sweep", "Tile-size sweep", body)


def _rf_section(report: Report) -> str:
    rf, halo = report.receptive_field, report.halo
    if rf is None and halo is None:
        return ""
    body = ""
    if halo is not None:
        body += f"<p>{_e(halo.message)}.</p>"
        body += _facts(
            [
                ("declared halo", halo.declared_halo),
                ("one-sided receptive field", halo.measured),
                ("recommended halo", halo.recommended_halo),
            ]
        )
    if rf is not None:
        body += _facts(
            [
                ("theoretical RF (one-sided)", getattr(rf, "theoretical", None)),
                ("effective RF 95% / 99%", f"{_fmt(rf.erf95)} / {_fmt(rf.erf99)}"),
                ("normalization couples the tile", rf.normalization_couples_tile),
                ("method", rf.method),
            ]
        )
        body += _notes(getattr(rf, "notes", []))
        body += _img(
            figures.receptive_field_figure(rf, halo.declared_halo if halo is not None else None),
            "receptive field",
            "log10 of the mean |gradient| of the centre output voxel with respect to the input "
            "(Buglakova et al. 2025, Fig. 4): the support is the theoretical receptive field, the bright "
            "core the effective one.",
        )
    return _section("receptive-field", "Receptive field and halo", body)


def _table(rows: Iterable[Sequence[Any]], head: Sequence[str]) -> str:
    h = "".join(f"<th>{_e(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(x))}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    if report.accepted is None:
        verdict = '<span class="verdict none">NO DECISION</span>'
    elif report.accepted:
        verdict = '<span class="verdict accepted">ACCEPTED</span>'
    else:
        failed = ", ".join(report.failed_checks)
        verdict = (
            f'<span class="verdict rejected">REJECTED</span> <span class="advice">failed: {_e(failed)}</span>'
        )
    env = report.environment
    env_rows = [
        ("tilenorm-bmz", env.tilenorm_bmz),
        ("python", env.python),
        ("platform", env.platform),
        ("device", env.device + (f" ({env.device_name})" if env.device_name else "")),
        *((name, version or "not installed") for name, version in env.packages.items()),
        ("created (UTC)", env.created),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{_e(report.title)}</h1>",
        f'<p class="subject">{_e(report.subject)}</p>' if report.subject else "",
        f"{verdict}</header>",
        _section("summary", "Checks", _checks_table(report.checks)),
        _mismatch_section(report),
        _disparity_section(report),
        _seams_section(report),
        _sweep_section(report),
        _rf_section(report),
    ]
    if report.data:
        parts.append(
            _section(
                "data",
                "Data",
                _table(
                    [(d.name, d.role, d.shape, d.dtype, d.note) for d in report.data],
                    ("input", "role", "shape", "dtype", "note"),
                ),
            )
        )
    parts.append(_section("environment", "Environment", _table(env_rows, ("", "version / value"))))
    if report.extra:
        from .._json import jsonable

        parts.append(
            _section(
                "extra", "Further results", f"<pre>{_e(json.dumps(jsonable(report.extra), indent=2))}</pre>"
            )
        )
    parts.append(
        f"<footer>Generated by tilenorm-bmz {_e(env.tilenorm_bmz)} on {_e(env.created)}. "
        "All numbers are also in report.json.</footer></main></body></html>"
    )
    return "\n".join(p for p in parts if p)
