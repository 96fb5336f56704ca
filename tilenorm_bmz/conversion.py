"""Convert someone's network to BatchRenorm: the library side of ``tilenorm-bmz convert``.

Sources understood by :func:`convert_source`:

* a tilenorm-bmz checkpoint (any norm kind; our UNet is rebuilt with ``norm="batchrenorm"``);
* a plain state dict (``.pt``/``.pth``, or a dict holding it under ``state_dict``/``model_state_dict``)
  plus an architecture: an importable ``module:Callable`` or a source file and callable name;
* a torch-em checkpoint (``model_state`` + ``init.model_class``/``init.model_kwargs``, read without
  unpickling its data loaders; the network is rebuilt from installed torch-em, or from ``--arch-file``);
* a bioimage.io model package (zip, folder or ``rdf.yaml``) with ``pytorch_state_dict`` weights.

Every source is opened through :func:`tilenorm_bmz.bmz.opening.open_model` (one trust policy, one set of
integrity checks); inputs are never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import ArchitectureSpec, save_checkpoint
from .foreign import SourceKind, detect_source_kind
from .introspect import model_dims, model_in_channels
from .norm import ConversionReport, calibrate_norm, convert_norm

__all__ = [
    "ConvertedModel", "SourceKind", "convert_source", "detect_source_kind", "model_dims", "model_in_channels",
]

logger = logging.getLogger(__name__)



@dataclass
class ConvertedModel:
    """A converted network and everything needed to save it as a checkpoint."""

    model: nn.Module
    architecture: ArchitectureSpec
    report: ConversionReport
    source: Path
    source_kind: SourceKind
    calibrated_batches: int = 0
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        extra = dict(self.extra)
        extra.update(
            converted_from=str(self.source),
            source_kind=self.source_kind,
            conversion=self.report.model_dump(mode="json"),
            calibrated_batches=self.calibrated_batches,
        )
        return save_checkpoint(path, self.model, step=self.step, architecture=self.architecture, **extra)


def _foreign_spec(
    arch: str | None, arch_kwargs: dict[str, Any], arch_file: Path | None, arch_callable: str | None
) -> ArchitectureSpec:
    if arch_file is not None:
        if not arch_file.is_file():
            raise FileNotFoundError(f"architecture file {arch_file} does not exist")
        name = arch_callable or (arch.split(":")[-1] if arch else None)
        if not name:
            raise ValueError("--arch-file needs --arch-callable NAME (the class or function to call)")
        return ArchitectureSpec(
            kind="source",
            source_code=arch_file.read_text(encoding="utf-8"),
            source_name=arch_file.name,
            callable=name,
            kwargs=arch_kwargs,
        )
    assert arch
    return ArchitectureSpec(kind="callable", target=arch, kwargs=arch_kwargs)


def _with_conversion(spec: ArchitectureSpec, model: nn.Module) -> ArchitectureSpec:
    if spec.kind == "unet":
        kwargs = dict(spec.kwargs)
        norm = kwargs.get("norm", "batchrenorm")
        norm = dict(norm) if isinstance(norm, dict) else {"kind": norm}
        momentum = norm.get("momentum", 0.01) if norm.get("kind") == "batchnorm" else 0.01
        norm.update(kind="batchrenorm", momentum=momentum)
        kwargs["norm"] = norm
        return spec.model_copy(update={"kwargs": kwargs})
    return spec.model_copy(update={"norm_conversion": "batchrenorm", "convert_dims": model_dims(model)})


def _calibration_batches(
    paths: Sequence[Path], n_tiles: int, tile_shape: tuple[int, ...], divisor: tuple[int, ...],
    in_channels: int | None, normalization: Any, seed: int = 0,
) -> Iterator[torch.Tensor]:
    from .data import fit_normalization, open_image

    rng = np.random.default_rng(seed)
    images = [open_image(p) for p in paths]
    for img in images:
        if in_channels is not None and img.shape[0] != in_channels:
            raise ValueError(f"{img.path}: the network expects {in_channels} channel(s), the image has {img.shape[0]}")
        if len(img.shape) - 1 != len(tile_shape):
            raise ValueError(
                f"{img.path}: a {len(tile_shape)}D network cannot be calibrated on an image with "
                f"{len(img.shape) - 1} spatial axes (shape {img.shape})"
            )
    fitted = [fit_normalization(normalization, img) for img in images]
    for i in range(n_tiles):
        k = i % len(images)
        img = images[k]
        spatial = img.shape[1:]
        shape = []
        for s, t, d in zip(spatial, tile_shape, divisor, strict=True):
            size = min(t, s)
            size = max(d, (size // d) * d)
            shape.append(size)
        starts = [int(rng.integers(0, max(1, s - t + 1))) for s, t in zip(spatial, shape, strict=True)]
        sl = (slice(None), *(slice(a, a + t) for a, t in zip(starts, shape, strict=True)))
        tile = np.asarray(img[sl], dtype=np.float32)
        pad = [(0, 0)] + [(0, t - s) for s, t in zip(tile.shape[1:], shape, strict=True)]
        if any(p[1] for p in pad):
            tile = np.pad(tile, pad)
        yield torch.from_numpy(fitted[k].apply(tile))[None]


def convert_source(
    source: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    arch_file: str | Path | None = None,
    arch_callable: str | None = None,
    calibrate: Sequence[str | Path] = (),
    calibrate_tiles: int = 32,
    tile_shape: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    divisor: Sequence[int] | None = None,
    trust_code: bool = False,
) -> ConvertedModel:
    """Load any supported source, convert its norm layers to BatchRenorm, optionally calibrate.

    Parameters
    ----------
    source
        Checkpoint, state dict, torch-em checkpoint or bioimage.io package.
    arch, arch_kwargs, arch_file, arch_callable
        The architecture of a plain state dict.
    calibrate
        Images to recompute the running statistics on (global quantile normalization as the model was
        trained, random tiles of ``tile_shape``).
    divisor
        Spatial size divisor per axis of a network that does not expose one (default: inferred from its
        strides and checked, see :func:`tilenorm_bmz.introspect.infer_divisor`); stored in the checkpoint.
    trust_code
        Run architecture code the source carries or names (see :mod:`tilenorm_bmz.bmz.opening`).
    """
    from .bmz.opening import open_model

    source = Path(source)
    given = None
    if arch or arch_file:
        given = _foreign_spec(arch, dict(arch_kwargs or {}), Path(arch_file) if arch_file else None, arch_callable)
    handle = open_model(source, trust_code=trust_code, architecture=given, trainable=True)
    model, kind, extra = handle.network, handle.kind, dict(handle.extra)
    spec = handle.architecture
    assert spec is not None  # trainable=True: never TorchScript
    dims = model_dims(model)
    converted, report = convert_norm(model, to="batchrenorm", inplace=True, dims=dims)
    new_spec = _with_conversion(spec, converted)
    if getattr(converted, "divisor", None) is None:
        new_spec = _with_divisor(new_spec, converted, dims, divisor)
    elif divisor is not None and tuple(divisor) != tuple(converted.divisor):
        raise ValueError(f"--divisor {tuple(divisor)} differs from the network's own divisor {tuple(converted.divisor)}")
    converted._tilenorm_architecture = new_spec  # type: ignore[assignment]
    if not report.converted and not any(True for _ in _brn_layers(converted)):
        logger.warning("%s has no normalization layers to convert", source)
    result = ConvertedModel(converted, new_spec, report, source, kind, extra=extra)
    if calibrate:
        from .data import InputNormalization

        divisor = tuple(getattr(converted, "divisor", (1,) * dims))
        tiles = tile_shape or ((64,) * 3 if dims == 3 else (256,) * dims)
        if len(tiles) != dims:
            raise ValueError(f"--tile has {len(tiles)} axes but the network is {dims}D")
        norm_cfg = extra.get("input_normalization")
        normalization = InputNormalization.model_validate(norm_cfg) if norm_cfg else InputNormalization()
        in_ch = getattr(converted, "in_channels", None)
        batches = _calibration_batches([Path(p) for p in calibrate], calibrate_tiles, tiles, divisor,
                                       in_ch, normalization)
        converted.to(device)
        result.calibrated_batches = calibrate_norm(converted, batches, device=device)
        converted.cpu()
    return result


def _with_divisor(spec: ArchitectureSpec, model: nn.Module, dims: int,
                  divisor: Sequence[int] | None) -> ArchitectureSpec:
    """Record the size divisor of a network that does not expose one (given, else inferred) and set it on it."""
    from .introspect import infer_divisor, model_divisor

    if divisor is not None:
        div = model_divisor(model, dims, divisor)  # checked: one positive int per axis
    else:
        try:
            div = infer_divisor(model, dims)
        except ValueError as e:
            logger.warning("%s; tiling will assume 1 until it is given", e)
            return spec
        logger.info("size divisor %s (product of the network's strides, checked by forward passes)", div)
    model.divisor = div
    return spec.model_copy(update={"divisor": div})


def _brn_layers(model: nn.Module) -> Iterator[nn.Module]:
    from .norm import BatchRenorm

    return (m for m in model.modules() if isinstance(m, BatchRenorm))
