"""``tilenorm-bmz`` command line: a thin typer layer over the library.

Every command maps its structured result to an exit code: 0 ok / accepted, 1 rejected (gate), 2 bad input
or could not run. Library code never prints; this module owns the console, logging and progress bars.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from ._version import __version__

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
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_BAD_INPUT = 2


class UserError(Exception):
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


def handle_errors(fn: F) -> F:
    """Turn expected errors (bad files, invalid configs, user errors) into a message and exit code 2."""

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
            print_error(f"invalid configuration:\n{e}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except (UserError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, ImportError) as e:
            print_error(str(e))
            raise typer.Exit(EXIT_BAD_INPUT) from None

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


def check_output_path(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; choose another output or pass --overwrite")


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
    show: Annotated[bool, typer.Option("--show", help="Print every converted layer.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
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
        from .train import finetune_model  # provided by the training module

        result = finetune_model(result, finetune, console=console)
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
