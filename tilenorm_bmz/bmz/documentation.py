"""The README.md of a package: what the model does, its tiling metadata, how to run it, its validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .geometry import AxisGeometry
from .normalization import PackageNormalization

__all__ = ["DocumentationContext", "render_readme"]


@dataclass
class DocumentationContext:
    """Facts the README is written from."""

    name: str
    description: str
    dims: int
    architecture: str
    norm_kind: str
    trained_norm_kind: str | None
    normalization: PackageNormalization
    geometry: Sequence[AxisGeometry]
    input_channels: Sequence[str]
    output_channels: Sequence[str]
    weight_formats: Sequence[str]
    tool_version: str
    receptive_field: Mapping[str, Any] | None = None
    training_data: str | None = None
    training: Mapping[str, Any] | None = None
    gate: Mapping[str, Any] | None = None
    legacy: bool = True
    halo_overridden: bool = False
    tested: bool = True
    """Whether the export runs the bioimage.io model test (a package that fails it is not written)."""
    extra_notes: list[str] = field(default_factory=list)


def _axes_table(ctx: DocumentationContext) -> str:
    rows = ["| axis | size step | minimum size | halo (cropped per side) | halo from receptive field |",
            "|---|---|---|---|---|"]
    for g in ctx.geometry:
        measured = "not measured" if g.measured_halo is None else str(g.measured_halo)
        rows.append(f"| {g.axis} | {g.step} | {g.min} | {g.halo} | {measured} |")
    return "\n".join(rows)


def _normalization_section(ctx: DocumentationContext) -> str:
    n = ctx.normalization
    text = [f"The package normalizes its raw input with {n.describe()}."]
    if n.mode == "percentile":
        text.append(
            "bioimage.io.core (and `tilenorm-bmz predict`) compute the percentiles on the whole image before "
            "tiling, so tiles stitch seamlessly. **ilastik preprocesses every tile on its own**: its tiles "
            "get slightly different percentiles and may show seams. For tile-consistent results in ilastik, "
            "re-export with `tilenorm-bmz package ... --input-norm fixed`."
        )
    else:
        text.append(
            "The same gain and offset are applied to every image and every tile in every consumer (ilastik "
            "included), so the network sees exactly what it saw in training only if your images have the "
            "intensity range of the training data; rescale images from other microscopes first."
        )
    if n.trained_with == "tilewise":
        text.append(
            "The network was trained with tile-wise normalization, which bioimage.io cannot express: "
            "results depend on the tile size."
        )
    return "\n\n".join(text)


def _gate_section(ctx: DocumentationContext) -> str:
    if not ctx.gate:
        return (
            "The tiling gate (tile mismatch, train/eval disparity) has not been run on this package yet: run "
            "`tilenorm-bmz validate MODEL.zip --data IMAGE` to measure it."
        )
    rows = ["| check | result |", "|---|---|"]
    for key, value in ctx.gate.items():
        rows.append(f"| {key} | {value} |")
    return "\n".join(rows)


def render_readme(ctx: DocumentationContext) -> str:
    """The package documentation as Markdown (with the ``# Validation`` section bioimage.io asks for)."""
    axes = ", ".join(g.axis for g in ctx.geometry)
    rf = ctx.receptive_field or {}
    halo = ", ".join(f"{g.axis} {g.halo}" for g in ctx.geometry)
    norm_line = (
        f"trained with {ctx.trained_norm_kind} and exported in eval form (every BatchRenorm replaced by the "
        "equal BatchNorm, identical outputs)"
        if ctx.trained_norm_kind == "batchrenorm"
        else f"normalization layers: {ctx.norm_kind}"
    )
    parts = [
        f"# {ctx.name}",
        ctx.description,
        "## Model",
        "\n".join([
            f"- Architecture: {ctx.architecture} ({ctx.dims}D), {norm_line}.",
            (f"- Input: {len(ctx.input_channels)} channel(s) ({', '.join(ctx.input_channels)}), axes batch, "
            f"channel, {axes}."),
            (f"- Output: {len(ctx.output_channels)} channel(s) ({', '.join(ctx.output_channels)}), same spatial "
            "size as the input."),
            f"- Weights: {', '.join(ctx.weight_formats)}.",
        ]),
        "## Input normalization",
        _normalization_section(ctx),
        "## Tiling",
        ("Predict large images in tiles of a valid size (`minimum + n * step` per axis) and crop the halo from "
        "every tile before stitching (no blending). The halo covers the network's receptive field, so a "
        "network with global normalization (BatchNorm / BatchRenorm in eval mode) gives the same result tiled "
        "as on the whole image."),
        _axes_table(ctx),
    ]
    if rf:
        parts.append("Receptive field (measured by tilenorm-bmz): " + ", ".join(f"{k}: {v}" for k, v in rf.items()) + ".")
    if ctx.halo_overridden:
        parts.append(f"The halo ({halo}) was set by hand at export.")
    parts.append("## Training")
    parts.append(ctx.training_data or "No description of the training data was given.")
    if ctx.training:
        parts.append("\n".join(f"- {k}: {v}" for k, v in ctx.training.items()))
    parts += [
        "## Usage",
        "### ilastik",
        ("Open the *Neural Network Classification* workflow, load this zip in the *NN Training/Prediction* "
        "applet, add your images and press *Live Predict*. ilastik reads the halo from the package and "
        "crops it from every tile."),
        "### deepImageJ (Fiji)",
        ("Install the model with *Plugins > DeepImageJ > DeepImageJ Install Model* (choose this zip), open an "
        "image and run *DeepImageJ Run* with the TorchScript (or ONNX) weights; tiling uses the halo above."),
        "### Python",
        "```python\n"
        "import tifffile\n"
        "from bioimageio.core import Sample, Tensor, load_model_description, predict\n\n"
        "model = load_model_description(\"MODEL.zip\")\n"
        "image = tifffile.imread(\"image.tif\")  # (" + ", ".join("ZYX"[3 - ctx.dims:]) + "), any size\n"
        "dims = (\"batch\", \"channel\", " + ", ".join(f'\"{a}\"' for a in "zyx"[3 - ctx.dims:]) + ")\n"
        "sample = Sample(members={\"raw\": Tensor(image[None, None], dims=dims)}, stat={}, id=\"image\")\n"
        "prediction = predict(model=model, inputs=sample, blocksize_parameter=2)  # tiled, halo cropped\n"
        "```\n\n"
        "or with tilenorm-bmz (whole-image normalization, seamless tiles, out of core for Zarr):\n\n"
        "```bash\ntilenorm-bmz predict MODEL.zip image.tif -o prediction.tif\n```",
        "# Validation",
        (
            "The package passed the bioimage.io model test (`bioimageio.core.test_model`, full determinism) "
            "for every weight format when it was written: each format reproduces the test output from the "
            "test input and runs at several input and batch sizes."
            if ctx.tested
            else "The bioimage.io model test was skipped at export: run `bioimageio test MODEL.zip`."
        ),
        _gate_section(ctx),
    ]
    if ctx.legacy:
        parts.append(
            "The rdf uses an older format version with plain file paths so that ilastik's bioimage.io stack "
            "(bioimageio.core 0.10 / bioimageio.spec 0.5.9) and deepImageJ can read it."
        )
    parts += ctx.extra_notes
    parts += [
        "## References",
        ("- Buglakova et al., Tiling artifacts and trade-offs of feature normalization in the segmentation of "
        "large biological images, ICCV 2025, arXiv:2503.19545."),
        ("- Ioffe, Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models, "
        "NeurIPS 2017, arXiv:1702.03275."),
        f"\nWritten by tilenorm-bmz {ctx.tool_version}.",
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
