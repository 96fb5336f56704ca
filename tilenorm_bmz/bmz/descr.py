"""Build the bioimage.io ``ModelDescr`` (format 0.5) of a package from ``bioimageio.spec`` objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bioimageio.spec.model import v0_5

from ..config import ExportConfig
from .geometry import AxisGeometry
from .normalization import PackageNormalization
from .weights import ONNX_OPSET, ArchitectureArtifact

__all__ = ["INPUT_ID", "OUTPUT_ID", "STANDARD_CITATIONS", "PackageFiles", "build_model_descr", "preprocessing"]

INPUT_ID = v0_5.TensorId("raw")
OUTPUT_ID = v0_5.TensorId("prediction")

#: Always cited: the tiling-artifacts paper and Batch Renormalization, by their arXiv DOIs (a ``url``
#: would be HEAD-requested by bioimage.io's validation: network access during an offline export).
STANDARD_CITATIONS: tuple[tuple[str, str], ...] = (
    (
        ("Buglakova et al. Tiling artifacts and trade-offs of feature normalization in the segmentation of "
        "large biological images. ICCV 2025. arXiv:2503.19545"),
        "10.48550/arXiv.2503.19545",
    ),
    (
        ("Ioffe. Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models. "
        "NeurIPS 2017. arXiv:1702.03275"),
        "10.48550/arXiv.1702.03275",
    ),
)


@dataclass
class PackageFiles:
    """Files written into the staging folder of a package."""

    test_input: Path
    test_output: Path
    sample_input: Path
    sample_output: Path
    documentation: Path
    covers: list[Path]
    weights: dict[str, Path]
    architecture: ArchitectureArtifact


def preprocessing(norm: PackageNormalization, spatial_axes: Sequence[str], n_channels: int) -> list[Any]:
    """The bioimage.io preprocessing steps for ``norm`` (per-sample axes, never the batch axis)."""
    steps: list[Any] = [v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))]
    if norm.mode == "percentile":
        steps.append(
            v0_5.ScaleRangeDescr(
                kwargs=v0_5.ScaleRangeKwargs(
                    axes=tuple(v0_5.AxisId(a) for a in spatial_axes),
                    min_percentile=norm.lower * 100,
                    max_percentile=norm.upper * 100,
                    eps=norm.eps,
                )
            )
        )
    else:
        gain, offset = norm.gain_offset()
        if n_channels == 1:
            kwargs: Any = v0_5.ScaleLinearKwargs(gain=gain[0], offset=offset[0])
        else:
            kwargs = v0_5.ScaleLinearAlongAxisKwargs(axis=v0_5.AxisId("channel"), gain=gain, offset=offset)
        steps.append(v0_5.ScaleLinearDescr(kwargs=kwargs))
    if norm.clip:
        steps.append(v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=0.0, max=1.0)))
    steps.append(v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")))
    return steps


def _weights(files: PackageFiles) -> v0_5.WeightsDescr:
    version = v0_5.Version(torch.__version__.split("+")[0])
    art = files.architecture
    entries: dict[str, Any] = {}
    parent: Any = None
    if "pytorch_state_dict" in files.weights:
        if art.kind == "library":
            arch: Any = v0_5.ArchitectureFromLibraryDescr(
                import_from=art.import_from, callable=v0_5.Identifier(art.callable), kwargs=art.kwargs
            )
        else:
            arch = v0_5.ArchitectureFromFileDescr(
                source=art.source, callable=v0_5.Identifier(art.callable), kwargs=art.kwargs
            )
        deps = v0_5.FileDescr(source=art.dependencies) if art.dependencies is not None else None
        entries["pytorch_state_dict"] = v0_5.PytorchStateDictWeightsDescr(
            source=files.weights["pytorch_state_dict"], architecture=arch, pytorch_version=version,
            dependencies=deps,
        )
        parent = "pytorch_state_dict"
    if "torchscript" in files.weights:
        entries["torchscript"] = v0_5.TorchscriptWeightsDescr(
            source=files.weights["torchscript"], pytorch_version=version, parent=parent
        )
        parent = parent or "torchscript"
    if "onnx" in files.weights:
        entries["onnx"] = v0_5.OnnxWeightsDescr(
            source=files.weights["onnx"], opset_version=ONNX_OPSET, parent=parent
        )
    return v0_5.WeightsDescr(**entries)


def build_model_descr(
    *,
    cfg: ExportConfig,
    name: str,
    description: str,
    dims: int,
    geometry: Sequence[AxisGeometry],
    norm: PackageNormalization,
    input_channels: Sequence[str],
    output_channels: Sequence[str],
    files: PackageFiles,
    tags: Sequence[str],
    tool_config: Mapping[str, Any],
    reproducibility_tolerance: Mapping[str, float] | None = None,
) -> v0_5.ModelDescr:
    """Assemble the model description (no file is read or written here beyond what the spec checks)."""
    spatial = [g.axis for g in geometry]
    in_axes: list[Any] = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in input_channels]),
    ] + [
        v0_5.SpaceInputAxis(
            id=v0_5.AxisId(g.axis), size=v0_5.ParameterizedSize(min=g.min, step=g.step), concatenable=True
        )
        for g in geometry
    ]
    out_axes: list[Any] = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in output_channels]),
    ]
    for g in geometry:
        ref = v0_5.SizeReference(tensor_id=INPUT_ID, axis_id=v0_5.AxisId(g.axis))
        if g.halo > 0:
            out_axes.append(v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId(g.axis), size=ref, halo=g.halo))
        else:
            out_axes.append(v0_5.SpaceOutputAxis(id=v0_5.AxisId(g.axis), size=ref))
    inp = v0_5.InputTensorDescr(
        id=INPUT_ID,
        description="raw image (any intensity range; normalized by the preprocessing)",
        axes=in_axes,
        test_tensor=v0_5.FileDescr(source=files.test_input),
        sample_tensor=v0_5.FileDescr(source=files.sample_input),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing(norm, spatial, len(input_channels)),
    )
    out = v0_5.OutputTensorDescr(
        id=OUTPUT_ID,
        description="per-channel prediction (" + ", ".join(output_channels) + ")",
        axes=out_axes,
        test_tensor=v0_5.FileDescr(source=files.test_output),
        sample_tensor=v0_5.FileDescr(source=files.sample_output),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
    )
    cite = [v0_5.CiteEntry(text=c.text, doi=v0_5.Doi(c.doi) if c.doi else None, url=c.url) for c in cfg.citations]
    cite += [v0_5.CiteEntry(text=t, doi=v0_5.Doi(d)) for t, d in STANDARD_CITATIONS]
    authors = [
        v0_5.Author(name=a.name, affiliation=a.affiliation, email=a.email, orcid=a.orcid) for a in cfg.authors
    ]
    maintainers = [
        v0_5.Maintainer(name=m.name, github_user=m.github_user, affiliation=m.affiliation, email=m.email,
                        orcid=m.orcid)
        for m in cfg.maintainers
    ]
    bioimageio_cfg: dict[str, Any] = {}
    if reproducibility_tolerance:
        bioimageio_cfg["reproducibility_tolerance"] = [v0_5.ReproducibilityTolerance(**reproducibility_tolerance)]
    config = v0_5.Config(
        bioimageio=v0_5.BioimageioConfig(**bioimageio_cfg),
        tilenorm_bmz=dict(tool_config),  # type: ignore[call-arg]  # Config allows tool-specific keys
    )
    return v0_5.ModelDescr(
        name=name,
        description=description,
        authors=authors,
        maintainers=maintainers,
        cite=cite,
        license=v0_5.LicenseId(cfg.license),
        documentation=v0_5.FileDescr(source=files.documentation),
        covers=[v0_5.FileDescr(source=c) for c in files.covers],
        tags=list(dict.fromkeys(tags)),
        version=v0_5.Version(cfg.version),
        inputs=[inp],
        outputs=[out],
        weights=_weights(files),
        config=config,
    )
