"""Will ilastik and deepImageJ run this package? A static compatibility report with a fix for every failure.

The checks follow what the consumers really do (see ../shared/reference/bioimageio.md, section 6):

* **ilastik** (Neural Network workflow -> tiktorch -> bioimageio.core 0.10.2 / spec 0.5.9.1): exactly one
  input and one output, a channel axis on the output, 2 or 3 spatial axes, axis ids among batch, channel,
  time, z, y, x, TorchScript or PyTorch state-dict weights, and an rdf that spec 0.5.9 reads (format <= 0.5.10
  with plain documentation/cover paths). Per-image ``scale_range`` is computed per tile in ilastik (warning).
* **deepImageJ** (JDLL): one input, TorchScript or single-file ONNX weights, a TorchScript file whose
  operators all exist in libtorch 2.0.1 (JDLL's newest; :mod:`.libtorch`), ``min`` a multiple of ``step``
  on every parameterized axis, the input sample tensor equal to the input test tensor (its CI runs the
  sample and compares with the test output), tiling allowed (no ``config.deepimagej`` or
  ``allow_tiling: true``), no format 0.5.11+ objects. Its percentiles are nearest-rank (warning).
* **environment**: pydantic below 2.14 (bioimageio.spec 0.5.12 breaks with it).

Works on any package (zip, folder, rdf.yaml), ours or anyone's; reads files, modifies nothing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..errors import IntegrityError
from .archive import PackageFiles, open_package
from .libtorch import LIBTORCH_REFERENCE, known_operators, torchscript_operators
from .package_io import PackageError

__all__ = ["CompatCheck", "CompatibilityReport", "check_compatibility", "check_torchscript_operators"]

Consumer = Literal["ilastik", "deepimagej", "environment"]
_ILASTIK_AXES = {"batch", "channel", "time", "z", "y", "x"}
_SPATIAL = {"z", "y", "x"}


class CompatCheck(BaseModel):
    """One compatibility check."""

    model_config = ConfigDict(extra="forbid")

    consumer: Consumer
    name: str
    status: Literal["pass", "fail", "warn"]
    detail: str = ""
    fix: str = ""


class CompatibilityReport(BaseModel):
    """All checks for one package."""

    model_config = ConfigDict(extra="forbid")

    source: str
    format_version: str
    checks: list[CompatCheck]

    def compatible(self, consumer: Consumer) -> bool:
        """True when no check of ``consumer`` failed (warnings allowed)."""
        return all(c.status != "fail" for c in self.checks if c.consumer == consumer)

    @property
    def failed(self) -> list[CompatCheck]:
        return [c for c in self.checks if c.status == "fail"]

    def summary(self) -> str:
        parts = []
        for consumer in ("ilastik", "deepimagej", "environment"):
            checks = [c for c in self.checks if c.consumer == consumer]
            n_fail = sum(c.status == "fail" for c in checks)
            n_warn = sum(c.status == "warn" for c in checks)
            state = "ok" if not n_fail else f"{n_fail} failed"
            parts.append(f"{consumer}: {state}" + (f", {n_warn} warning(s)" if n_warn else ""))
        return "; ".join(parts)


def _axis_id(axis: Any) -> str:
    if isinstance(axis, Mapping):
        return str(axis.get("id") or axis.get("type"))
    return str(axis)


def _axes(tensor: Mapping[str, Any]) -> list[Any]:
    axes = tensor.get("axes") or []
    if isinstance(axes, str):  # format 0.4: "bcyx"
        names = {"b": "batch", "c": "channel", "t": "time", "i": "index"}
        return [{"id": names.get(a, a), "type": names.get(a, "space")} for a in axes]
    return list(axes)


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _fmt_tuple(fv: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in fv.split(".")[:3])
    except ValueError:
        return (99,)


def _load_array(files: PackageFiles, source: Any) -> np.ndarray | None:
    if isinstance(source, Mapping):
        source = source.get("source")
    if not isinstance(source, str) or "://" in source:
        return None
    try:
        path = files.file(source, "test tensor")
    except IntegrityError:  # missing: reported by the checks that need it
        return None
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(io.BytesIO(path.read_bytes()))
    return None


def _preprocessing_ids(rdf: Mapping[str, Any]) -> list[str]:
    inputs = rdf.get("inputs") or []
    steps = (inputs[0].get("preprocessing") or []) if inputs else []
    return [str(s.get("id") or s.get("name")) for s in steps]


def _ilastik(rdf: Mapping[str, Any], fv: str) -> list[CompatCheck]:
    out: list[CompatCheck] = []
    inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []

    def add(name: str, ok: bool, detail: str, fix: str, warn: bool = False) -> None:
        status = "pass" if ok else ("warn" if warn else "fail")
        out.append(CompatCheck(consumer="ilastik", name=name, status=status, detail=detail, fix="" if ok else fix))

    add("one input and one output", len(inputs) == 1 and len(outputs) == 1,
        f"{len(inputs)} input(s), {len(outputs)} output(s)", "ilastik runs single-input, single-output models only")
    out_axes = [_axis_id(a) for a in _axes(outputs[0])] if outputs else []
    add("channel axis on the output", "channel" in out_axes, f"output axes {out_axes}",
        "add a channel axis to the output tensor")
    n_spatial = sum(a in _SPATIAL for a in out_axes)
    add("2 or 3 spatial axes", n_spatial in (2, 3), f"{n_spatial} spatial output axes", "use 2D or 3D (z, y, x) axes")
    all_axes = {_axis_id(a) for t in inputs + outputs for a in _axes(t)}
    bad = sorted(all_axes - _ILASTIK_AXES)
    add("axis ids ilastik knows", not bad, f"axis ids {sorted(all_axes)}",
        f"rename axes {bad} to batch, channel, time, z, y or x")
    weights = set(rdf.get("weights") or {})
    add("torchscript or pytorch_state_dict weights", bool(weights & {"torchscript", "pytorch_state_dict"}),
        f"weights: {sorted(weights)}", "add torchscript weights (tilenorm-bmz package writes them by default)")
    readable = fv.startswith("0.4") or (
        _fmt_tuple(fv) <= (0, 5, 10) and _is_plain(rdf.get("documentation"))
        and all(_is_plain(c) for c in rdf.get("covers") or [])
    )
    add("readable by bioimageio.spec 0.5.9 (ilastik's stack)", readable,
        f"format {fv}, documentation {'plain path' if _is_plain(rdf.get('documentation')) else 'file object'}",
        "write the package in legacy mode (the default of tilenorm-bmz package; do not pass --no-legacy)")
    ids = _preprocessing_ids(rdf)
    per_tile = "scale_range" in ids or "zero_mean_unit_variance" in ids
    add("tile-consistent preprocessing", not per_tile, f"preprocessing {ids}",
        "ilastik normalizes every tile on its own, so per-image statistics differ between tiles; export with "
        "--input-norm fixed for identical tiles", warn=True)
    return out


def _deepimagej(rdf: Mapping[str, Any], fv: str, files: PackageFiles) -> list[CompatCheck]:
    out: list[CompatCheck] = []
    inputs = rdf.get("inputs") or []

    def add(name: str, ok: bool, detail: str, fix: str, warn: bool = False) -> None:
        status = "pass" if ok else ("warn" if warn else "fail")
        out.append(CompatCheck(consumer="deepimagej", name=name, status=status, detail=detail, fix="" if ok else fix))

    add("one input", len(inputs) == 1, f"{len(inputs)} input(s)", "deepImageJ runs single-input models only")
    weights = rdf.get("weights") or {}
    onnx = weights.get("onnx")
    single_onnx = isinstance(onnx, Mapping) and not onnx.get("external_data")
    add("torchscript or single-file ONNX weights", "torchscript" in weights or single_onnx,
        f"weights: {sorted(weights)}" + (" (ONNX with external data)" if onnx and not single_onnx else ""),
        "add torchscript weights, or ONNX in one file (tilenorm-bmz package --onnx)")
    operators = _libtorch_operators(rdf, files)
    if operators is not None:
        out.append(operators)
    bad_steps = []
    for t in inputs:
        for a in _axes(t):
            size = a.get("size") if isinstance(a, Mapping) else None
            parameterized = isinstance(size, Mapping) and "min" in size and bool(size.get("step"))
            if parameterized and int(size["min"]) % int(size["step"]):
                bad_steps.append(f"{_axis_id(a)}: min {size['min']}, step {size['step']}")
    add("min a multiple of step", not bad_steps, "; ".join(bad_steps) or "all parameterized axes",
        "choose min as a multiple of step (deepImageJ rejects other tile sizes)")
    if inputs:
        test = _load_array(files, inputs[0].get("test_tensor") or (rdf.get("test_inputs") or [None])[0])
        sample = _load_array(files, inputs[0].get("sample_tensor") or (rdf.get("sample_inputs") or [None])[0])
        if sample is None:
            add("sample tensor equals test tensor", test is not None, "no sample tensor: the test tensor is run",
                "add a test tensor")
        else:
            same = test is not None and test.size == sample.size and np.array_equal(
                np.asarray(test, dtype=np.float64).ravel(), np.asarray(sample, dtype=np.float64).ravel()
            )
            add("sample tensor equals test tensor", same,
                "same data" if same else "the input sample differs from the input test tensor",
                "write the input test tensor also as the sample tensor (deepImageJ's check runs the sample and "
                "compares with the test output)")
    dij = (rdf.get("config") or {}).get("deepimagej")
    tiling = not isinstance(dij, Mapping) or bool(dij.get("allow_tiling", False))
    add("tiling allowed", tiling, "config.deepimagej absent" if dij is None else f"config.deepimagej: {dij}",
        "remove config.deepimagej or set allow_tiling: true")
    plain = _is_plain(rdf.get("documentation")) and all(_is_plain(c) for c in rdf.get("covers") or [])
    add("no format 0.5.11+ file objects", plain,
        f"format {fv}, documentation/covers {'plain paths' if plain else 'file objects'}",
        "write the package in legacy mode (the default of tilenorm-bmz package)")
    ids = _preprocessing_ids(rdf)
    add("percentiles computed the same way", "scale_range" not in ids,
        f"preprocessing {ids}" if "scale_range" not in ids else
        "deepImageJ's scale_range uses nearest-rank percentiles, bioimage.io.core linear interpolation",
        "small differences are expected; --input-norm fixed makes them identical", warn=True)
    return out


def _libtorch_operators(rdf: Mapping[str, Any], files: PackageFiles) -> CompatCheck | None:
    """Whether every operator of the package's TorchScript file exists in libtorch 2.0.1 (:mod:`.libtorch`);
    None without TorchScript weights."""
    import torch

    ts = (rdf.get("weights") or {}).get("torchscript")
    if not (isinstance(ts, Mapping) and isinstance(ts.get("source"), str)):
        return None
    source = ts["source"]

    def check(ok: bool, detail: str) -> CompatCheck:
        return CompatCheck(
            consumer="deepimagej", name=f"TorchScript operators exist in libtorch {LIBTORCH_REFERENCE}",
            status="pass" if ok else "fail", detail=detail, fix="" if ok else (
                "export the network traced and frozen (torch.jit.freeze(torch.jit.trace(net, x)), checked at "
                "several sizes; tilenorm-bmz package does this when the scripted graph needs newer operators), "
                "or avoid the operators named"),
        )

    if "://" in source:
        return check(False, f"TorchScript weights at {source}: not in the package, not checked")
    try:
        module = torch.jit.load(str(files.file(source, "TorchScript weights")), map_location="cpu")
    except (IntegrityError, RuntimeError, OSError) as e:
        return check(False, f"the TorchScript file does not load here: {str(e).splitlines()[0][:200]}")
    ops = torchscript_operators(module)
    missing = sorted(ops - known_operators())
    if missing:
        return check(False, f"{len(missing)} operator(s) libtorch {LIBTORCH_REFERENCE} lacks (deepImageJ: "
                            f"'Unknown builtin op'): {', '.join(missing[:5])}")
    return check(True, f"all {len(ops)} operators exist in libtorch {LIBTORCH_REFERENCE}")


def check_torchscript_operators(source: str | os.PathLike[str]) -> CompatCheck | None:
    """The deepImageJ operator check of a package alone (None: no TorchScript weights); see :mod:`.libtorch`."""
    with open_package(source) as files:
        return _libtorch_operators(files.rdf, files)


def _environment() -> list[CompatCheck]:
    import pydantic

    version = tuple(int(p) for p in pydantic.VERSION.split(".")[:2])
    ok = version < (2, 14)
    return [CompatCheck(
        consumer="environment", name="pydantic below 2.14", status="pass" if ok else "fail",
        detail=f"pydantic {pydantic.VERSION}",
        fix="" if ok else "pip install 'pydantic<2.14' (bioimageio.spec 0.5.12 fails with 2.14)",
    )]


def check_compatibility(source: str | os.PathLike[str]) -> CompatibilityReport:
    """Check a package (zip, folder or rdf.yaml) against ilastik and deepImageJ, and the environment."""
    with open_package(source) as files:
        rdf = files.rdf
        if rdf.get("type") != "model":
            raise PackageError(f"{source} describes a {rdf.get('type')!r}, not a model")
        fv = str(rdf.get("format_version", ""))
        checks = _ilastik(rdf, fv) + _deepimagej(rdf, fv, files) + _environment()
    return CompatibilityReport(source=str(source), format_version=fv, checks=checks)
