"""``export_package``: a checkpoint -> a tested, zoo-ready bioimage.io model package (format 0.5).

Steps (each in its own module):

1. the network in eval form, every BatchRenorm replaced by the equal BatchNorm (:mod:`.weights`);
2. halo from the receptive field, size step = the network's divisor, ``min`` (:mod:`.geometry`);
3. test input = a valid-size crop of real raw data, test output = the uncropped raw model output under the
   package's own preprocessing maths; sample tensors = the same arrays; cover (:mod:`.artifacts`);
4. README with a ``# Validation`` section (:mod:`.documentation`), the description from ``bioimageio.spec``
   objects (:mod:`.descr`), written with ``save_bioimageio_package``;
5. legacy rewrite for ilastik / deepImageJ (:mod:`.legacy`, default on);
6. ``bioimageio.core.test_model`` for every weight format, full determinism (:mod:`.modeltest`); then the
   optional acceptance gate (a callback); only then the package is renamed to ``output``. A package that
   fails is kept as ``<name>.rejected.zip`` next to a ``.summary.md`` and :class:`PackageRejected` is raised.

Nothing here touches the network: no ``github_user`` lookups, local files only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .._json import jsonable
from .._version import __version__
from ..atomic import publish, remove_stale, temp_sibling
from ..checkpoint import ArchitectureSpec, CheckpointInfo, architecture_of, read_checkpoint
from ..config import ExportConfig
from ..norm import renorm_limits
from ..progress import progress_bar
from .artifacts import crop_test_input, load_sample, make_test_tensors, write_cover
from .compat import CompatibilityReport, check_compatibility
from .documentation import DocumentationContext, render_readme
from .geometry import AxisGeometry, package_geometry
from .legacy import LEGACY_FORMAT_VERSION, write_legacy_package
from .modeltest import PackageTestSummary, run_model_test
from .normalization import PackageNormalization
from .weights import (
    ArchitectureArtifact,
    eval_form,
    write_architecture,
    write_onnx,
    write_state_dict,
    write_torchscript,
)

__all__ = [
    "INPUT_STATISTICS_KEY",
    "VALIDATION_DATA_KEY",
    "ExportResult",
    "GateHook",
    "checkpoint_sample",
    "GateOutcome",
    "PackageRejected",
    "export_package",
    "rejected_path",
]

logger = logging.getLogger(__name__)

#: Checkpoint ``extra`` key with the image paths the training loop validated on (a path or a list of
#: paths); the first one is the sample of a package when no ``sample`` is given.
VALIDATION_DATA_KEY = "validation_data"
#: Checkpoint ``extra`` key with training-data statistics ``{"low": [...], "high": [...]}`` per channel
#: (the ``lower``/``upper`` quantiles of the training images) used by ``input_norm="fixed"``.
INPUT_STATISTICS_KEY = "input_statistics"


class GateOutcome(Protocol):
    """What a gate callback returns (e.g. the ``GateReport`` of :func:`tilenorm_bmz.bmz.validate_package`)."""

    @property
    def accepted(self) -> bool: ...


#: Called with the tested candidate package (a zip path) before it is given its final name.
GateHook = Callable[[Path], GateOutcome]


class ExportResult(BaseModel):
    """What :func:`export_package` wrote and measured."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    package: Path | None
    """The written package; None when it was rejected."""
    rejected: Path | None = None
    """Where a rejected package was kept (``<name>.rejected.zip``)."""
    status: Literal["written", "rejected"]
    name: str
    format_version: str
    legacy: bool
    dims: int
    axes: list[str]
    halo: dict[str, int]
    measured_halo: dict[str, int] | None
    min_size: dict[str, int]
    step: dict[str, int]
    weight_formats: list[str]
    input_normalization: PackageNormalization
    test_input_shape: list[int]
    test: PackageTestSummary | None = None
    gate: Any = None
    compatibility: CompatibilityReport | None = None
    tool_config: dict[str, Any] = {}
    notes: list[str] = []


class PackageRejected(RuntimeError):
    """The written package failed the bioimage.io test or the gate; ``result`` holds the full evidence."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


def rejected_path(output: Path) -> Path:
    """``model.zip`` -> ``model.rejected.zip``."""
    suffix = output.suffix or ".zip"
    return output.with_name(f"{output.name[: -len(output.suffix)] if output.suffix else output.name}.rejected{suffix}")


# -- inputs -----------------------------------------------------------------------------------------------
def _load(checkpoint_or_model: str | os.PathLike[str] | nn.Module,
          trust_code: bool) -> tuple[nn.Module, CheckpointInfo | None]:
    if isinstance(checkpoint_or_model, nn.Module):
        return checkpoint_or_model, None
    from .opening import open_model

    handle = open_model(checkpoint_or_model, trust_code=trust_code, allow=("checkpoint",))
    return handle.network, handle.checkpoint_info


def _model_dims(model: nn.Module) -> int:
    from ..introspect import model_dims

    return model_dims(model)


def _in_channels(model: nn.Module) -> int:
    from ..introspect import model_in_channels

    return model_in_channels(model)


def _out_channels(model: nn.Module, in_channels: int, sizes: Sequence[int]) -> int:
    value = getattr(model, "out_channels", None)
    if isinstance(value, int):
        return value
    with torch.no_grad():
        return int(model.eval()(torch.zeros((1, in_channels, *sizes))).shape[1])


def _measure_receptive_field(
    model: nn.Module, dims: int, divisor: Sequence[int], in_channels: int
) -> tuple[list[int] | None, dict[str, Any]]:
    """Recommended halo per axis (None when normalization couples the tile) and the JSON-able RF report."""
    from ..tiling.receptive_field import receptive_field

    report = receptive_field(model, dims, divisor=tuple(divisor), in_channels=in_channels)
    record = report.model_dump(mode="json")
    if report.normalization_couples_tile:
        logger.warning("normalization couples the whole tile (%s): no halo makes tiles seamless",
                       report.coupling_reason or "tile-wise normalization")
        return None, record
    return [int(h) for h in report.recommended_halo], record


def _validation_region(record: dict[str, Any], info: CheckpointInfo | None) -> np.ndarray | None:
    """The held-out region a training run recorded (``Trainer`` writes ``extra["validation_data"]`` as a list
    of ``{name, sample, image, labels, region}``), read from its file, the embedded sample, or regenerated
    synthetic data. ``None`` when the data is not available here."""
    from ..config import DataConfig
    from ..data.dataset import open_pairs

    train_cfg = (info.extra if info else {}).get("train_config") or {}
    region = tuple(slice(int(a), int(b)) for a, b in record.get("region") or [])
    try:
        if record.get("sample") is not None and train_cfg.get("data"):
            pairs = open_pairs(DataConfig.model_validate(train_cfg["data"]))
            image = next((p.image for p in pairs if p.name == record.get("name")), pairs[0].image)
        elif record.get("image") and Path(record["image"]).exists():
            from ..data import open_image

            image = open_image(record["image"])
        else:
            return None
    except (OSError, ValueError) as e:
        logger.warning("the checkpoint's validation data could not be opened (%s)", e)
        return None
    logger.info("using the checkpoint's validation region %s of %s as sample", region, record.get("name"))
    return np.asarray(image[(slice(None), *region)] if region else image.read())


def checkpoint_sample(checkpoint: str | os.PathLike[str]) -> Any:
    """The sample a checkpoint records: its held-out validation region (an array) or validation image path.

    Raises ``ValueError``/``FileNotFoundError`` with what to do when the checkpoint records none that exists.
    """
    raw = read_checkpoint(checkpoint)  # metadata only: no network is built
    info = CheckpointInfo(path=Path(checkpoint), architecture=ArchitectureSpec.model_validate(raw["architecture"]),
                          step=int(raw.get("step") or 0), extra=dict(raw.get("extra") or {}))
    return _sample_source(None, info)


def _sample_source(sample: Any, info: CheckpointInfo | None) -> Any:
    if sample is not None:
        return sample
    recorded = (info.extra if info else {}).get(VALIDATION_DATA_KEY)
    if isinstance(recorded, list) and recorded and isinstance(recorded[0], dict):
        region = _validation_region(recorded[0], info)
        if region is not None:
            return region
        recorded = [r.get("image") for r in recorded if r.get("image")]
    paths = [recorded] if isinstance(recorded, str) else list(recorded or [])
    for p in paths:
        if Path(p).exists():
            logger.info("using the checkpoint's validation image %s as sample", p)
            return Path(p)
    if paths:
        raise FileNotFoundError(
            f"the checkpoint's validation images ({', '.join(map(str, paths))}) are not found here; give a sample "
            "image with --sample IMG"
        )
    raise ValueError(
        "no sample image: the package needs real data for its test tensors and cover. Give one with --sample "
        f"IMG (the checkpoint records no validation images under extra[{VALIDATION_DATA_KEY!r}])"
    )


def _channel_names(given: Sequence[str] | None, n: int, default: Sequence[str], what: str) -> list[str]:
    if given:
        if len(given) != n:
            raise ValueError(f"{what}_channel_names has {len(given)} names but the network has {n} {what} channels")
        return list(given)
    return list(default) if len(default) == n else [f"channel{i}" for i in range(n)]


def _default_name(dims: int, trained_norm: str | None) -> str:
    norm = {"batchrenorm": "BatchRenorm", "batchnorm": "BatchNorm"}.get(trained_norm or "", "")
    return f"{norm + ' ' if norm else ''}U-Net {dims}D (tilenorm-bmz)"


# -- the export -------------------------------------------------------------------------------------------
def export_package(
    checkpoint_or_model: str | os.PathLike[str] | nn.Module,
    output: str | os.PathLike[str],
    *,
    export_config: ExportConfig | None = None,
    sample: str | os.PathLike[str] | Any = None,
    halo: int | Sequence[int] | None = None,
    weight_formats: Sequence[str] | None = None,
    input_norm: Literal["percentile", "fixed"] | None = None,
    legacy: bool | None = None,
    test: bool = True,
    gate: GateHook | None = None,
    gate_results: Mapping[str, Any] | None = None,
    divisor: Sequence[int] | None = None,
    overwrite: bool = False,
    trust_code: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Write a bioimage.io model package (zip) of a network, test it, and return what was written.

    Parameters
    ----------
    checkpoint_or_model
        A tilenorm-bmz checkpoint (any norm kind; converted foreign networks included) or a module whose
        architecture is known (our UNet, or built by ``load_checkpoint``/``build_model``).
    output
        The package zip. Written only after every test passed (atomically: a temporary name, then renamed).
    export_config
        Metadata and options (:class:`~tilenorm_bmz.config.ExportConfig`); ``authors`` is required.
    sample
        Raw real image: a path (TIFF, Zarr, .npy) or an array ``(C, *spatial)`` / ``(*spatial)``. Default: the
        checkpoint's validation image (``extra["validation_data"]``).
    halo, weight_formats, input_norm, legacy
        Override the same fields of ``export_config``.
    test
        Run ``bioimageio.core.test_model`` (every weight format, full determinism) before accepting.
    gate
        Acceptance callback run on the tested candidate; a falsy ``accepted`` rejects the package.
    gate_results
        Gate figures already known for this network, recorded in ``config.tilenorm_bmz.gate`` and the README.
    divisor
        Size divisor per spatial axis for networks that do not expose ``divisor`` (default: from the model).
    overwrite
        Replace an existing ``output``.
    trust_code
        Build a checkpoint whose stored architecture is code (see :mod:`tilenorm_bmz.bmz.opening`).
    progress
        Show a progress bar (rich) over the export steps.

    Raises
    ------
    PackageRejected
        The bioimage.io test or the gate failed; the package is kept as ``<name>.rejected.zip`` with a
        ``.summary.md`` next to it, ``err.result`` holds the full summary.
    ValueError, FileNotFoundError
        Bad input (no authors, no sample, a sample that is too small, ...), with what to change.
    """
    cfg = (export_config or ExportConfig()).model_copy()
    overrides = {"halo": halo, "input_norm": input_norm, "legacy": legacy,
                 "weight_formats": list(weight_formats) if weight_formats is not None else None}
    cfg = ExportConfig.model_validate({**cfg.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    if not cfg.authors:
        raise ValueError("a bioimage.io package needs at least one author: set authors in the export config "
                         "(name, affiliation, email, orcid) or pass --author NAME")
    if cfg.maintainers:
        logger.warning("maintainers are identified by GitHub user name, which bioimage.io checks online: the "
                       "offline package test will fail without network access")
    out = Path(output)
    if out.suffix.lower() != ".zip":
        raise ValueError(f"the package must be a .zip file, got {out.name}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)

    steps = ["network", "geometry", "test data", "weights", "package", "test", "gate"]
    with progress_bar(progress, len(steps), "package") as advance:
        def step(name: str) -> None:
            logger.info("export: %s", name)
            advance(info=name)

        # 1. the network ------------------------------------------------------------------------------------
        step("network")
        model, info = _load(checkpoint_or_model, trust_code)
        model.eval()
        dims = _model_dims(model)
        if dims not in (2, 3):
            raise ValueError(f"bioimage.io packages are written for 2D and 3D networks; this one is {dims}D")
        axes = ["z", "y", "x"][3 - dims:]
        in_ch = _in_channels(model)
        from ..introspect import infer_divisor, model_divisor

        if divisor is None and getattr(model, "divisor", None) is None:
            div = infer_divisor(model, dims, in_ch)  # a clear error (what to pass) when it cannot tell
            logger.info("size divisor %s: the product of the network's strides, checked", div)
        else:
            div = model_divisor(model, dims, divisor)  # checks the given one against the network's own
        spec = architecture_of(model) or (info.architecture if info else None)
        trained_norm = info.norm_kind if info else (getattr(model, "norm_kind", None) or
                                                   (spec.norm_conversion if spec else None))
        limits = renorm_limits(model)  # the layers' own limits: what train mode computes with
        if limits:
            trained_norm = "batchrenorm"

        # 2. halo and sizes ----------------------------------------------------------------------------------
        step("geometry")
        measured, rf_record = _measure_receptive_field(model, dims, div, in_ch)
        if measured is None and cfg.halo is None:
            raise ValueError(
                "the receptive field covers the whole tile (the network's normalization couples the tile: "
                "InstanceNorm, GroupNorm, ...): no halo makes its tiles seamless. Convert it to BatchRenorm "
                "(tilenorm-bmz convert) or give --halo N to export it anyway"
            )
        geometry = package_geometry(axes, div, measured, cfg.halo)
        exported, n_converted = eval_form(model, [g.min for g in geometry], in_ch)
        out_ch = _out_channels(exported, in_ch, [g.min for g in geometry])

        # 3. test data ---------------------------------------------------------------------------------------
        step("test data")
        image, sample_desc = load_sample(_sample_source(sample, info), dims, in_ch)
        crop = crop_test_input(image, geometry)
        extra = info.extra if info else {}
        norm = PackageNormalization.from_recorded(
            extra.get("input_normalization"), mode=cfg.input_norm,
            statistics=extra.get(INPUT_STATISTICS_KEY), sample=crop if cfg.input_norm == "fixed" else None,
        )
        if cfg.input_norm == "fixed" and INPUT_STATISTICS_KEY not in extra and norm.trained_with != "fixed":
            # statistics of the whole sample are closer to training-data statistics than those of the crop
            norm = PackageNormalization.from_recorded(
                extra.get("input_normalization"), mode="fixed", sample=_whole(image)
            )
        tensors = make_test_tensors(exported, crop, norm)
        in_names = _channel_names(cfg.input_channel_names, in_ch, ["raw"], "input")
        out_names = _channel_names(cfg.output_channel_names, out_ch, ["foreground", "boundaries"], "output")

        with tempfile.TemporaryDirectory(prefix="tilenorm_bmz_export_") as tmp:
            stage = Path(tmp)
            paths = tensors.write(stage)

            # 4. weights ---------------------------------------------------------------------------------------
            step("weights")
            art = write_architecture(model, stage, dims)
            probe_sizes = [[g.valid_size(n) for g in geometry] for n in (0, 1, 2)]
            weights: dict[str, Path] = {}
            deviations: dict[str, float] = {}
            if "pytorch_state_dict" in cfg.weight_formats:
                weights["pytorch_state_dict"] = write_state_dict(exported, stage / "weights.pt", art)
            if "torchscript" in cfg.weight_formats:
                weights["torchscript"], deviations["torchscript"] = write_torchscript(
                    exported, stage / "weights_torchscript.pt", in_ch, probe_sizes)
            if "onnx" in cfg.weight_formats:
                path, dev = write_onnx(exported, stage / "weights.onnx", in_ch, probe_sizes)
                weights["onnx"] = path
                if dev is not None:
                    deviations["onnx"] = dev

            # 5. documentation, cover, description, zip ----------------------------------------------------------
            step("package")
            name = cfg.name or _default_name(dims, trained_norm)
            description = cfg.description or (
                f"{dims}D U-Net predicting {', '.join(out_names)} from {', '.join(in_names)}. "
                + ("Trained with Batch Renormalization and exported with BatchNorm in eval form: its output "
                   "depends only on the receptive field, so tiles cropped by the halo stitch without seams."
                   if trained_norm == "batchrenorm" else "")
            ).strip()
            tool_config = _tool_config(info, spec, art, trained_norm, n_converted, limits, geometry, rf_record, norm,
                                       sample_desc, cfg, gate_results)
            readme = _documentation(cfg, stage, DocumentationContext(
                name=name, description=description, dims=dims, architecture=(spec.describe() if spec else
                                                                            type(model).__name__),
                norm_kind="batchnorm" if n_converted else str(trained_norm), trained_norm_kind=trained_norm,
                normalization=norm, geometry=geometry, input_channels=in_names, output_channels=out_names,
                weight_formats=list(weights), tool_version=__version__, receptive_field=_rf_summary(rf_record),
                training_data=cfg.training_data, training=tool_config.get("training"), gate=gate_results,
                legacy=cfg.legacy, halo_overridden=cfg.halo is not None, tested=test,
            ))
            covers = [Path(c) for c in cfg.covers] or [write_cover(stage / "cover.png", tensors, out_names)]
            tolerance = _tolerance(deviations, float(abs(tensors.output).max()))
            from .descr import PackageFiles, build_model_descr

            files = PackageFiles(
                test_input=paths["test_input"], test_output=paths["test_output"],
                sample_input=paths["sample_input"], sample_output=paths["sample_output"],
                documentation=readme, covers=covers, weights=weights, architecture=art,
            )
            descr = build_model_descr(
                cfg=cfg, name=name, description=description, dims=dims, geometry=geometry, norm=norm,
                input_channels=in_names, output_channels=out_names, files=files,
                tags=_tags(cfg, dims, trained_norm, weights), tool_config=tool_config,
                reproducibility_tolerance=tolerance,
            )
            candidate = _write_zip(descr, out, cfg.legacy)

        result = ExportResult(
            package=None, status="written", name=name,
            format_version=LEGACY_FORMAT_VERSION if cfg.legacy else str(descr.format_version),
            legacy=cfg.legacy, dims=dims, axes=axes,
            halo={g.axis: g.halo for g in geometry},
            measured_halo=None if measured is None else dict(zip(axes, measured, strict=True)),
            min_size={g.axis: g.min for g in geometry}, step={g.axis: g.step for g in geometry},
            weight_formats=list(weights), input_normalization=norm,
            test_input_shape=list(tensors.raw_input.shape), tool_config=tool_config,
        )
        try:
            # 6. bioimage.io test, gate ----------------------------------------------------------------------------
            step("test")
            if test:
                result.test = run_model_test(candidate)
                if not result.test.passed:
                    _reject(candidate, out, result, result.test.short(), result.test.markdown)
            step("gate")
            if gate is not None:
                outcome = gate(candidate)
                result.gate = outcome
                if not outcome.accepted:
                    _reject(candidate, out, result, "the acceptance gate rejected the package", _gate_text(outcome))
            result.compatibility = check_compatibility(candidate)
            publish(candidate, out)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
    result.package = out
    logger.info("wrote %s (%s)", out, ", ".join(result.weight_formats))
    return result


# -- helpers ------------------------------------------------------------------------------------------------
def _whole(image: Any) -> Any:
    import numpy as np

    return np.asarray(image[tuple(slice(None) for _ in image.shape)], dtype=np.float32)


def _rf_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("method", "theoretical", "erf95", "erf99", "recommended_halo", "normalization_couples_tile")
    return {k: record[k] for k in keep if k in record}


def _tool_config(
    info: CheckpointInfo | None, spec: ArchitectureSpec | None, art: ArchitectureArtifact, trained_norm: str | None,
    n_converted: int, limits: Mapping[str, tuple[float, float]], geometry: Sequence[AxisGeometry],
    rf_record: Mapping[str, Any],
    norm: PackageNormalization, sample_desc: str, cfg: ExportConfig, gate_results: Mapping[str, Any] | None,
) -> dict[str, Any]:
    arch = art.spec.model_dump(mode="json", exclude={"source_code"}) if art.spec else None
    training: dict[str, Any] = {}
    if info is not None:
        training["step"] = info.step
        if info.schedule is not None:
            training["renorm_schedule"] = info.schedule.model_dump(mode="json")
    if limits:  # per layer, as the layers held them at export (read back by read_package_model)
        training["renorm_limits"] = {name: [r, d] for name, (r, d) in limits.items()}
    cfg_out: dict[str, Any] = {
        "tool": "tilenorm-bmz",
        "tool_version": __version__,
        "torch_version": torch.__version__,
        "architecture": arch,
        "norm_kind": {"trained": trained_norm, "exported": "batchnorm" if n_converted else trained_norm},
        "batchrenorm_layers_exported_as_batchnorm": n_converted,
        "training": training,
        "receptive_field": dict(rf_record),
        "halo": {g.axis: g.halo for g in geometry},
        "measured_halo": {g.axis: g.measured_halo for g in geometry},
        "halo_overridden": cfg.halo is not None,
        "input_normalization": norm.as_input_normalization(),
        "input_norm": cfg.input_norm,
        "sample": sample_desc,
        "training_data": cfg.training_data,
        "gate": dict(gate_results) if gate_results else {"status": "not run"},
        "legacy_format": cfg.legacy,
    }
    return jsonable(cfg_out)


def _documentation(cfg: ExportConfig, stage: Path, ctx: DocumentationContext) -> Path:
    if cfg.documentation is not None:
        path = Path(cfg.documentation)
        if not path.is_file():
            raise FileNotFoundError(f"documentation file {path} does not exist")
        if "# Validation" not in path.read_text(encoding="utf-8"):
            logger.warning("%s has no '# Validation' section (bioimage.io asks for one)", path)
        return path
    path = stage / "README.md"
    path.write_text(render_readme(ctx), encoding="utf-8")
    return path


def _tolerance(deviations: Mapping[str, float], max_output: float) -> dict[str, float] | None:
    """A reproducibility tolerance only when a weight format deviates near bioimage.io's default (1e-3)."""
    worst = max(deviations.values(), default=0.0)
    if worst <= 2e-4:
        return None
    absolute = min(max(4 * worst, 1e-3), 0.01 * max_output)
    logger.info("weight formats deviate by up to %.3g: writing a reproducibility tolerance %.3g", worst, absolute)
    return {"absolute_tolerance": absolute, "relative_tolerance": 1e-3, "mismatched_elements_per_million": 100}


def _tags(cfg: ExportConfig, dims: int, trained_norm: str | None, weights: Mapping[str, Path]) -> list[str]:
    tags = [f"{dims}d", "pytorch", "unet", "semantic-segmentation", "tilenorm-bmz"]
    if trained_norm == "batchrenorm":
        tags.append("batch-renormalization")
    if "torchscript" in weights:
        tags += ["ilastik", "deepimagej"]
    return tags + list(cfg.tags)


def _write_zip(descr: Any, out: Path, legacy: bool) -> Path:
    from bioimageio.spec import save_bioimageio_package

    remove_stale(out)
    tmp_path = temp_sibling(out, ".zip")
    try:
        save_bioimageio_package(descr, output_path=tmp_path)
        if legacy:
            write_legacy_package(tmp_path, tmp_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path


def _gate_text(outcome: Any) -> str:
    if isinstance(outcome, BaseModel):
        return "```json\n" + outcome.model_dump_json(indent=2) + "\n```\n"
    return str(outcome)


def _reject(candidate: Path, out: Path, result: ExportResult, reason: str, text: str) -> None:
    target = rejected_path(out)
    publish(candidate, target)
    summary = target.with_name(target.name[: -len(target.suffix)] + ".summary.md")
    from ..config import atomic_write_text

    atomic_write_text(summary, f"# {out.name} rejected\n\n{reason}\n\n{text}")
    result.status, result.rejected = "rejected", target
    logger.error("%s rejected: %s (kept as %s, summary %s)", out.name, reason, target, summary)
    raise PackageRejected(f"{out.name} rejected: {reason}. The package is kept as {target}; full summary in {summary}",
                          result)

