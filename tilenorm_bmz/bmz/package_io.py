"""Read bioimage.io model packages (zip, folder or rdf.yaml; format 0.4 and 0.5) back into PyTorch.

:func:`read_package_model` rebuilds the network of a package with ``pytorch_state_dict`` weights (the
architecture from its source file or from an importable library) so that ``tilenorm-bmz convert`` can
turn a published model back into a BatchRenorm checkpoint and fine-tune it; :func:`read_torchscript` loads
its TorchScript weights. Packages are opened through :func:`~tilenorm_bmz.bmz.archive.open_package` (member
names, links, sizes and every sha256 checked first; only the needed members are read). Code from the package
(its architecture file) runs only with ``trust_code=True``. The input is never modified.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..checkpoint import (
    TRUST_HINT,
    ArchitectureSpec,
    build_model,
    load_state_strict,
    load_torch_file,
    needs_trust,
)
from ..errors import TilenormError, TrustError
from .archive import PackageFiles, open_package

__all__ = ["OnnxNetwork", "PackageError", "open_package", "read_onnx", "read_package_model", "read_torchscript"]

logger = logging.getLogger(__name__)



class PackageError(TilenormError, ValueError):
    """A file is not a usable bioimage.io model package (or not for the asked purpose)."""


def _source_name(source: Any, what: str) -> str:
    if isinstance(source, Mapping):
        source = source.get("source")
    if not isinstance(source, str) or not source:
        raise PackageError(f"the package names no file for {what}")
    if "://" in source:
        raise PackageError(f"{what} is a remote file ({source}); download the package with its files first")
    return source


def _code(source: str) -> str | None:
    """The code of a Python source without its comments and docstrings (None when it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return ast.dump(tree)


def _is_our_unet(files: PackageFiles, file_name: str) -> bool:
    """The package's architecture file is tilenorm-bmz's own UNet (comments may differ): the current
    ``unet.py`` or an earlier release of it that computes the same (``models/released/``)."""
    from ..models import unet

    here = Path(unet.__file__).parent
    releases = [here / "unet.py", *sorted((here / "released").glob("unet-*.py.txt"))]
    ours = {_code(p.read_text(encoding="utf-8")) for p in releases} - {None}
    theirs = _code(files.file(file_name, "the architecture source").read_text(encoding="utf-8"))
    return theirs is not None and theirs in ours


def _architecture_file(arch: Any) -> tuple[str, str] | None:
    """``(file, callable)`` of an architecture defined in a file of the package (0.5 source, 0.4 ``file.py:X``)."""
    if isinstance(arch, Mapping) and not arch.get("import_from"):
        return _source_name(arch.get("source"), "the architecture source"), str(arch.get("callable"))
    if isinstance(arch, str) and ":" in arch and arch.split(":")[0].endswith(".py"):
        file_part, _, callable_name = arch.rpartition(":")
        return _source_name(file_part, "the architecture source"), callable_name
    return None


def _architecture_spec(files: PackageFiles, weights: Mapping[str, Any], tool: Mapping[str, Any]) -> ArchitectureSpec:
    recorded = tool.get("architecture") if isinstance(tool, Mapping) else None
    arch = weights.get("architecture")
    kwargs = dict(weights.get("kwargs") or {})  # format 0.4 keeps kwargs next to the architecture
    in_file = _architecture_file(arch)
    # a package that says it holds our UNet is built as ours only when its file is our UNet's code: what
    # bioimage.io consumers run is then what the gate measures, and no code of the package's own runs
    if isinstance(recorded, Mapping) and recorded.get("kind") == "unet" and in_file is not None \
            and _is_our_unet(files, in_file[0]):
        return ArchitectureSpec(kind="unet", kwargs=dict(recorded.get("kwargs") or {}))
    if isinstance(arch, Mapping):  # format 0.5
        callable_name = arch.get("callable")
        kwargs = dict(arch.get("kwargs") or {})
        if arch.get("import_from"):
            return ArchitectureSpec(kind="callable", target=f"{arch['import_from']}:{callable_name}", kwargs=kwargs)
        file_name = _source_name(arch.get("source"), "the architecture source")
    elif isinstance(arch, str):  # format 0.4: "file.py:Callable" or "package.module.Callable"
        if ":" in arch and arch.split(":")[0].endswith(".py"):
            file_part, _, callable_name = arch.rpartition(":")
            file_name = _source_name(file_part, "the architecture source")
        else:
            module, _, name = arch.rpartition(".")
            return ArchitectureSpec(kind="callable", target=f"{module}:{name}", kwargs=kwargs)
    else:
        raise PackageError("the pytorch_state_dict weights name no architecture")
    if not file_name.endswith(".py"):
        raise PackageError(f"architecture source {file_name} is not a Python file (zipped modules are not supported)")
    file_path = files.file(file_name, "the architecture source")
    return ArchitectureSpec(
        kind="source", source_code=file_path.read_text(encoding="utf-8"), source_name=Path(file_name).name,
        callable=str(callable_name), kwargs=kwargs,
    )


def _restore_renorm(model: nn.Module, tool: Mapping[str, Any]) -> dict[str, Any] | None:
    """Give a network trained with BatchRenorm (and exported as BatchNorm) back its BatchRenorm layers with the
    clipping limits it held at export, so that train mode behaves as it did in training (what the train/eval
    disparity and fine-tuning need). The limits come from the layers (``training.renorm_limits``, per layer);
    packages written before that record fall back to the schedule at the recorded step. Returns
    ``{"step", "r_max", "d_max", "schedule", "source"}`` (r_max/d_max: the largest over the layers) or None."""
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
    recorded = training.get("renorm_limits")
    if isinstance(recorded, Mapping) and recorded:
        layers = dict(model.named_modules())
        for name, (r, d) in recorded.items():
            layer = layers.get(str(name))
            if not isinstance(layer, BatchRenorm):
                raise PackageError(f"config.tilenorm_bmz.training.renorm_limits names {name!r}, which is not a "
                                   "normalization layer of the network")
            layer.set_renorm_limits(float(r), float(d))
        r_max = max(float(r) for r, _ in recorded.values())
        d_max = max(float(d) for _, d in recorded.values())
        source = "layers"
    else:
        r_max, d_max = schedule.apply(model, step) if schedule is not None else (1.0, 0.0)
        source = "schedule" if schedule is not None else "none"
    return {"step": step, "r_max": r_max, "d_max": d_max, "source": source,
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


@contextlib.contextmanager
def _opened(source: str | os.PathLike[str] | PackageFiles) -> Iterator[PackageFiles]:
    if isinstance(source, PackageFiles):
        yield source
    else:
        with open_package(source) as files:
            yield files


def read_package_model(
    source: str | os.PathLike[str] | PackageFiles, *, trust_code: bool = False
) -> tuple[nn.Module, ArchitectureSpec, dict[str, Any]]:
    """Rebuild the network of a bioimage.io model package with its ``pytorch_state_dict`` weights.

    Parameters
    ----------
    source
        A package zip, an unpacked package folder or its rdf.yaml (format 0.4 or 0.5), or a package already
        opened with :func:`~tilenorm_bmz.bmz.archive.open_package` (integrity checked).
    trust_code
        Run the package's architecture file (or import the library callable it names). Without it only
        architectures that need no code from the package build: tilenorm-bmz's own UNet (recorded in
        ``config.tilenorm_bmz``) and network classes of the trusted libraries
        (:data:`~tilenorm_bmz.checkpoint.TRUSTED_NETWORKS`).

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
        Not a model package, no ``pytorch_state_dict`` weights, missing files.
    IntegrityError
        Unsafe members, sizes, or files that do not match their sha256.
    TrustError
        The architecture is code from the package and ``trust_code`` was not given.
    CheckpointError
        The weights do not fit the architecture.
    """
    with _opened(source) as files:
        name = files.source
        rdf = files.rdf
        check_model(files)
        weights = (rdf.get("weights") or {}).get("pytorch_state_dict")
        if not isinstance(weights, Mapping):
            present = ", ".join(sorted(rdf.get("weights") or {})) or "none"
            raise PackageError(
                f"{name} has no pytorch_state_dict weights (it has: {present}); tilenorm-bmz can only read "
                "PyTorch state dicts back into a trainable network"
            )
        tool = ((rdf.get("config") or {}).get("tilenorm_bmz")) or {}
        spec = _architecture_spec(files, weights, tool)
        if needs_trust(spec) and not trust_code:
            raise TrustError(
                f"{name}: building its pytorch_state_dict network runs the package's architecture code "
                f"({spec.describe()}): {TRUST_HINT}"
            )
        weights_file = files.file(_source_name(weights.get("source"), "the pytorch_state_dict weights"),
                                  "the pytorch_state_dict weights")
        state = load_torch_file(weights_file, inert=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        model = build_model(spec, trust_code=trust_code)
        load_state_strict(model, state, f"{name}: the weights do not fit the architecture {spec.describe()}")
        renorm = _restore_renorm(model, tool)
        model.eval()
        extra = package_extra(files)
        if renorm is not None:
            extra["renorm"] = renorm
    logger.info("read %s (%s) from %s", spec.describe(), rdf.get("name"), name)
    return model, spec, extra


def state_dict_needs_trust(files: PackageFiles) -> bool:
    """Whether building the package's ``pytorch_state_dict`` network runs code of the package (its architecture
    file, or a library callable outside the trusted networks); False when it has no such weights."""
    weights = (files.rdf.get("weights") or {}).get("pytorch_state_dict")
    if not isinstance(weights, Mapping):
        return False
    tool = ((files.rdf.get("config") or {}).get("tilenorm_bmz")) or {}
    try:
        return needs_trust(_architecture_spec(files, weights, tool))
    except PackageError:
        return True  # an architecture we cannot tell: treat it as code


def untrusted_test_plan(source: str | os.PathLike[str] | PackageFiles, trust_code: bool) -> tuple[bool, str | None]:
    """How bioimage.io's own test (and pipeline) may run a package without running untrusted code:
    ``(True, None)`` every weight format; ``(True, fmt)`` only ``fmt``; ``(False, None)`` not at all (its only
    weights need the package's code and ``trust_code`` was not given)."""
    if trust_code:
        return True, None
    with _opened(source) as files:
        if not state_dict_needs_trust(files):
            return True, None
        present = set(files.rdf.get("weights") or {})
    for fmt in ("torchscript", "onnx"):
        if fmt in present:
            return True, fmt
    return False, None


def _declared_halo(output: Mapping[str, Any]) -> dict[str, int]:
    """The output halo per axis id: format 0.5 axes carry it, format 0.4 has a list beside an axes string."""
    axes = output.get("axes")
    if isinstance(axes, str) and isinstance(output.get("halo"), list):  # 0.4: "bcyx" + [0, 0, 8, 8]
        return {a: int(h) for a, h in zip(axes, output["halo"], strict=False) if h}
    return {a.get("id"): a.get("halo") for a in axes or [] if isinstance(a, Mapping) and a.get("halo")}


def package_extra(files: PackageFiles) -> dict[str, Any]:
    """A package's metadata as commands use it: ``bioimageio`` (name, format version, halo per axis, the raw
    preprocessing, ``config.tilenorm_bmz``) and ``input_normalization`` (when expressible)."""
    rdf = files.rdf
    tool = ((rdf.get("config") or {}).get("tilenorm_bmz")) or {}
    inputs = rdf.get("inputs") or [{}]
    outputs = rdf.get("outputs") or [{}]
    extra: dict[str, Any] = {
        "bioimageio": {
            "source": str(files.source),
            "name": rdf.get("name"),
            "format_version": rdf.get("format_version"),
            "halo": _declared_halo(outputs[0]),
            "preprocessing": inputs[0].get("preprocessing") or [],
            "tilenorm_bmz": dict(tool),
        }
    }
    norm = _input_normalization(rdf, tool)
    if norm is not None:
        extra["input_normalization"] = norm
    return extra


def _weights_bytes(files: PackageFiles, fmt: str) -> bytes:
    """The bytes of the package's ``fmt`` weights file (checked name, read from the archive)."""
    weights = (files.rdf.get("weights") or {}).get(fmt)
    if not isinstance(weights, Mapping):
        raise PackageError(f"{files.source} has no {fmt} weights")
    what = f"the {fmt} weights"
    with files.open(_source_name(weights.get("source"), what), what) as fh:
        return fh.read()


def read_torchscript(source: str | os.PathLike[str] | PackageFiles) -> nn.Module:
    """Load a package's ``torchscript`` weights (no trust needed: TorchScript runs no Python from the file)."""
    import torch

    with _opened(source) as files:
        data = _weights_bytes(files, "torchscript")
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    except RuntimeError as e:
        raise PackageError(f"{files.source}: its torchscript weights could not be loaded: {str(e).splitlines()[0]}") from e


class OnnxNetwork(nn.Module):
    """A package's ``onnx`` weights run by onnxruntime, as a ``(B, C, *spatial) -> (B, C_out, *spatial)`` module.

    No code from the file runs (onnxruntime executes its registered operators only). It has no parameters, no
    train mode and no gradients (``differentiable = False``): the receptive field is measured from its impulse
    response, and train/eval disparity does not apply.
    """

    differentiable = False

    def __init__(self, model: bytes, name: str) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:  # the optional extra
            raise PackageError(f"{name} has onnx weights only, which need onnxruntime: pip install "
                               "'tilenorm-bmz[onnx]'") from e
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own error types
            raise PackageError(f"{name}: its onnx weights could not be loaded: {str(e).splitlines()[0]}") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise PackageError(f"{name}: its onnx graph has {len(inputs)} inputs; one is supported")
        self._input = inputs[0].name
        self.name = name

    def forward(self, x: Any) -> Any:
        import torch

        if not isinstance(x, torch.Tensor) or isinstance(x, torch.fx.Proxy):  # e.g. torch.fx tracing: not traceable
            raise TypeError(f"an onnxruntime session runs on tensors, not on {type(x).__name__}")
        array = x.detach().to("cpu", torch.float32).numpy()
        y = self._session.run(None, {self._input: array})[0]
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxNetwork:
        return self  # stateless: a session holds only the (read-only) graph


def read_onnx(source: str | os.PathLike[str] | PackageFiles) -> OnnxNetwork:
    """Load a package's ``onnx`` weights (no trust needed; see :class:`OnnxNetwork`)."""
    with _opened(source) as files:
        return OnnxNetwork(_weights_bytes(files, "onnx"), files.source.name)


def check_model(files: PackageFiles) -> None:
    """The package describes a model that bioimageio.spec accepts (validated once per opened package)."""
    if files.model_checked:
        return
    if files.rdf.get("type") != "model":
        raise PackageError(f"{files.source} describes a {files.rdf.get('type')!r}, not a model")
    _validate_format(files.rdf_path)
    files.model_checked = True


def _validate_format(rdf_path: Path) -> None:
    from bioimageio.spec import InvalidDescr, load_model_description

    try:
        descr = load_model_description(rdf_path, perform_io_checks=False, format_version="discover")
    except ValueError as e:  # bioimageio.spec raises for an invalid model description
        raise PackageError(f"{rdf_path.parent.name}/{rdf_path.name} is not a valid bioimage.io model: "
                           f"{' '.join(str(e).split())[:1500]}") from e
    if isinstance(descr, InvalidDescr):
        errors = "; ".join(
            f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in descr.validation_summary.details for e in d.errors
        )
        raise PackageError(f"{rdf_path.parent.name}/{rdf_path.name} is not a valid bioimage.io model: {errors[:1500]}")
