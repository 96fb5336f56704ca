"""Read bioimage.io model packages (zip, folder or rdf.yaml; format 0.4 and 0.5) back into PyTorch.

:func:`read_package_model` rebuilds the network of a package with ``pytorch_state_dict`` weights (the
architecture from its source file or from an importable library) so that ``tilenorm-bmz convert`` can
turn a published model back into a BatchRenorm checkpoint and fine-tune it. Zip members are checked for
path traversal before anything is extracted; the input is never modified (zips are extracted into a
temporary folder, folders are only read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

from ..checkpoint import ArchitectureSpec, build_model, load_state_strict, load_torch_file
from ._yaml import load_yaml

__all__ = ["PackageError", "open_package", "read_package_model", "read_rdf", "safe_extract"]

logger = logging.getLogger(__name__)

_RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


class PackageError(ValueError):
    """A file is not a usable bioimage.io model package (or not for the asked purpose)."""


def _check_member(name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise PackageError(f"unsafe path {name!r} in the zip (absolute or leaving the package folder): not extracted")


def safe_extract(zip_path: Path, target: Path) -> Path:
    """Extract ``zip_path`` into ``target`` after checking every member name for path traversal."""
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise PackageError(f"symbolic link {info.filename!r} in the zip: not extracted")
        zf.extractall(target)
    return target


def _rdf_in(folder: Path) -> Path:
    for name in _RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise PackageError(f"{folder} has no rdf.yaml (or bioimageio.yaml): not a bioimage.io package")


@contextlib.contextmanager
def open_package(source: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield the path of the package's rdf.yaml in a readable folder (a temporary copy for zips)."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir():
        yield _rdf_in(src)
    elif src.suffix.lower() in (".yaml", ".yml"):
        yield src
    elif zipfile.is_zipfile(src):
        with tempfile.TemporaryDirectory(prefix="tilenorm_bmz_pkg_") as tmp:
            safe_extract(src, Path(tmp))
            yield _rdf_in(Path(tmp))
    else:
        raise PackageError(f"{src} is not a bioimage.io package: expected a .zip, a folder or an rdf.yaml")


def read_rdf(rdf_path: Path) -> dict[str, Any]:
    """The raw description (YAML) of a package."""
    try:
        data = load_yaml(rdf_path.read_text(encoding="utf-8"))
    except Exception as e:  # ruyaml raises several error types
        raise PackageError(f"{rdf_path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PackageError(f"{rdf_path} does not hold a mapping")
    return data


def _local_file(root: Path, source: Any, what: str) -> Path:
    if isinstance(source, Mapping):
        source = source.get("source")
    if not isinstance(source, str) or not source:
        raise PackageError(f"the package names no file for {what}")
    if "://" in source:
        raise PackageError(f"{what} is a remote file ({source}); download the package with its files first")
    _check_member(source)
    path = (root / source).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PackageError(f"{what} {source!r} lies outside the package")
    if not path.is_file():
        raise PackageError(f"{what} {source!r} is missing from the package")
    return path


def _architecture_spec(root: Path, weights: Mapping[str, Any], tool: Mapping[str, Any]) -> ArchitectureSpec:
    recorded = tool.get("architecture") if isinstance(tool, Mapping) else None
    arch = weights.get("architecture")
    kwargs = dict(weights.get("kwargs") or {})  # format 0.4 keeps kwargs next to the architecture
    if isinstance(recorded, Mapping) and recorded.get("kind") == "unet":
        return ArchitectureSpec(kind="unet", kwargs=dict(recorded.get("kwargs") or {}))
    if isinstance(arch, Mapping):  # format 0.5
        callable_name = arch.get("callable")
        kwargs = dict(arch.get("kwargs") or {})
        if arch.get("import_from"):
            return ArchitectureSpec(kind="callable", target=f"{arch['import_from']}:{callable_name}", kwargs=kwargs)
        file_path = _local_file(root, arch.get("source"), "the architecture source")
    elif isinstance(arch, str):  # format 0.4: "file.py:Callable" or "package.module.Callable"
        if ":" in arch and arch.split(":")[0].endswith(".py"):
            file_part, _, callable_name = arch.rpartition(":")
            file_path = _local_file(root, file_part, "the architecture source")
        else:
            module, _, name = arch.rpartition(".")
            return ArchitectureSpec(kind="callable", target=f"{module}:{name}", kwargs=kwargs)
    else:
        raise PackageError("the pytorch_state_dict weights name no architecture")
    if file_path.suffix != ".py":
        raise PackageError(f"architecture source {file_path.name} is not a Python file (zipped modules are not supported)")
    return ArchitectureSpec(
        kind="source", source_code=file_path.read_text(encoding="utf-8"), source_name=file_path.name,
        callable=str(callable_name), kwargs=kwargs,
    )


def _restore_renorm(model: nn.Module, tool: Mapping[str, Any]) -> dict[str, Any] | None:
    """Give a network trained with BatchRenorm (and exported as BatchNorm) back its BatchRenorm layers with the
    clipping limits it ended training with, so that train mode behaves as it did in training (what the
    train/eval disparity and fine-tuning need). Returns ``{"step", "r_max", "d_max", "schedule"}`` or None."""
    from ..config import RenormSchedule
    from ..norm import BatchRenorm, convert_norm

    norm_kind = tool.get("norm_kind") if isinstance(tool, Mapping) else None
    trained = norm_kind.get("trained") if isinstance(norm_kind, Mapping) else None
    training = tool.get("training") if isinstance(tool, Mapping) else None
    if trained != "batchrenorm" or not isinstance(training, Mapping):
        return None
    if not any(isinstance(m, BatchRenorm) for m in model.modules()):
        convert_norm(model, to="batchrenorm", inplace=True)
    step = int(training.get("step") or 0)
    raw = training.get("renorm_schedule")
    schedule = RenormSchedule.model_validate(raw) if isinstance(raw, Mapping) else None
    r_max, d_max = schedule.apply(model, step) if schedule is not None else (1.0, 0.0)
    return {"step": step, "r_max": r_max, "d_max": d_max,
            "schedule": schedule.model_dump(mode="json") if schedule else None}


def _input_normalization(rdf: Mapping[str, Any], tool: Mapping[str, Any]) -> dict[str, Any] | None:
    """The normalization a package applies, as ``InputNormalization`` fields (None if not expressible)."""
    recorded = tool.get("input_normalization") if isinstance(tool, Mapping) else None
    if isinstance(recorded, Mapping):
        return dict(recorded)
    inputs = rdf.get("inputs") or []
    steps = inputs[0].get("preprocessing") or [] if inputs else []
    ids = [s.get("id") or s.get("name") for s in steps]
    clip = "clip" in ids
    for step in steps:
        kind = step.get("id") or step.get("name")
        kw = step.get("kwargs") or {}
        axes = kw.get("axes")
        per_sample = axes is not None and "batch" not in axes and "b" not in str(axes)
        if kind == "scale_range" and per_sample and kw.get("mode", "per_sample") == "per_sample":
            return {"mode": "global", "lower": float(kw.get("min_percentile", 0.0)) / 100,
                    "upper": float(kw.get("max_percentile", 100.0)) / 100, "clip": clip,
                    "eps": float(kw.get("eps", 1e-6))}
        if kind == "scale_linear" and "gain" in kw:
            gains = kw["gain"] if isinstance(kw["gain"], list) else [kw["gain"]]
            offsets = kw.get("offset", 0.0)
            offsets = offsets if isinstance(offsets, list) else [offsets] * len(gains)
            low = [-o / g for o, g in zip(offsets, gains, strict=True)]
            high = [lo + 1.0 / g for lo, g in zip(low, gains, strict=True)]
            return {"mode": "fixed", "low": low, "high": high, "clip": clip, "eps": 1e-12}
    if any(i not in (None, "ensure_dtype") for i in ids):
        logger.warning(
            "the package's preprocessing (%s) has no tilenorm-bmz equivalent; it is kept in "
            "extra['bioimageio']['preprocessing'] and the default normalization is used", ", ".join(map(str, ids)),
        )
    return None


def read_package_model(source: str | os.PathLike[str]) -> tuple[nn.Module, ArchitectureSpec, dict[str, Any]]:
    """Rebuild the network of a bioimage.io model package with its ``pytorch_state_dict`` weights.

    Parameters
    ----------
    source
        A package zip, an unpacked package folder or its rdf.yaml (format 0.4 or 0.5).

    Returns
    -------
    (model, spec, extra)
        The network in eval mode with the package's weights; the :class:`ArchitectureSpec` that rebuilds
        it; metadata with ``extra["input_normalization"]`` (the package's preprocessing as
        ``InputNormalization`` fields, when expressible) and ``extra["bioimageio"]`` (name, format version,
        halo, the raw preprocessing, and ``config.tilenorm_bmz`` for our own packages).

    Raises
    ------
    PackageError
        Not a model package, no ``pytorch_state_dict`` weights, unsafe zip, missing files.
    CheckpointError
        The weights do not fit the architecture.
    """
    with open_package(source) as rdf_path:
        root = rdf_path.parent
        rdf = read_rdf(rdf_path)
        if rdf.get("type") != "model":
            raise PackageError(f"{source} describes a {rdf.get('type')!r}, not a model")
        _validate_format(rdf_path)
        weights = (rdf.get("weights") or {}).get("pytorch_state_dict")
        if not isinstance(weights, Mapping):
            present = ", ".join(sorted(rdf.get("weights") or {})) or "none"
            raise PackageError(
                f"{source} has no pytorch_state_dict weights (it has: {present}); tilenorm-bmz can only read "
                "PyTorch state dicts back into a trainable network"
            )
        tool = ((rdf.get("config") or {}).get("tilenorm_bmz")) or {}
        spec = _architecture_spec(root, weights, tool)
        state = load_torch_file(_local_file(root, weights.get("source"), "the pytorch_state_dict weights"))
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        model = build_model(spec)
        load_state_strict(model, state, f"{source}: the weights do not fit the architecture {spec.describe()}")
        renorm = _restore_renorm(model, tool)
        model.eval()
        inputs = rdf.get("inputs") or [{}]
        outputs = rdf.get("outputs") or [{}]
        extra: dict[str, Any] = {
            "bioimageio": {
                "source": str(source),
                "name": rdf.get("name"),
                "format_version": rdf.get("format_version"),
                "halo": {a.get("id"): a.get("halo") for a in outputs[0].get("axes") or []
                         if isinstance(a, Mapping) and a.get("halo")},
                "preprocessing": inputs[0].get("preprocessing") or [],
                "tilenorm_bmz": dict(tool),
            }
        }
        norm = _input_normalization(rdf, tool)
        if norm is not None:
            extra["input_normalization"] = norm
        if renorm is not None:
            extra["renorm"] = renorm
    logger.info("read %s (%s) from %s", spec.describe(), rdf.get("name"), source)
    return model, spec, extra


def _validate_format(rdf_path: Path) -> None:
    from bioimageio.spec import InvalidDescr, load_model_description

    descr = load_model_description(rdf_path, perform_io_checks=False, format_version="discover")
    if isinstance(descr, InvalidDescr):
        errors = "; ".join(
            f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in descr.validation_summary.details for e in d.errors
        )
        raise PackageError(f"{rdf_path.parent.name}/{rdf_path.name} is not a valid bioimage.io model: {errors[:1500]}")
