"""``tilenorm-bmz`` command line: a thin typer layer over the library.

Every command maps its structured result to an exit code: 0 ok / accepted, 1 rejected (gate), 2 bad input
or could not run. Library code never prints; this module owns the console, logging and progress bars.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from ._version import __version__
from .config import (
    EXAMPLE_KINDS,
    GATE_CHECKS,
    INPUT_NORM_KINDS,
    NORMALIZATION_CHOICES,
    REPORT_FORMATS,
    STUDY_RUN_SETS,
    GateConfig,
)
from .errors import TilenormError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="tilenorm-bmz",
    help=(
        "Seamless tiled segmentation: convert or train BatchRenorm U-Nets, derive the halo from the "
        "receptive field, package them for bioimage.io and gate them on tile mismatch and train/eval "
        "disparity."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

def _choices(name: str, values: Sequence[str]) -> Any:
    """A typer choice (a str Enum) of a vocabulary the configs define, so the CLI has no list of its own."""
    return enum.Enum(name, {v: v for v in values}, type=str)


NormalizationOption = _choices("NormalizationOption", NORMALIZATION_CHOICES)
InputNormOption = _choices("InputNormOption", INPUT_NORM_KINDS)
ExampleOption = _choices("ExampleOption", EXAMPLE_KINDS)
ReportFormatOption = _choices("ReportFormatOption", REPORT_FORMATS)
GateCheckOption = _choices("GateCheckOption", GATE_CHECKS)
DEFAULT_NORMALIZATION = NormalizationOption("model")
DEFAULT_REPORT_FORMAT = ReportFormatOption("json")
RunsOption = _choices("RunsOption", STUDY_RUN_SETS)
DEFAULT_RUNS = RunsOption("all")


def _default(model: Any, field: str) -> str:
    """A config field's default, for help texts (never copied by hand)."""
    value = model.model_fields[field].default
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
        else str(value)


EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3

TrustOption = Annotated[bool, typer.Option(
    "--trust-code", help="Run code that the model file carries or names (a stored architecture source or callable, "
    "a package's architecture file). Off by default: only for files from someone you trust.")]


class UserError(TilenormError):
    """An error caused by the user's input: printed without a traceback, exit code 2."""


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger("tilenorm_bmz")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def print_error(message: str) -> None:
    """Print ``error: message`` to stderr without markup interpretation or line wrapping."""
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)


def _one_line(e: BaseException) -> str:
    """An exception as one line (OSError: its strerror and file name)."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | FileExistsError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def _user_errors() -> tuple[type[BaseException], ...]:
    """What counts as the user's input being wrong (exit 2, one line) rather than a bug (traceback)."""
    import yaml
    from pydantic import ValidationError

    errors: list[type[BaseException]] = [TilenormError, ValueError, OSError, ImportError, yaml.YAMLError,
                                         ValidationError]
    try:
        from ruyaml.error import YAMLError as RuYAMLError

        errors.append(RuYAMLError)
    except ImportError:  # pragma: no cover - ruyaml comes with bioimageio.spec
        pass
    return tuple(errors)


def handle_errors(fn: F) -> F:
    """Map errors to exit codes: user errors (bad files, configs, trust, integrity) -> one line and 2; a bug -> its
    traceback and 3 (never 1, which means "rejected" for ``validate``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except ValidationError as e:
            lines = [f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()]
            print_error(f"invalid configuration: {'; '.join(lines)}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except _user_errors() as e:
            print_error(_one_line(e))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception:
            err_console.print_exception()
            print_error("internal error in tilenorm-bmz (a bug: please report it with the traceback above)")
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"tilenorm-bmz {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-v, -vv).")] = 0,
) -> None:
    _setup_logging(verbose)


def parse_shape(text: str | None, name: str = "shape") -> tuple[int, ...] | None:
    """Parse ``"64,64,64"`` or ``"64x64"`` (or a single int) into a tuple."""
    if text is None or text == "":
        return None
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise UserError(f"{name} must be integers separated by ',' or 'x', e.g. 64,64,64; got {text!r}") from None
    if not shape or min(shape) < 1:
        raise UserError(f"{name} must be positive integers, got {text!r}")
    return shape


def check_output_path(path: Path, overwrite: bool, *, folder: bool = False, option: str = "--output") -> None:
    """Refuse an output that cannot be written before any work starts (exists, read-only, below a file)."""
    from .atomic import check_writable

    check_writable(path, overwrite=overwrite, folder=folder, option=option)


# ------------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------------
@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz convert run/best.pt -o brn.pt --show\n\n"
        "  tilenorm-bmz convert weights.pt --arch monai.networks.nets:BasicUNet "
        "--arch-kwargs '{\"spatial_dims\": 3, \"in_channels\": 1, \"out_channels\": 2}' -o brn.pt\n\n"
        "  tilenorm-bmz convert model.bioimageio.zip --calibrate image.tif -o brn.pt"
    )
)
@handle_errors
def convert(
    source: Annotated[Path, typer.Argument(help="Our checkpoint, a plain state dict (with --arch), a torch-em "
                                                 "checkpoint, or a bioimage.io package (zip, folder, rdf.yaml).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint (.pt).")],
    arch: Annotated[str | None, typer.Option(help="Architecture for a plain state dict: 'package.module:Callable'.")] = None,
    arch_kwargs: Annotated[str, typer.Option(help="JSON keyword arguments for --arch.")] = "{}",
    arch_file: Annotated[Path | None, typer.Option(help="Architecture source file (.py) defining --arch-callable.")] = None,
    arch_callable: Annotated[str | None, typer.Option(help="Callable in --arch-file.")] = None,
    calibrate: Annotated[list[Path] | None, typer.Option(help="Images to recompute the running statistics on "
                                                               "(repeat the option for several).")] = None,
    calibrate_tiles: Annotated[int, typer.Option(help="Number of random tiles for calibration.")] = 32,
    tile: Annotated[str | None, typer.Option(help="Calibration tile shape, e.g. 64,64,64 (default: 64^3 / 256^2).")] = None,
    finetune: Annotated[Path | None, typer.Option(help="Fine-tune the converted model with this training config (YAML).")] = None,
    divisor: Annotated[str | None, typer.Option(help="Size divisor per spatial axis of a network that does not "
                                                "expose one, e.g. 4,4 (default: the product of its strides, "
                                                "checked by a forward pass).")] = None,
    show: Annotated[bool, typer.Option("--show", help="Print every converted layer.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    trust_code: TrustOption = False,
) -> None:
    """Convert a network's BatchNorm/InstanceNorm/GroupNorm layers to BatchRenorm.

    Affine parameters and running statistics are carried over; layers without running statistics
    (InstanceNorm, GroupNorm) start from mean 0 / variance 1 and should be calibrated on images
    (``--calibrate``) and/or fine-tuned (``--finetune``).
    """
    from .conversion import convert_source

    check_output_path(output, overwrite)
    result = convert_source(
        source,
        arch=arch,
        arch_kwargs=json.loads(arch_kwargs) if arch_kwargs else {},
        arch_file=arch_file,
        arch_callable=arch_callable,
        calibrate=list(calibrate or []),
        calibrate_tiles=calibrate_tiles,
        tile_shape=parse_shape(tile, "--tile"),
        divisor=parse_shape(divisor, "--divisor"),
        trust_code=trust_code,
    )
    report = result.report
    if show or report.skipped:
        table = Table(title=f"converted from {result.source_kind}")
        for col in ("layer", "from", "to", "channels", "statistics"):
            table.add_column(col)
        for c in report.converted:
            table.add_row(c.name, c.source_type, c.target_type, str(c.num_features), c.statistics)
        for s in report.skipped:
            table.add_row(s.name, s.type, "[yellow]unchanged[/yellow]", "", s.reason)
        console.print(table)
    if finetune is not None:
        from .train import finetune_model

        result = finetune_model(result, finetune, out_dir=output.with_name(f"{output.stem}_finetune"),
                                progress=True)
        console.print(f"fine-tuned to step {result.step}; run folder {result.extra.get('finetune_run')}")
    path = result.save(output)
    console.print(f"{report.summary()}")
    if result.calibrated_batches:
        console.print(f"calibrated running statistics on {result.calibrated_batches} tile(s)")
    elif report.needs_calibration:
        console.print(
            "[yellow]some layers had no running statistics: calibrate (--calibrate IMG) or fine-tune "
            "(--finetune CONFIG) before use[/yellow]"
        )
    console.print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------------
# halo / predict (tiling)
# ------------------------------------------------------------------------------------------------------
def _open_model(path: Path, trust_code: bool) -> Any:
    """Open a checkpoint of ours or a bioimage.io package through the one door (notes go to stderr)."""
    from .bmz.opening import open_model

    handle = open_model(path, trust_code=trust_code, allow=("checkpoint", "bioimageio"))
    for note in handle.notes:
        err_console.print(Text(f"note: {note}", style="yellow"))
    for code in handle.trusted:
        err_console.print(Text(f"--trust-code: ran {code} from {path.name}", style="yellow"))
    return handle


def _normalization_for(choice: str, handle: Any) -> Any:
    """The input normalization for ``--normalization`` (the policy is the handle's; notes go to stderr)."""
    settings, note = handle.normalization_for(choice)
    if note:
        err_console.print(Text(f"note: {note}", style="yellow"))
    return settings


@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz halo run/best.pt\n\n"
        "  tilenorm-bmz halo model.bioimageio.zip --json > rf.json\n\n"
        "  tilenorm-bmz halo brn.pt --data image.tif --samples 16"
    )
)
@handle_errors
def halo(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint of ours or a bioimage.io package.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    samples: Annotated[int, typer.Option(help="Random (or data) tiles averaged for the effective receptive field.")] = 8,
    data: Annotated[Path | None, typer.Option(help="Image to measure the effective receptive field on (normalized "
                                                   "as the model was trained); default: random noise.")] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="Measurement input shape, e.g. 96,96 "
                                                    "(default: larger than the receptive field).")] = None,
    train_mode: Annotated[bool, typer.Option("--train-mode", help="Measure with BatchNorm/BatchRenorm in train mode "
                                                                  "(shows tile coupling in training).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    trust_code: TrustOption = False,
) -> None:
    """Receptive field of a network and the halo that makes tiled prediction seamless.

    Prints, per axis, the theoretical receptive field (analytic from the layers and measured from
    gradients), the effective receptive field (radius holding 95% / 99% of the gradient), whether a
    normalization layer couples the whole tile (then no halo makes tiling exact), and the recommended
    halo (the one-sided theoretical receptive field, rounded so 2*halo is a multiple of the divisor).
    """
    from .introspect import resolve_device
    from .tiling import receptive_field

    handle = _open_model(model_path, trust_code)
    model, dims = handle.network, handle.dims
    tiles = None
    if data is not None:
        from .data import fit_normalization
        from .data.io import open_image

        img = open_image(data)
        norm = _normalization_for("model", handle)
        arr = img.read().astype("float32")
        tiles = fit_normalization(norm, arr).apply(arr) if norm is not None else arr
    report = receptive_field(
        model, dims, input_shape=parse_shape(input_shape, "--input-shape"), n_samples=samples, data=tiles,
        device=resolve_device(device), train_norm=train_mode,
    )
    if as_json:
        console.print_json(report.model_dump_json())
        return

    def fmt(left: tuple[int, ...] | None, right: tuple[int, ...] | None, a: int) -> str:
        if left is None or right is None:
            return "-"
        return f"{left[a]} / {right[a]}"

    table = Table(
        title=f"receptive field of {model_path.name} ({dims}D, divisor {report.divisor})",
        caption="TRF: theoretical receptive field, left / right extent (analytic from the layers, measured from "
        "gradients); ERF: effective receptive field radius; halo: recommended halo per side",
    )
    for col in ("axis", "TRF analytic", "TRF measured", "one-sided TRF", "ERF 95%", "ERF 99%", "halo"):
        table.add_column(col)
    for a, name in enumerate(report.axes):
        trf = "-" if report.theoretical is None else str(report.theoretical[a])
        if report.normalization_couples_tile:
            trf = f"whole tile (local path {trf})"
        table.add_row(
            name, fmt(report.analytic_left, report.analytic_right, a),
            fmt(report.numerical_left, report.numerical_right, a), trf, str(report.erf95[a]), str(report.erf99[a]),
            str(report.recommended_halo[a]),
        )
    console.print(table)
    if report.normalization_couples_tile:
        console.print(Text(f"normalization couples the tile: {report.coupling_reason}", style="yellow"))
    elif report.confirmed:
        console.print("[green]analytic and measured receptive field agree[/green]")
    for note in report.notes:
        console.print(Text(f"note: {note}"))
    console.print(
        f"measured on {'x'.join(map(str, report.input_shape))} inputs, {report.n_samples} {report.data} sample(s), "
        f"{report.mode} mode"
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz predict run/best.pt image.tif -o prediction.tif\n\n"
        "  tilenorm-bmz predict brn.pt volume.zarr -o prediction.zarr --tile 128,128,128 --batch-size 2\n\n"
        "  tilenorm-bmz predict model.bioimageio.zip big.zarr -o pred.zarr --workers 4\n\n"
        "  tilenorm-bmz predict brn.pt /shared/big.zarr -o /shared/pred.zarr --scheduler tcp://10.0.0.5:8786\n\n"
        "Defaults: the halo from the network's receptive field; the largest tile whose forward pass fits a "
        "quarter of the free RAM (CPU) or 80% of the free GPU memory; the input normalization the model was "
        "trained with, fitted once on the whole image (from a sample of blocks for large images)."
    )
)
@handle_errors
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint of ours or a bioimage.io package.")],
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Image: TIFF, Zarr / OME-Zarr, or .npy.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output: .zarr (out of core, chunked), .tif or .npy.")],
    tile: Annotated[str | None, typer.Option(help="Tile shape, e.g. 128,128,128 (default: the largest that fits).")] = None,
    halo_size: Annotated[str | None, typer.Option("--halo", help="Halo per side: one int or one per axis "
                                                  "(default: from the receptive field).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    normalization: Annotated[NormalizationOption, typer.Option(  # type: ignore[valid-type]
        help="model: as trained; global or tilewise quantiles; none: raw values.")] = DEFAULT_NORMALIZATION,
    axes: Annotated[str | None, typer.Option(help="Axes of the input when the file does not say, e.g. cyx, czyx.")] = None,
    memory_gb: Annotated[float | None, typer.Option("--memory-gb", help="Memory budget (GiB) of the tiled "
                                                    "prediction (forward pass + tile buffers) when choosing the "
                                                    "tile; default: 80% of free GPU memory or 1/4 of free "
                                                    "RAM.")] = None,
    workers: Annotated[int | None, typer.Option(help="Run the blocks on a local dask cluster of N worker "
                                                     "processes (Zarr output).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a dask.distributed scheduler to run the blocks "
                                                       "on (input and output on shared storage).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    fill_nonfinite: Annotated[float | None, typer.Option(
        "--fill-nonfinite", help="Replace NaN/Inf input voxels by this value (default: refuse such images).")] = None,
    trust_code: TrustOption = False,
) -> None:
    """Predict an image of any size, tile by tile, seamlessly (the halo is cropped, not blended).

    A Zarr output is written block by block (each block owns whole chunks), so the image may be far larger
    than memory; with --workers or --scheduler the same blocks run as dask tasks with an identical result.
    Nothing is left under the output name when the command fails.
    """
    from .tiling import predict_file

    check_output_path(output, overwrite)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    handle = _open_model(model_path, trust_code)
    model = handle.network
    halo_t = parse_shape(halo_size, "--halo") if halo_size not in (None, "") else None
    if halo_t is not None and len(halo_t) == 1:
        halo_t = halo_t * handle.dims
    try:
        summary = predict_file(
            model, input_path, output, tile_shape=parse_shape(tile, "--tile"), halo=halo_t, batch_size=batch_size,
            device=device, normalization=_normalization_for(normalization.value, handle), divisor=handle.divisor,
            memory_budget=int(memory_gb * 2**30) if memory_gb else None, workers=workers, scheduler=scheduler,
            overwrite=overwrite, progress=not as_json, input_axes=axes,
            nonfinite="error" if fill_nonfinite is None else fill_nonfinite,
        )
    except MemoryError as e:
        raise UserError(str(e) or "out of memory: use a smaller --tile or --batch-size") from None
    if as_json:
        console.print_json(summary.model_dump_json())
        return
    table = Table(title=f"{summary.mode} prediction")
    table.add_column("")
    table.add_column("")
    rows = {
        "input": f"{summary.input} {summary.input_shape}",
        "tile / halo": f"{'x'.join(map(str, summary.tile_shape))} / {'x'.join(map(str, summary.halo))}",
        "blocks": f"{summary.n_blocks} ({'x'.join(map(str, summary.grid))}), overhead {summary.overhead:.2f}x",
        **({"tile chosen by": summary.plan} if summary.plan else {}),
        "device": f"{summary.device}, batch {summary.batch_size}"
        + (f", {summary.workers} workers" if summary.workers else "")
        + (f", scheduler {summary.scheduler}" if summary.scheduler else ""),
        "normalization": "none" if summary.normalization is None else str(summary.normalization["settings"]["mode"]),
        "time": f"{summary.seconds:.1f} s",
    }
    for k, v in rows.items():
        table.add_row(k, Text(v))
    console.print(table)
    console.print(f"wrote {summary.output} {summary.output_shape}")


# ------------------------------------------------------------------------------------------------------
# package
# ------------------------------------------------------------------------------------------------------
def _print_compatibility(report: Any) -> None:
    table = Table(title=f"consumer compatibility ({report.summary()})")
    for col in ("consumer", "check", "status", "detail / fix"):
        table.add_column(col)
    style = {"pass": "green", "warn": "yellow", "fail": "red"}
    for c in report.checks:
        table.add_row(c.consumer, c.name, f"[{style[c.status]}]{c.status}[/{style[c.status]}]",
                      Text(c.fix or c.detail))
    console.print(table)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz package run/best.pt -o nuclei.zip --author 'Jane Doe' --sample image.tif\n\n"
        "  tilenorm-bmz package run/best.pt -o nuclei.zip --config export.yaml --onnx\n\n"
        "  tilenorm-bmz package brn.pt -o model.zip --config export.yaml --input-norm fixed --halo 32\n\n"
        "  tilenorm-bmz package bn.pt -o model.zip --author 'Jane Doe' --gate-config gate.yaml\n\n"
        "export.yaml holds an ExportConfig: name, description, authors (name, affiliation, email, orcid), "
        "license, tags, version, citations, training_data, documentation, covers, weight_formats, input_norm, "
        "halo, legacy. gate.yaml holds a GateConfig (see `tilenorm-bmz validate --help`)."
    )
)
@handle_errors
def package(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to package (ours, or converted with `convert`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Package zip to write.")],
    config: Annotated[Path | None, typer.Option("--config", help="ExportConfig YAML (metadata and options).")] = None,
    name: Annotated[str | None, typer.Option(help="Model name (overrides the config).")] = None,
    author: Annotated[list[str] | None, typer.Option(help="Author name (repeat for several; overrides the "
                                                          "config's authors).")] = None,
    sample: Annotated[Path | None, typer.Option(help="Raw image for the test tensors and cover (default: the "
                                                     "checkpoint's validation image).")] = None,
    divisor: Annotated[str | None, typer.Option(help="Size divisor per spatial axis for a network that does not "
                                                "expose one, e.g. 4,4 (default: from the checkpoint, else the "
                                                "product of its strides, checked).")] = None,
    halo: Annotated[str | None, typer.Option(help="Halo override: one int or one per axis (z,y,x); default from "
                                                  "the receptive field.")] = None,
    input_norm: Annotated[InputNormOption | None, typer.Option(  # type: ignore[valid-type]
        "--input-norm", help="percentile (per-image scale_range, as trained) or fixed (scale_linear; "
        "tile-consistent in ilastik).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also write ONNX weights (opset 17, one file).")] = False,
    no_legacy: Annotated[bool, typer.Option("--no-legacy", help="Write format 0.5.12 as is (ilastik and "
                                                                "deepImageJ cannot read it yet).")] = False,
    gate_config: Annotated[Path | None, typer.Option("--gate-config", help="GateConfig YAML for the validation "
                                                     "gate (default thresholds otherwise).")] = None,
    skip_gate: Annotated[bool, typer.Option("--skip-gate", help="Do not run the validation gate (recorded in "
                                            "the package's config.tilenorm_bmz.gate).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    trust_code: TrustOption = False,
) -> None:
    """Write a tested, validated bioimage.io model package (zip) that ilastik, deepImageJ and bioimage.io.core run.

    The network is exported in eval form (BatchRenorm -> the equal BatchNorm), with the halo from its
    receptive field, test data from a real image, TorchScript and state-dict weights, and tested with
    bioimage.io.core (every weight format), then the validation gate runs on the sample (tile mismatch,
    train/eval disparity, seams in each consumer, halo sufficiency; report in NAME.gate/) before the zip is
    written. A package that fails either is kept as NAME.rejected.zip with a summary, and the command exits
    with 1; --skip-gate writes the package without the gate and records that in it.
    """
    from .bmz import PackageRejected, checkpoint_sample, export_package
    from .config import ExportConfig, PersonConfig

    check_output_path(output, overwrite)
    cfg = ExportConfig.from_yaml(config) if config is not None else ExportConfig()
    updates: dict[str, Any] = {}
    if name is not None:
        updates["name"] = name
    if author:
        updates["authors"] = [PersonConfig(name=a) for a in author]
    if input_norm is not None:
        updates["input_norm"] = input_norm.value
    if halo is not None:
        values = parse_shape(halo, "--halo")
        assert values is not None
        updates["halo"] = values[0] if len(values) == 1 else list(values)
    if onnx and "onnx" not in cfg.weight_formats:
        updates["weight_formats"] = [*cfg.weight_formats, "onnx"]
    if no_legacy:
        updates["legacy"] = False
    cfg = ExportConfig.model_validate({**cfg.model_dump(), **updates})
    gate, gate_results, gate_dir = None, None, output.with_name(f"{output.stem}.gate")
    # the sample (given, or the checkpoint's held-out region) feeds both the package's test tensors and the gate
    sample_data: Any = sample if sample is not None else checkpoint_sample(checkpoint)
    if skip_gate:
        gate_results = {"status": "skipped", "reason": "packaged with --skip-gate: the validation gate did not run"}
    else:
        from .bmz import gate_hook

        gate = gate_hook(_gate_config(gate_config), sample_data, out_dir=gate_dir, name=output.name,
                         progress=True)

    try:
        result = export_package(checkpoint, output, export_config=cfg, sample=sample_data, overwrite=overwrite,
                                gate=gate, gate_results=gate_results, divisor=parse_shape(divisor, "--divisor"),
                                trust_code=trust_code, progress=True)
    except PackageRejected as e:
        print_error(str(e))
        if e.result.test is not None:
            for check in e.result.test.failed_checks:
                err_console.print(Text(f"  failed: {check.name}: {'; '.join(check.errors)[:2000]}"))
        report = e.result.gate
        if report is not None and hasattr(report, "checks"):
            for c in report.checks:
                if c.status == "failed":
                    err_console.print(Text(f"  failed: {c.name}: {c.advice}"))
            err_console.print(f"  gate report: {report.report_html}")
        raise typer.Exit(EXIT_REJECTED) from None
    table = Table(title=f"{result.name} ({result.dims}D, format {result.format_version})")
    for col in ("axis", "step", "min size", "halo", "receptive-field halo"):
        table.add_column(col)
    for a in result.axes:
        measured = "-" if result.measured_halo is None else str(result.measured_halo[a])
        table.add_row(a, str(result.step[a]), str(result.min_size[a]), str(result.halo[a]), measured)
    console.print(table)
    console.print(f"input normalization: {result.input_normalization.describe()}")
    if result.test is not None:
        console.print(f"[green]{result.test.short()}[/green]")
    if result.compatibility is not None:
        _print_compatibility(result.compatibility)
    if result.gate is not None:
        console.print(f"[green]validation gate {result.gate.summary()}[/green] (report {result.gate.report_html})")
        for w in result.gate.warnings:
            console.print(Text(f"warning: {w}", style="yellow"))
    else:
        console.print(Text("validation gate skipped (--skip-gate); recorded in the package", style="yellow"))
    console.print(f"wrote {result.package} ({', '.join(result.weight_formats)})")


# ------------------------------------------------------------------------------------------------------
# refit (the ilastik-ready variant of a package for one's dataset)
# ------------------------------------------------------------------------------------------------------
@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz refit model_zoo/nuclei2d-batchrenorm/nuclei2d-batchrenorm.bioimageio.zip --data a.tif "
        "--data b.tif -o nuclei2d-mydata.zip\n\n"
        "  tilenorm-bmz refit someone_elses.zip --data volume.ome.zarr -o for_ilastik.zip --upper 0.99\n\n"
        "Use the refitted package in ilastik (which preprocesses every tile on its own); keep the original, whose "
        "percentile normalization adapts to any image, for bioimageio.core, deepImageJ and tilenorm-bmz."
    )
)
@handle_errors
def refit(
    package_path: Annotated[Path, typer.Argument(metavar="PACKAGE", help="A bioimage.io package (ours or anyone's).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new package (.zip).")],
    data: Annotated[list[Path] | None, typer.Option("--data", help="Images of your dataset (repeat for several); "
                                                    "TIFF, Zarr / OME-Zarr or .npy.")] = None,
    percentile: Annotated[bool, typer.Option("--percentile", help="Instead: per-image percentile normalization "
                                             "(adapts to any bit depth; --data then only feeds the gate).")] = False,
    lower: Annotated[float | None, typer.Option(help="Quantile mapped to 0 (default: the package's own percentile, "
                                                "else 0.01).")] = None,
    upper: Annotated[float | None, typer.Option(help="Quantile mapped to 1 (default: the package's own percentile, "
                                                "else 0.998).")] = None,
    gate_config: Annotated[Path | None, typer.Option("--gate-config", help="GateConfig YAML for the gate run on "
                                                     "your data (ilastik always gates).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    trust_code: TrustOption = False,
) -> None:
    """Write a package for your dataset whose preprocessing is fixed values fitted on it: seamless in ilastik.

    The package's percentile normalization is replaced by ``scale_linear`` + ``clip`` with the quantiles of all
    your images pooled (sampled block by block for large volumes), recorded in ``config.tilenorm_bmz.refit``;
    the test output is recomputed, the package is tested with bioimageio.core and gated on your data with
    ilastik among the gating consumers. A package that fails is kept as NAME.rejected.zip (exit 1).
    """
    from .bmz.refit import percentile_package, refit_package

    check_output_path(output, overwrite)
    if percentile:
        result = percentile_package(package_path, output, lower=lower, upper=upper, data=list(data or []) or None,
                                    trust_code=trust_code, gate_config=_gate_config(gate_config),
                                    overwrite=overwrite, progress=True)
        console.print("per-image percentile normalization")
    else:
        if not data:
            raise UserError("give your dataset's images with --data IMG (repeat for several), or --percentile")
        result = refit_package(package_path, list(data), output, lower=lower, upper=upper, trust_code=trust_code,
                               gate_config=_gate_config(gate_config) if gate_config else None, overwrite=overwrite,
                               progress=True)
        values = ", ".join(f"{a:.6g}..{b:.6g}" for a, b in zip(result.low, result.high, strict=True))
        lo_q, hi_q = result.quantiles or (float("nan"), float("nan"))
        console.print(f"fixed normalization {values} (quantiles {lo_q:g}/{hi_q:g} of {result.sampled_voxels} "
                      "voxels per channel)", soft_wrap=True)
    console.print(f"{result.test.short()}")
    if result.gate is not None:
        console.print(f"validation gate {result.gate.summary()} (report {result.gate.report_html})", soft_wrap=True)
    if result.package is None:
        print_error(f"not written: kept as {result.rejected}")
        raise typer.Exit(EXIT_REJECTED)
    console.print(f"wrote {result.package}")


# ------------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------------
@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz train --example 2d > nuclei2d.yaml      # a complete, commented config\n\n"
        "  tilenorm-bmz train nuclei2d.yaml --out runs/nuclei2d\n\n"
        "  tilenorm-bmz train nuclei2d.yaml --out runs/nuclei2d --resume runs/nuclei2d/last.pt --steps 4000"
    )
)
@handle_errors
def train(
    config: Annotated[Path | None, typer.Argument(help="Training config (YAML); see --example.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (checkpoints, metrics.csv, curves.png).")] = None,
    steps: Annotated[int | None, typer.Option(help="Train to this global step (overrides the config).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (overrides the config).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue exactly from this checkpoint (last.pt).")] = None,
    example: Annotated[ExampleOption | None, typer.Option(  # type: ignore[valid-type]
        help="Print this commented example config and exit.")] = None,
    trust_code: TrustOption = False,
) -> None:
    """Train a U-Net (any norm kind; BatchRenorm with the paper's schedule) from images and instance labels.

    The config names the network, the data (embedded samples or your TIFF/Zarr/npy images with instance
    labels), the split, the BatchRenorm schedule and the optimizer. Validation (tiled Dice in eval mode and
    train/eval disparity) runs every ``validate_every`` steps; ``last.pt`` and ``best.pt`` are written
    atomically; Ctrl-C saves ``last.pt`` before exiting.
    """
    from .config import TrainConfig

    if example is not None:
        from .train import example_yaml

        typer.echo(example_yaml(example.value), nl=False)
        return
    if config is None and resume is None:
        raise UserError("give a config file (see `tilenorm-bmz train --example 2d`) or --resume CHECKPOINT")
    if out is None:
        raise UserError("give the run folder with --out DIR")
    check_output_path(out, True, folder=True, option="--out")
    if config is not None:
        cfg = TrainConfig.from_yaml(config)
        base_dir = config.resolve().parent
    else:
        cfg, base_dir = None, None
    if steps is not None and cfg is not None:  # validated as the same value in the YAML file would be
        cfg = TrainConfig.model_validate({**cfg.model_dump(), "steps": steps})
    if resume is None and (out / "last.pt").exists():
        raise UserError(f"{out} already holds a run (last.pt): continue it with --resume {out / 'last.pt'} or choose "
                        "another --out")
    from .train import Trainer

    if resume is not None:
        from .bmz.opening import open_model

        handle = open_model(resume, trust_code=trust_code, allow=("checkpoint",))
        assert handle.checkpoint_info is not None
        trainer = Trainer.resume(resume, out_dir=out, config=cfg, device=device, progress=True,
                                 opened=(handle.network, handle.checkpoint_info))
        if steps is not None:
            TrainConfig.model_validate({**trainer.config.model_dump(), "steps": steps})
            if steps <= trainer.step:
                raise UserError(f"{resume} is at step {trainer.step} already, so --steps {steps} leaves nothing to "
                                f"train: give --steps above {trainer.step} to continue the run")
    else:
        assert cfg is not None
        trainer = Trainer(cfg, out, base_dir=base_dir, device=device, progress=True)
    for msg in trainer.config.advice():
        console.print(f"[yellow]note:[/yellow] {msg}")
    result = trainer.fit(steps if steps is not None else trainer.config.steps)
    last = result.last_validation
    if last is not None:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in last.val_dice.items())
        console.print(f"step {result.step}: validation Dice {scores}")
    console.print(f"run folder: {result.out_dir} (last.pt{', best.pt' if result.best else ''}, metrics.csv, curves.png)")
    if result.interrupted:
        raise typer.Exit(130)


# ------------------------------------------------------------------------------------------------------
# study
# ------------------------------------------------------------------------------------------------------
@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz study model_zoo/study.yaml                       # everything, budget by device\n\n"
        "  tilenorm-bmz study model_zoo/study.yaml --dataset nuclei2d --variant batchrenorm\n\n"
        "  tilenorm-bmz study model_zoo/study.yaml --budget gpu           # the paper's full budget\n\n"
        "  tilenorm-bmz study model_zoo/study.yaml --report-only          # rewrite STUDY.md from saved results"
    )
)
@handle_errors
def study(
    config: Annotated[Path, typer.Argument(help="Study config (YAML): datasets, variants, budgets, measurements.")],
    budget: Annotated[str, typer.Option(help="auto (gpu when CUDA is present), cpu or gpu.")] = "auto",
    dataset: Annotated[list[str] | None, typer.Option(help="Only this dataset (repeatable).")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Only this variant (repeatable).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the train configs').")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rewrite the report from saved results.")] = False,
    runs: Annotated[RunsOption, typer.Option(  # type: ignore[valid-type]
        help="all: the main table and the repeats with other seeds; main; seeds.")] = DEFAULT_RUNS,
) -> None:
    """Train and measure the same U-Net with every normalization: the paper's Table 1 on real data.

    For each dataset and variant (BatchNorm, InstanceNorm, BatchRenorm, none with global input
    normalization; BatchNorm and InstanceNorm with tile-wise input normalization) the network is trained
    (finished runs are reused, interrupted ones resumed) and measured on the held-out region: Dice per class
    in eval and train mode, train/eval disparity, tile mismatch, Dice vs tile size. Writes the Markdown
    table and figures (STUDY.md). A dataset's seeds block repeats some variants with other seeds: their mean,
    spread and the orderings the spread supports go to the report too.
    """
    from .study import StudyConfig, pick_budget, run_study, write_study_report

    cfg = StudyConfig.from_yaml(config).resolve_paths(config.resolve().parent)
    command = f"tilenorm-bmz study {config.as_posix()} --budget {pick_budget(budget)}"  # what reproduces the report
    if report_only:
        path = write_study_report(cfg, budget=pick_budget(budget), command=command)
        console.print(f"wrote {path}")
        return
    rows = run_study(cfg, budget=budget, datasets=dataset, variants=variant, device=device,
                     base_dir=config.resolve().parent, command=command, progress=True, runs=runs.value)
    table = Table(title="study")
    for col in ("dataset", "variant", "seed", "Dice eval", "Dice train", "disparity", "tile mismatch"):
        table.add_column(col)
    for r in rows:
        fmt = " / ".join
        table.add_row(r.dataset, r.variant, "" if r.seed is None else str(r.seed), fmt(f"{v:.3f}" for v in r.dice_eval),
                      fmt(f"{v:.3f}" for v in r.dice_train or []), fmt(f"{v:.3f}" for v in r.disparity or []),
                      "no" if r.seamless else fmt(f"{v:.3f}" for v in r.mismatch))
    console.print(table)
    console.print(f"wrote {cfg.report}")


# ------------------------------------------------------------------------------------------------------
# validate (the acceptance gate)
# ------------------------------------------------------------------------------------------------------
def _gate_config(config: Path | None, **overrides: Any) -> Any:
    """A GateConfig from a YAML file (or the defaults) with the command-line overrides applied."""
    from .config import GateConfig

    cfg = GateConfig.from_yaml(config) if config is not None else GateConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    return GateConfig.model_validate({**cfg.model_dump(), **updates})


def _print_gate(report: Any) -> None:
    style = {"passed": "green", "failed": "red", "not-applicable": "dim", "info": "blue"}
    table = Table(title=f"validation gate: {report.name} ({report.kind}, {report.weights_format} weights, "
                        f"{report.device})")
    for col in ("check", "result", "measured", "threshold", "what to do"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        measured = c.measured
        if isinstance(measured, float):
            measured = f"{measured:.4g}"
        elif isinstance(measured, list):
            measured = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in measured)
        table.add_row(c.name, f"[{style[c.status]}]{c.status}[/{style[c.status]}]",
                      Text("-" if measured is None else str(measured)), Text(str(c.threshold or "-")),
                      Text(c.advice))
    console.print(table)
    for im in report.images:
        if im.received is not None:
            console.print(Text(f"input {im.name}: {im.received.describe()}"), soft_wrap=True)
    for w in report.warnings:
        console.print(Text(f"warning: {w}", style="yellow"))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  tilenorm-bmz validate model.bioimageio.zip --data image.tif --out gate/\n\n"
        "  tilenorm-bmz validate run/best.pt --data val.tif --labels val_labels.tif --max-disparity 0.02\n\n"
        "  tilenorm-bmz validate submission/rdf.yaml --data vol.zarr --config gate.yaml --report-format "
        "collection\n\n"
        "  tilenorm-bmz validate model.zip --data image.tif --record model.validated.zip\n\n"
        "gate.yaml holds a GateConfig (thresholds max_dist, max_disparity, max_seam, min_dice, "
        "max_sweep_range; checks; gating_consumers; tile-mismatch crop_shape/stride/tile/offset/max_crops; "
        "disparity_tiles; sweep_sizes; region_voxels; device; batch_size). Exit code: 0 accepted, 1 "
        "rejected, 2 could not run (the reason is printed)."
    )
)
@handle_errors
def validate(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A bioimage.io package (zip, folder, rdf.yaml; "
                                               "format 0.4/0.5, PyTorch weights) or a tilenorm-bmz checkpoint.")],
    data: Annotated[list[Path] | None, typer.Option("--data", help="Raw image(s) to validate on (repeat for "
                                                    "several); default: the package's test input.")] = None,
    labels: Annotated[list[Path] | None, typer.Option("--labels", help="Labels per image: instance labels or "
                                                      "one semantic mask per output channel.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="GateConfig YAML (thresholds and settings).")] = None,
    max_dist: Annotated[float | None, typer.Option("--max-dist", help="Tile mismatch threshold (default "
                                                   f"{_default(GateConfig, 'max_dist')}).")] = None,
    max_disparity: Annotated[float | None, typer.Option("--max-disparity", help="Train/eval disparity threshold "
                                                        f"per channel (default {_default(GateConfig, 'max_disparity')})."
                                                        )] = None,
    max_seam: Annotated[float | None, typer.Option("--max-seam", help="Tiled vs whole threshold per consumer "
                                                   f"(default {_default(GateConfig, 'max_seam')}).")] = None,
    min_dice: Annotated[float | None, typer.Option("--min-dice", help="Smallest Dice against the labels "
                                                   "(default: informational).")] = None,
    output_kind: Annotated[str | None, typer.Option(
        "--output-kind", help="auto, probability or regression: regression outputs (denoising, restoration) are "
        "compared relative to their range, not binarized (default: auto).")] = None,
    skip: Annotated[list[GateCheckOption] | None, typer.Option(  # type: ignore[valid-type]
        "--skip", help="Check to skip (repeat for several).")] = None,
    gating_consumers: Annotated[str | None, typer.Option("--gating-consumers", help="Consumers whose seams decide, "
                                                         "comma separated (default "
                                                         f"{_default(GateConfig, 'gating_consumers')}; add ilastik "
                                                         "for the strictest rule).")] = None,
    halo_size: Annotated[str | None, typer.Option("--halo", help="Halo for checkpoints: one int or one per axis "
                                                  "(default: from the receptive field).")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:1, ...")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Tiles per forward pass.")] = None,
    axes: Annotated[str | None, typer.Option(help="Axes of the data files when they do not say, e.g. cyx.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json and report.html.")] = Path(
        "validation"),
    report_format: Annotated[ReportFormatOption, typer.Option(  # type: ignore[valid-type]
        "--report-format", help="json (report.json + report.html) or collection (also the bioimage.io "
        "collection's tool report).")] = DEFAULT_REPORT_FORMAT,
    record: Annotated[Path | None, typer.Option("--record", help="Write a copy of the package with the accepted "
                                                "figures in config.tilenorm_bmz (re-tested).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --record output.")] = False,
    trust_code: TrustOption = False,
) -> None:
    """Accept or reject a model for sharing: does it tile without seams, as every consumer runs it?

    Runs the bioimage.io test (offline), tile mismatch (two overlapping tiles, paper Fig. 3), train/eval
    disparity, tiled vs whole image as tilenorm-bmz, bioimageio.core, ilastik and deepImageJ predict it, halo sufficiency
    against the measured receptive field, and a tile-size sweep (Dice when labels are given). Every failed
    check says what was measured, the threshold, and what to do. The model is never modified.
    """
    from .bmz import GateInputError, collection_report, validate_package, write_collection_report

    gating = None  # checked by GateConfig, like the same list in a YAML file
    if gating_consumers is not None:
        gating = [c.strip() for c in gating_consumers.split(",") if c.strip()]
    halo_t = parse_shape(halo_size, "--halo") if halo_size else None
    cfg = _gate_config(
        config, max_dist=max_dist, max_disparity=max_disparity, max_seam=max_seam, min_dice=min_dice,
        gating_consumers=gating, device=device, batch_size=batch_size, output_kind=output_kind,
        halo=None if halo_t is None else (halo_t[0] if len(halo_t) == 1 else list(halo_t)),
    )
    if skip:
        skipped = {c.value for c in skip}
        cfg = cfg.model_copy(update={"checks": [c for c in cfg.checks if c not in skipped]})
    check_output_path(out, True, folder=True, option="--out")
    if record is not None:
        check_output_path(record, overwrite, option="--record")
        if record.resolve() == model_path.resolve():
            raise UserError("--record writes a new package: choose an output other than MODEL")
    try:
        try:
            report = validate_package(model_path, list(data or []) or None, list(labels or []) or None,
                                      config=cfg, out_dir=out, data_axes=axes, trust_code=trust_code, progress=True)
        except (RuntimeError, OSError) as e:  # e.g. the network fails on the data: could not run, not rejected
            raise UserError(f"the gate could not run on {model_path}: {type(e).__name__}: {e}") from e
    except (GateInputError, UserError, ValueError, FileNotFoundError, ImportError) as e:
        if report_format.value == "collection":
            path = write_collection_report(out, collection_report(error=e))
            err_console.print(f"wrote {path}")
        raise
    _print_gate(report)
    console.print(f"report: {report.report_html} ({report.report_json.name if report.report_json else ''})")
    if report_format.value == "collection":
        console.print(f"collection report: {write_collection_report(out, collection_report(report))}")
    if record is not None:
        if not report.accepted:
            console.print(Text(f"not recorded in {record}: the model was rejected", style="yellow"))
        elif report.kind != "package":
            console.print(Text("not recorded: --record applies to bioimage.io packages, not checkpoints",
                               style="yellow"))
        else:
            from .bmz import record_gate_results

            recorded = record_gate_results(model_path, report, record, overwrite=overwrite, trust_code=trust_code)
            console.print(f"recorded the gate figures in {recorded.package} ({recorded.test.short()})")
    if report.accepted:
        console.print(Text(f"ACCEPTED: {report.summary()}", style="bold green"))
    else:
        console.print(Text(f"REJECTED: {report.summary()}", style="bold red"))
    raise typer.Exit(report.exit_code)


# ------------------------------------------------------------------------------------------------------
# zoo
# ------------------------------------------------------------------------------------------------------
zoo_app = typer.Typer(
    help="The published models in model_zoo/: rebuild, list, re-validate.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command(
    "build",
    epilog="Examples:\n\n  tilenorm-bmz zoo build model_zoo/nuclei2d-batchrenorm\n\n"
    "  tilenorm-bmz zoo build model_zoo/nuclei3d-batchrenorm --retrain",
)
@handle_errors
def zoo_build(
    folder: Annotated[Path, typer.Argument(help="A model_zoo entry (folder with zoo.yaml).")],
    retrain: Annotated[bool, typer.Option(help="Train again even if zoo.yaml names a finished run.")] = False,
) -> None:
    """Train (or reuse the entry's finished run), package with the gate, validate, and write the README."""
    from .zoo import build_entry

    built = build_entry(folder, retrain=retrain, progress=True)
    status = "[green]accepted[/green]" if built.accepted else "[red]rejected[/red]"
    console.print(f"{built.package}: {status}; report {built.report_html}; {built.readme}")
    if not built.accepted:
        raise typer.Exit(EXIT_REJECTED)


@zoo_app.command("list", epilog="Example:\n\n  tilenorm-bmz zoo list model_zoo")
@handle_errors
def zoo_list(
    root: Annotated[Path, typer.Argument(help="The zoo folder.")] = Path("model_zoo"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the zoo's models with the figures of their last gate report."""
    from .zoo import list_zoo

    rows = list_zoo(root)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    # fits 80 columns (disparity: the worst channel; per channel, the halo and the rest: --json)
    table = Table(title=f"{root}", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("name", "model", "gate", "max_dist", "disparity", "Dice"):
        table.add_column(col, no_wrap=col in ("name", "model", "gate"), overflow="fold")

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, list):
            return "/".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        return f"{v:.2g}" if isinstance(v, float) else str(v)

    for r in rows:
        gate = {True: "accepted", False: "rejected"}.get(r.get("accepted"), "not built")
        table.add_row(r["name"], f"{r['dims']}D {r['norm']}", gate, fmt(r.get("max_dist")),
                      f"{max(r['disparity']):.3f}" if r.get("disparity") else "n/a", fmt(r.get("dice")))
    console.print(table)


@zoo_app.command("check", epilog="Example:\n\n  tilenorm-bmz zoo check model_zoo")
@handle_errors
def zoo_check(root: Annotated[Path, typer.Argument(help="The zoo folder.")] = Path("model_zoo")) -> None:
    """Re-validate every package of the zoo on its held-out data; exit 1 when any is rejected."""
    from .zoo import check_zoo

    results = check_zoo(root, progress=True)
    bad = [name for name, report in results if not report.accepted]
    for name, report in results:
        console.print(f"{name}: {report.summary()}")
    if bad:
        raise typer.Exit(EXIT_REJECTED)


# ------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  tilenorm-bmz demo\n\n  tilenorm-bmz demo --out /tmp/demo --steps 600")
@handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's artifacts.")] = Path("demo_output"),
    steps: Annotated[int, typer.Option(help="Training steps (more: a better model, longer).")] = 300,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """The whole path on the real nuclei image embedded in tilenorm-bmz, in a few minutes on a CPU.

    Trains a small 2D BatchRenorm U-Net, packages it for bioimage.io (tests and gate included), validates the
    package on the held-out region (HTML report), and predicts the whole image tile by tile, checking that it
    equals the whole-image prediction. Then the analyst's path: the package on a 16-bit copy of the image (as
    from another microscope), and its ilastik-ready variant refitted on that copy.
    """
    from .demo import run_demo

    if steps < 1:
        raise UserError("--steps must be >= 1")
    console.print(f"[bold]tilenorm-bmz demo[/bold]: training a 2D BatchRenorm U-Net for {steps} steps ...")
    r = run_demo(out, steps=steps, device=device, progress=True)
    dice = ", ".join(f"{k} {v:.3f}" for k, v in r.val_dice.items())
    verdict = "[green]accepted[/green]" if r.accepted else "[red]rejected[/red]"
    # One line per step, never wrapped or truncated: narrow terminals and logs keep every figure and path whole.
    lines = [
        f"train     validation Dice {dice} ({r.seconds['train']:.0f} s): {r.checkpoint}",
        f"package   bioimage.io tests passed, halo {list(r.halo)} ({r.seconds['package']:.0f} s): {r.package}",
        f"validate  {verdict} ({r.seconds['validate']:.0f} s): {r.report_html}",
        f"predict   tiled == whole image: max |diff| = {r.tiled_vs_whole:.2g}: {r.prediction}",
    ]
    if r.foreground is not None:
        eight, sixteen = r.foreground
        lines.append(f"your data the package on a 16-bit copy (values 33000-37000): foreground {sixteen:.1%} "
                     f"(8-bit image: {eight:.1%}): {r.your_image}")
        seams = "n/a" if r.ilastik_seams is None else f"{r.ilastik_seams:.2g}"
        lines.append(f"ilastik   refit on your data, gated with ilastik: seams = {seams}: "
                     f"{r.ilastik_package or 'rejected (see its .gate report)'}")
    console.print("[bold]demo artifacts[/bold]")
    for line in lines:
        console.print(line, soft_wrap=True)
    if not r.accepted:
        raise typer.Exit(EXIT_REJECTED)


def main() -> None:
    """Console-script entry point: SIGTERM ends a command like Ctrl-C would, cleaning its temporary outputs."""
    from .atomic import exit_on_sigterm

    exit_on_sigterm()
    app()


if __name__ == "__main__":
    main()
