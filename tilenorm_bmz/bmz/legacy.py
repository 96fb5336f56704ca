"""Legacy compatibility: rewrite a package's rdf.yaml so that today's consumers can read it.

bioimageio.spec >= 0.5.11 serializes ``documentation``, ``covers`` and ``icon`` as file objects
(``{source, sha256}``). ilastik's stack (tiktorch pins bioimageio.core 0.10.2 -> bioimageio.spec 0.5.9.1)
rejects them ("covers ... Input should be a valid string") and deepImageJ's parser (JDLL) casts
``documentation`` to a string. Format 0.5.4 describes the same model with plain relative paths, is the
lowest 0.5 version with ``config.bioimageio.reproducibility_tolerance``, and the current spec still reads
it (it up-converts plain paths below 0.5.11).

Why a rewrite of the dumped dict and not spec objects: the installed bioimageio.spec can only *write* its
own newest format version. So the description is built and validated with spec objects and packaged with
``save_bioimageio_package``; then the dumped ``rdf.yaml`` is loaded as data, exactly these fields are
changed, and it is dumped again (YAML 1.2 with ruyaml, as bioimageio.spec does: PyYAML would read
``1e-05`` as a string). The result is re-validated by the bioimage.io model test of the export
(current stack) and, in the test suite, by the legacy stack itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..foreign import RDF_NAMES
from ._yaml import dump_yaml, load_yaml

__all__ = ["LEGACY_FORMAT_VERSION", "legacy_rdf", "write_legacy_package"]

logger = logging.getLogger(__name__)

#: The format version written in legacy mode (<= 0.5.10, >= 0.5.4 for reproducibility_tolerance).
LEGACY_FORMAT_VERSION = "0.5.4"


def _plain(value: Any) -> Any:
    if isinstance(value, dict) and "source" in value:
        return value["source"]
    return value


def legacy_rdf(rdf: dict[str, Any]) -> dict[str, Any]:
    """A copy of the dumped model rdf in legacy form (plain documentation/covers/icon paths, format 0.5.4)."""
    if rdf.get("type") != "model":
        raise ValueError(f"legacy rewrite applies to model descriptions, got type {rdf.get('type')!r}")
    fv = str(rdf.get("format_version", ""))
    if not fv.startswith("0.5."):
        raise ValueError(f"legacy rewrite expects a format 0.5.x description, got {fv!r}")
    out = dict(rdf)
    out["format_version"] = LEGACY_FORMAT_VERSION
    if "documentation" in out:
        out["documentation"] = _plain(out["documentation"])
    if "covers" in out:
        out["covers"] = [_plain(c) for c in out["covers"]]
    if "icon" in out:
        out["icon"] = _plain(out["icon"])
    return out


def write_legacy_package(source: Path, output: Path) -> Path:
    """Copy the package zip ``source`` to ``output`` with its rdf rewritten by :func:`legacy_rdf`.

    ``source`` is not modified; ``output`` is written atomically.
    """
    with zipfile.ZipFile(source) as zin:
        names = zin.namelist()
        rdf_name = next((n for n in names if n in RDF_NAMES), None)
        if rdf_name is None:
            raise ValueError(f"{source} has no rdf.yaml at its root")
        rdf = load_yaml(zin.read(rdf_name))
        text = dump_yaml(legacy_rdf(rdf))
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
                zout.writestr(rdf_name, text)
                for info in zin.infolist():
                    if info.filename != rdf_name:
                        zout.writestr(info, zin.read(info.filename))
            os.replace(tmp, output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    logger.info("wrote legacy (format %s) package %s", LEGACY_FORMAT_VERSION, output)
    return output
