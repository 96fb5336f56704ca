"""A package for one's own dataset whose preprocessing is the same for every tile: the seamless path in ilastik.

ilastik (through tiktorch) applies a package's preprocessing to every tile on its own, so per-image percentile
normalization (``scale_range``) becomes per-*tile* normalization there, and tiles disagree at their seams.
:func:`refit_package` writes a new package from an existing one (ours or anyone's) whose input preprocessing is
``scale_linear`` + ``clip`` with fixed values fitted on the user's own dataset: the given percentiles of all
its images pooled (sampled block by block for images too large to read, e.g. Zarr volumes). Every consumer then
normalizes every tile identically. The fitted values and the data they came from are recorded in
``config.tilenorm_bmz.refit``; the test output is recomputed with the new preprocessing exactly as
bioimage.io's own test computes it, the package is tested with bioimageio.core and gated (ilastik among the
gating consumers) on the user's data before it gets its name.

When to use which: percentile normalization (what the zoo packages ship) adapts to any image's bit depth and
range, and is seamless in bioimageio.core and tilenorm-bmz, which normalize the whole image first; the refitted
package is for ilastik (and anyone tiling with per-tile preprocessing) on data like the dataset it was fitted on.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..atomic import publish, remove_stale, temp_sibling
from ..errors import TrustError

__all__ = ["RefitResult", "percentile_package", "refit_package"]

logger = logging.getLogger(__name__)


@dataclass
class RefitResult:
    """What :func:`refit_package` wrote."""

    package: Path | None
    """The new package (None when it was rejected)."""
    low: list[float]
    high: list[float]
    """Per input channel, the values mapped to 0 and 1."""
    sampled_voxels: int
    test: Any
    gate: Any = None
    rejected: Path | None = None
    quantiles: tuple[float, float] | None = None
    """The quantiles (fractions) the fixed values were fitted at (refit) or the percentiles (percentile)."""


def _spatial_axes(tensor: Any) -> list[str]:
    return [str(a.id) for a in tensor.axes if str(getattr(a, "type", "")) == "space"]


def _channels(tensor: Any) -> int:
    for a in tensor.axes:
        if str(getattr(a, "type", "")) == "channel":
            return len(a.channel_names)
    return 1


def refit_package(
    source: str | os.PathLike[str],
    data: Sequence[Any],
    output: str | os.PathLike[str],
    *,
    lower: float | None = None,
    upper: float | None = None,
    trust_code: bool = False,
    gate_config: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> RefitResult:
    """Write a copy of the package ``source`` whose input preprocessing is fixed values fitted on ``data``.

    Parameters
    ----------
    source
        A bioimage.io model package (zip, folder, rdf.yaml; format 0.4 or 0.5) with one input. Only read.
    data
        The user's images (paths: TIFF, Zarr/OME-Zarr, .npy; or arrays ``(C, *spatial)``): the quantiles are
        those of all of them pooled.
    output
        The new package (``.zip``).
    lower, upper
        Quantiles (fractions) mapped to 0 and 1. Default: the package's own percentiles (those it records it was
        trained with, else those of its ``scale_range``), so the fixed values give what its percentile
        normalization gives on this data; without either, 1% and 99.8% (bioimage.io's usual percentiles).
    trust_code
        Let the test and the gate run weights that need the package's code (see :mod:`tilenorm_bmz.bmz.opening`).
    gate_config
        The gate's :class:`~tilenorm_bmz.config.GateConfig` (default: the default one with ilastik gating).

    Raises
    ------
    TilenormError
        The package fails its integrity checks, is not a single-input model, needs trust, or the data does not
        fit it. A package that fails its test or the gate is kept as ``NAME.rejected.zip`` (``result.rejected``).
    """
    from ..data import dataset_quantiles, open_image
    from .normalization import PackageNormalization
    from .package_io import PackageError

    src = Path(source)
    descr, fmt = _open_descr(src, trust_code)
    own = package_quantiles(descr)
    lower = float(lower if lower is not None else own[0] if own else 0.01)
    upper = float(upper if upper is not None else own[1] if own else 0.998)
    inp = descr.inputs[0]
    n_ch, n_spatial = _channels(inp), len(_spatial_axes(inp))
    images = [open_image(d) if not isinstance(d, np.ndarray) else d for d in data]
    for d, im in zip(data, images, strict=True):
        if len(im.shape) - 1 != n_spatial:
            raise PackageError(f"{d if not isinstance(d, np.ndarray) else 'an array'} has {len(im.shape) - 1} "
                               f"spatial axes (shape {tuple(im.shape)}), the package's input {n_spatial}: give "
                               "images of the package's dimensionality")
        if im.shape[0] != n_ch:
            raise PackageError(f"{d if not isinstance(d, np.ndarray) else 'an array'} has {im.shape[0]} channel(s), "
                               f"the package's input {n_ch}")
    lo, hi, n = dataset_quantiles(images, lower, upper, progress=progress)
    if np.any(hi <= lo):
        raise PackageError(f"the {lower:g}/{upper:g} quantiles of the data are equal for some channel (low {lo}, "
                           f"high {hi}): the data is (nearly) constant there; choose other quantiles or data")
    norm = PackageNormalization(mode="fixed", lower=lower, upper=upper, low=lo.tolist(), high=hi.tolist(),
                                statistics_source=f"{len(images)} image(s) of the user's dataset, {n} voxels per "
                                                  "channel")
    names = [str(d) if not isinstance(d, np.ndarray) else f"array {d.shape}" for d in data]
    record = {"from": f"{src.name} ({descr.name}, version {descr.version})", "data": names, "lower": lower,
              "upper": upper, "low": norm.low, "high": norm.high, "sampled_voxels": n, "tool_version": __version__}
    tool = {"input_normalization": {"mode": "fixed", "low": norm.low, "high": norm.high, "clip": True},
            "input_norm": "fixed", "refit": record}
    cfg = gate_config
    if cfg is None or "ilastik" not in cfg.gating_consumers:
        from ..config import GateConfig

        cfg = cfg or GateConfig()
        cfg = cfg.model_copy(update={"gating_consumers": [*cfg.gating_consumers, "ilastik"]})
    result = _rewrite(src, descr, fmt, norm, tool, Path(output), list(data), cfg, trust_code, overwrite, progress)
    result.sampled_voxels = n
    result.quantiles = (lower, upper)
    return result


def percentile_package(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    lower: float | None = None,
    upper: float | None = None,
    data: Sequence[Any] | None = None,
    trust_code: bool = False,
    gate_config: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> RefitResult:
    """Write a copy of ``source`` whose input preprocessing is per-image percentile ``scale_range`` + ``clip``:
    it adapts to any image's bit depth and range, as the paper normalizes globally (seamless in bioimageio.core,
    deepImageJ and tilenorm-bmz, which normalize the whole image first; per tile in ilastik, see
    :func:`refit_package`). ``lower``/``upper`` default to the quantiles the package records it was trained with
    (``config.tilenorm_bmz.input_normalization``), else 1% / 99.8%. Gated on ``data`` (default: the package's
    test input)."""
    from ..config import GateConfig
    from .normalization import PackageNormalization

    src = Path(source)
    descr, fmt = _open_descr(src, trust_code)
    recorded = _tool(descr).get("input_normalization") or {}
    lo_q = float(lower if lower is not None else recorded.get("lower", 0.01))
    hi_q = float(upper if upper is not None else recorded.get("upper", 0.998))
    norm = PackageNormalization(mode="percentile", lower=lo_q, upper=hi_q)
    tool = {"input_normalization": {"mode": "global", "lower": lo_q, "upper": hi_q, "clip": True},
            "input_norm": "percentile",
            "renormalized": {"from": f"{src.name} ({descr.name}, version {descr.version})", "lower": lo_q,
                             "upper": hi_q, "tool_version": __version__}}
    return _rewrite(src, descr, fmt, norm, tool, Path(output), list(data) if data else None,
                    gate_config or GateConfig(), trust_code, overwrite, progress)


def package_quantiles(descr: Any) -> tuple[float, float] | None:
    """The quantiles (fractions) of the package's percentile normalization: those it records it was trained with
    (``config.tilenorm_bmz.input_normalization``), else those of its first input's ``scale_range``; None if
    neither."""
    recorded = _tool(descr).get("input_normalization") or {}
    if recorded.get("mode") in ("global", "tilewise") and "lower" in recorded and "upper" in recorded:
        return float(recorded["lower"]), float(recorded["upper"])
    for step in descr.inputs[0].preprocessing:
        if str(step.id) == "scale_range":
            kwargs = step.kwargs
            return float(kwargs.min_percentile) / 100.0, float(kwargs.max_percentile) / 100.0
    return None


def _tool(descr: Any) -> dict[str, Any]:
    config = descr.config.model_dump(mode="json") if hasattr(descr.config, "model_dump") else dict(descr.config or {})
    return dict(config.get("tilenorm_bmz") or {})


def _open_descr(src: Path, trust_code: bool) -> tuple[Any, str | None]:
    """The package's (format 0.5) description after its integrity checks, and the weights it may run."""
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    from .archive import open_package
    from .package_io import PackageError, untrusted_test_plan

    with open_package(src):  # integrity before bioimageio.spec reads anything of it
        pass
    runs, fmt = untrusted_test_plan(src, trust_code)
    if not runs:
        raise TrustError(f"{src.name}: its only weights run the package's code: pass --trust-code to rewrite it")
    descr = load_description(src, perform_io_checks=False, format_version="latest")
    if isinstance(descr, InvalidDescr) or not isinstance(descr, v0_5.ModelDescr):
        raise PackageError(f"{src} is not a valid bioimage.io model package: validate it first (`tilenorm-bmz "
                           "validate`)")
    if len(descr.inputs) != 1:
        raise PackageError(f"{src.name} has {len(descr.inputs)} inputs; only packages with one input are rewritten")
    return descr, fmt


def _rewrite(src: Path, descr: Any, fmt: str | None, norm: Any, tool_update: dict[str, Any], out: Path,
             gate_data: list[Any] | None, gate_config: Any, trust_code: bool, overwrite: bool,
             progress: bool) -> RefitResult:
    """The package with ``norm`` as its input preprocessing and ``tool_update`` in ``config.tilenorm_bmz``: test
    outputs recomputed, saved (legacy format for ilastik's stack), tested, gated, published or kept as rejected."""
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import get_test_input_sample
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5

    from ..atomic import check_writable
    from .descr import preprocessing
    from .export import rejected_path
    from .gate import validate_package
    from .legacy import write_legacy_package
    from .modeltest import run_model_test
    from .package_io import PackageError

    check_writable(out, overwrite=overwrite)
    if out.suffix.lower() != ".zip":
        raise PackageError(f"the new package must be a .zip file, got {out.name}")
    inp = descr.inputs[0]
    steps = preprocessing(norm, _spatial_axes(inp), _channels(inp))
    new = descr.model_copy(update={"inputs": [inp.model_copy(update={"preprocessing": steps})]})
    config = new.config.model_dump(mode="json") if hasattr(new.config, "model_dump") else dict(new.config or {})
    config["tilenorm_bmz"] = {**_tool(descr), **tool_update}
    new = new.model_copy(update={"config": v0_5.Config.model_validate(config)})
    with tempfile.TemporaryDirectory(prefix="tilenorm_bmz_refit_") as tmp:
        # the test output, computed as bioimageio.core's own test computes it
        with create_prediction_pipeline(bioimageio_model=new, weight_format=fmt) as pp:  # type: ignore[arg-type]
            sample = get_test_input_sample(new)
            pp.apply_preprocessing(sample)
            result = pp.predict_sample_without_blocking(sample, skip_preprocessing=True, skip_postprocessing=True,
                                                        skip_input_padding=True, skip_output_cropping=True)
            pp.apply_postprocessing(result)
        outputs = []
        for descr_out in new.outputs:
            tensor = result.members[descr_out.id]
            path = Path(tmp) / f"test_output_{descr_out.id}.npy"
            np.save(path, tensor.transpose([a.id for a in descr_out.axes]).data.values)
            outputs.append(descr_out.model_copy(update={"test_tensor": v0_5.FileDescr(source=path),
                                                        "sample_tensor": None}))
        new = new.model_copy(update={"outputs": outputs})
        remove_stale(out)
        candidate = temp_sibling(out, ".zip")
        try:
            save_bioimageio_package(new, output_path=candidate)
            write_legacy_package(candidate, candidate)  # the format ilastik's stack reads
            test = run_model_test(candidate, fmt)
            refit = RefitResult(package=None, low=list(norm.low or []), high=list(norm.high or []), sampled_voxels=0,
                                test=test)
            if not test.passed:
                refit.rejected = publish(candidate, rejected_path(out))
                return refit
            report = validate_package(candidate, gate_data, config=gate_config,
                                      out_dir=out.with_name(f"{out.stem}.gate"), trust_code=trust_code,
                                      progress=progress)
            refit.gate = report
            if not report.accepted:
                refit.rejected = publish(candidate, rejected_path(out))
                return refit
            refit.package = publish(candidate, out)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
    logger.info("wrote %s (%s)", out, norm.describe())
    return refit
