"""Record accepted gate figures in a package: a new package file, re-tested, never an in-place edit.

The package's files are copied unchanged; only ``rdf.yaml`` gains ``config.tilenorm_bmz.gate`` (the
figures of :meth:`GateReport.figures`). ``rdf.yaml`` carries no hash of itself, so every other file keeps
its recorded sha256. The new zip is tested with ``bioimageio.core`` before it gets its name.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from ..atomic import publish, remove_stale, temp_sibling
from ._yaml import dump_yaml
from .archive import open_package
from .modeltest import PackageTestSummary, run_model_test

if TYPE_CHECKING:
    from .gate import GateReport

__all__ = ["RecordResult", "record_gate_results"]

logger = logging.getLogger(__name__)


class RecordResult(BaseModel):
    """The package written by :func:`record_gate_results` and its bioimage.io test."""

    model_config = ConfigDict(extra="forbid")

    package: Path
    test: PackageTestSummary


def record_gate_results(
    package: str | os.PathLike[str], report: GateReport, output: str | os.PathLike[str], *, overwrite: bool = False,
    trust_code: bool = False,
) -> RecordResult:
    """Write a copy of ``package`` with the accepted gate figures in ``config.tilenorm_bmz.gate``.

    Parameters
    ----------
    package
        The validated package (zip, folder or rdf.yaml); only read.
    report
        Its accepted :class:`~tilenorm_bmz.bmz.GateReport`.
    output
        The new package zip (must differ from ``package``).
    overwrite
        Replace an existing ``output``.
    trust_code
        Let the bioimage.io test of the new package run weights that need the package's code (as for
        ``validate``); without it only the formats that run no code of the package are tested.

    Raises
    ------
    ValueError
        The report is not an accepted package report, the output is the input, or the new package fails the
        bioimage.io test (then nothing is written).
    FileExistsError
        ``output`` exists and ``overwrite`` is False.
    """
    src, out = Path(package), Path(output)
    if report.kind != "package":
        raise ValueError("gate figures are recorded in bioimage.io packages; this report is of a checkpoint")
    if not report.accepted:
        raise ValueError(f"only accepted figures are recorded; {src.name} was rejected ({report.summary()})")
    if out.suffix.lower() != ".zip":
        raise ValueError(f"the recorded package must be a .zip file, got {out.name}")
    if out.resolve() == src.resolve():
        raise ValueError("--record writes a new package: choose an output other than the validated package")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temp_sibling(out, ".zip")
    try:
        with open_package(src) as files:
            root = files.root()
            rdf = dict(files.rdf)
            config = dict(rdf.get("config") or {})
            tool = dict(config.get("tilenorm_bmz") or {})
            tool["gate"] = report.figures()
            config["tilenorm_bmz"] = tool
            rdf["config"] = config
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
                zout.writestr("rdf.yaml", dump_yaml(rdf))
                for path in sorted(p for p in root.rglob("*") if p.is_file()):
                    if path.name in ("rdf.yaml", "bioimageio.yaml") and path.parent == root:
                        continue
                    zout.write(path, path.relative_to(root).as_posix())
        from .package_io import untrusted_test_plan

        runs, fmt = untrusted_test_plan(tmp, trust_code)
        if not runs:
            raise ValueError("the recorded package could not be re-tested without running its code: pass --trust-code")
        test = run_model_test(tmp, fmt)
        if not test.passed:
            raise ValueError(f"the package with the recorded figures fails the bioimage.io test ({test.short()}); "
                             "nothing was written")
        publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("recorded the gate figures in %s (%s)", out, test.short())
    return RecordResult(package=out, test=test)
