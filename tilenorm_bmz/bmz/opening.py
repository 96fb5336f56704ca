"""One door for every model a command is given: :func:`open_model` -> :class:`ModelHandle`.

Every command (``convert``, ``halo``, ``predict``, ``package``, ``validate``, ``train --resume``) opens what
the user names through :func:`open_model`; the loaders behind it are

* tilenorm-bmz checkpoints (:func:`~tilenorm_bmz.checkpoint.load_checkpoint`);
* plain state dicts plus an architecture the user gives on the command line;
* torch-em trainer checkpoints (:func:`~tilenorm_bmz.foreign.read_torch_em`, inert unpickling);
* bioimage.io packages, format 0.4 and 0.5 (:mod:`~tilenorm_bmz.bmz.archive` integrity checks, then
  ``pytorch_state_dict`` or ``torchscript`` weights).

Trust policy (as bioimage.io users know it from ``trust_remote_code``): by default no code from a file runs.
Weights load with ``torch.load(weights_only=True)`` (pickled objects become inert placeholders, never
unpickled); our own UNet and network classes of the trusted libraries
(:data:`~tilenorm_bmz.checkpoint.TRUSTED_NETWORKS`) build without trust; a stored architecture source,
another stored callable, or a package's architecture file runs only with ``trust_code=True``, and even then
the callable must be a ``torch.nn.Module`` subclass. Without trust a package falls back to its TorchScript
weights (which carry no Python) and says so; where there are none, :class:`~tilenorm_bmz.errors.TrustError`
names the flag. An architecture the user passes on the command line (``--arch``, ``--arch-file``) is the
user's own choice and needs no flag.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..checkpoint import (
    ArchitectureSpec,
    CheckpointError,
    CheckpointInfo,
    architecture_of,
    build_model,
    load_checkpoint,
    load_state_strict,
    load_torch_file,
    needs_trust,
)
from ..errors import TrustError
from ..foreign import SourceKind, detect_source_kind, extract_state_dict, read_torch_em
from ..introspect import model_dims, model_divisor, model_in_channels

__all__ = ["ModelHandle", "WeightsChoice", "open_model"]

logger = logging.getLogger(__name__)

WeightsChoice = Literal["auto", "pytorch_state_dict", "torchscript"]


@dataclass
class ModelHandle:
    """A model opened through :func:`open_model`: the network and what commands need to know about it."""

    network: nn.Module
    """In eval mode, on the CPU."""
    source: Path
    kind: SourceKind
    weights_format: str
    """``checkpoint``, ``state_dict``, ``torch_em``, ``pytorch_state_dict`` or ``torchscript``."""
    dims: int
    in_channels: int
    divisor: tuple[int, ...]
    architecture: ArchitectureSpec | None = None
    """How to rebuild the network (None for TorchScript)."""
    declared_halo: dict[str, int] | None = None
    """A package's output halo per axis id."""
    input_normalization: dict[str, Any] | None = None
    """The recorded input normalization (``InputNormalization`` fields), when the source has one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The source's metadata (checkpoint ``extra``; a package's ``bioimageio`` entry)."""
    checkpoint_info: CheckpointInfo | None = None
    trusted: tuple[str, ...] = ()
    """The code from the file that ran because the user trusted it (empty: none)."""
    untrusted: tuple[str, ...] = ()
    """A package's weight formats left unused because they would run its code without trust."""
    notes: list[str] = field(default_factory=list)

    def normalization_for(self, choice: str = "model") -> tuple[Any, str | None]:
        """The input normalization a command applies for ``choice`` (``model``: as the model was trained;
        ``global``/``tilewise`` with the recorded quantiles; ``none``), and a note when it had to assume one.

        Returns ``(InputNormalization | None, note)``. Raises :class:`PackageError` for a package whose
        preprocessing tilenorm-bmz cannot express, unless another choice is given.
        """
        from ..config import InputNormalization

        if choice == "none":
            return None, None
        recorded = self.input_normalization
        if choice in ("global", "tilewise"):
            base = {k: v for k, v in (recorded or {}).items() if k in ("lower", "upper", "clip", "eps")}
            return InputNormalization.model_validate({**base, "mode": choice}), None
        if recorded:
            return InputNormalization.model_validate(recorded), None
        if self.kind == "bioimageio":
            from .package_io import PackageError

            steps = (self.extra.get("bioimageio") or {}).get("preprocessing") or []
            if any((s.get("id") or s.get("name")) not in (None, "ensure_dtype") for s in steps):
                raise PackageError("the package's preprocessing has no tilenorm-bmz equivalent; choose one with "
                                   "--normalization global|tilewise|none")
            return None, None
        return InputNormalization(), ("the checkpoint records no input normalization; using global quantiles "
                                      "0.01/0.98 (choose with --normalization)")


def _introspect(network: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    try:
        dims = model_dims(network)
        channels = model_in_channels(network)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return dims, channels, model_divisor(network, dims)


def _trusted(spec: ArchitectureSpec | None, trust_code: bool) -> tuple[str, ...]:
    return (spec.describe(),) if spec is not None and trust_code and needs_trust(spec) else ()


def check_finite(network: nn.Module, source: Path) -> None:
    """Refuse weights with NaN/Inf values: every output would be NaN, and every measurement noise."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in (*network.named_parameters(),
                                                                   *network.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        total = sum(n for _, n in bad)
        names = ", ".join(name for name, _ in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise CheckpointError(
            f"{source}: the weights hold {total} NaN/Inf value(s) in {len(bad)} tensor(s) ({names}): the "
            "training diverged or the file is damaged; use an earlier checkpoint"
        )


def _handle(network: nn.Module, source: Path, kind: SourceKind, weights_format: str,
            spec: ArchitectureSpec | None, step: tuple[int, ...] | None = None, **kw: Any) -> ModelHandle:
    network.eval()
    check_finite(network, source)
    dims, channels, divisor = _introspect(network)
    if getattr(network, "divisor", None) is None and step is not None and len(step) == dims:
        divisor = step  # a network that does not say: the package's declared size step
    return ModelHandle(network=network, source=source, kind=kind, weights_format=weights_format, dims=dims,
                       in_channels=channels, divisor=divisor, architecture=spec, **kw)


def _package_step(rdf: dict[str, Any]) -> tuple[int, ...] | None:
    """The size step of the package's first input per spatial axis (z, y, x order), if it declares one."""
    inputs = rdf.get("inputs") or []
    if not inputs or not isinstance(inputs[0], dict):
        return None
    first = inputs[0]
    steps: dict[str, int] = {}
    axes = first.get("axes")
    if isinstance(axes, list):  # format 0.5
        for a in axes:
            size = a.get("size") if isinstance(a, dict) else None
            if isinstance(a, dict) and a.get("type") == "space" and isinstance(size, dict) and size.get("step"):
                steps[str(a.get("id"))] = int(size["step"])
    elif isinstance(axes, str) and isinstance(first.get("shape"), dict):  # format 0.4
        step = first["shape"].get("step") or []
        steps = {ax: int(st) for ax, st in zip(axes, step, strict=False) if ax in "zyx" and st}
    out = tuple(steps[a] for a in "zyx" if a in steps)
    return out or None


def _open_package(path: Path, trust_code: bool, weights: WeightsChoice, trainable: bool) -> ModelHandle:
    from .archive import open_package
    from .package_io import (
        PackageError,
        check_model,
        package_extra,
        read_package_model,
        read_torchscript,
        state_dict_needs_trust,
    )

    with open_package(path) as files:
        check_model(files)  # a description bioimageio.spec accepts: the fields below exist
        present = set(files.rdf.get("weights") or {})
        order = ["pytorch_state_dict", "torchscript"] if weights == "auto" else [weights]
        if trainable:
            order = ["pytorch_state_dict"]
        usable = [w for w in order if w in present]
        if not usable:
            need = " or ".join(order)
            raise PackageError(f"{path} has no {need} weights (it has: {', '.join(sorted(present)) or 'none'})")
        notes: list[str] = []
        step = _package_step(files.rdf)
        # decided from the description, whichever weights end up loaded: what must not run without trust
        untrusted = ("pytorch_state_dict",) if ("pytorch_state_dict" in present and not trust_code
                                                and state_dict_needs_trust(files)) else ()
        last_error: Exception | None = None
        for fmt in usable:
            try:
                if fmt == "pytorch_state_dict":
                    model, spec, extra = read_package_model(files, trust_code=trust_code)
                    bio = extra.get("bioimageio") or {}
                    return _handle(model, path, "bioimageio", fmt, spec, step, declared_halo=bio.get("halo") or None,
                                   input_normalization=extra.get("input_normalization"), extra=extra,
                                   trusted=_trusted(spec, trust_code), notes=notes, untrusted=untrusted)
                network = read_torchscript(files)
                extra = package_extra(files)
                bio = extra["bioimageio"]
                return _handle(network, path, "bioimageio", fmt, None, step, declared_halo=bio.get("halo") or None,
                               input_normalization=extra.get("input_normalization"), extra=extra, notes=notes,
                               untrusted=untrusted)
            except TrustError as e:
                last_error = e
                if fmt != usable[-1]:
                    notes.append(f"{path.name}: its pytorch_state_dict architecture is code from the package, "
                                 "which runs only with --trust-code; using its torchscript weights instead")
                    logger.warning(notes[-1])
            except (PackageError, CheckpointError) as e:
                last_error = e
                if fmt != usable[-1]:
                    notes.append(f"the {fmt} weights could not be loaded ({e}); using {usable[-1]}")
                    logger.warning(notes[-1])
        assert last_error is not None
        raise last_error


def open_model(
    source: str | os.PathLike[str],
    *,
    trust_code: bool = False,
    architecture: ArchitectureSpec | None = None,
    weights: WeightsChoice = "auto",
    trainable: bool = False,
    allow: tuple[SourceKind, ...] = ("checkpoint", "state_dict", "torch_em", "bioimageio"),
) -> ModelHandle:
    """Open any model source a command is given (see the module docstring for the trust policy).

    Parameters
    ----------
    source
        A tilenorm-bmz checkpoint, a plain state dict (with ``architecture``), a torch-em trainer checkpoint,
        or a bioimage.io package (zip, folder, rdf.yaml; format 0.4/0.5).
    trust_code
        Allow code that the file carries or names to run (``--trust-code``).
    architecture
        The architecture of a plain state dict, or of a torch-em checkpoint when torch-em is not installed,
        as the user gave it (``--arch``, ``--arch-file``); it is the user's own code and needs no trust.
    weights
        Which weights of a package to use (``auto``: the state dict where it needs no untrusted code, else
        TorchScript).
    trainable
        The command needs a PyTorch module it can convert or train (``convert``): packages must provide
        ``pytorch_state_dict`` weights.
    allow
        The source kinds the command accepts; others get an error that says how to convert them.

    Raises
    ------
    TilenormError
        ``CheckpointError``, ``PackageError``, ``IntegrityError``, ``TrustError``: what was wrong and what to do.
    FileNotFoundError
        ``source`` does not exist.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    obj = None
    from ..foreign import is_bioimageio

    if not is_bioimageio(path):
        obj = load_torch_file(path, inert=True)
    kind = detect_source_kind(path, obj)
    if kind not in allow:
        raise CheckpointError(
            f"{path} is a {kind.replace('_', ' ')} file, which this command does not open: convert it first "
            f"(`tilenorm-bmz convert {path} -o model.pt`)"
        )
    if kind == "bioimageio":
        return _open_package(path, trust_code, weights, trainable)
    if kind == "checkpoint":
        model, info = load_checkpoint(path, trust_code=trust_code)
        spec = architecture_of(model) or info.architecture
        return _handle(model, path, kind, "checkpoint", spec, input_normalization=info.extra.get("input_normalization"),
                       extra=dict(info.extra), checkpoint_info=info, trusted=_trusted(spec, trust_code))
    if kind == "torch_em":
        tem = read_torch_em(path, obj)
        try:
            spec = tem.spec(architecture, trust_code=trust_code)
            model = build_model(spec, trust_code=trust_code or architecture is not None)
        except ValueError as e:
            if isinstance(e, TrustError) or architecture is not None:
                raise
            raise CheckpointError(
                f"{path} is a torch-em checkpoint of {tem.model_class}; rebuilding it needs torch-em installed "
                f"({e}), or its architecture given with --arch-file FILE --arch-callable NAME --arch-kwargs JSON"
            ) from e
        load_state_strict(model, tem.state_dict, f"{path}: the weights do not fit {spec.describe()}",
                          "Check the architecture and its kwargs.")
        extra = {"torch_em": {"model_class": tem.model_class, "model_kwargs": tem.describe_kwargs(),
                              "iteration": tem.iteration}}
        return _handle(model, path, kind, "torch_em", spec, extra=extra)
    state = extract_state_dict(obj)
    assert state is not None
    if architecture is None:
        raise CheckpointError(
            f"{path} is a plain state dict, which does not say which network it belongs to: pass --arch "
            "package.module:Class (and --arch-kwargs JSON), or --arch-file FILE.py --arch-callable NAME"
        )
    model = build_model(architecture, trust_code=True)  # the user's own command-line choice
    load_state_strict(model, state, f"the weights do not fit {architecture.describe()}",
                      "Check --arch and --arch-kwargs.")
    return _handle(model, path, "state_dict", "state_dict", architecture)
