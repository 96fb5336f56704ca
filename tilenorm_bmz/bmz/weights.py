"""The network of a package in eval form and its weight files.

* :func:`eval_form` replaces every BatchRenorm by the equal ``nn.BatchNorm`` and proves that the eval
  outputs are bit-identical;
* :func:`write_architecture` writes what rebuilds the network: ``models/unet.py`` verbatim for our UNet
  (it imports only torch), the original source or a library reference for other networks, wrapped by
  :mod:`tilenorm_bmz.bmz._exported_network` when their normalization layers were converted;
* :func:`write_state_dict`, :func:`write_torchscript` (scripted, checked at several sizes and batch sizes)
  and :func:`write_onnx` (one file, legacy exporter, opset 17: what deepImageJ's ONNX runtime reads).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import ArchitectureSpec, architecture_of
from ..norm import BatchRenorm, convert_norm
from ._yaml import dump_yaml

__all__ = [
    "ONNX_OPSET",
    "ArchitectureArtifact",
    "eval_form",
    "write_architecture",
    "write_onnx",
    "write_state_dict",
    "write_torchscript",
]

logger = logging.getLogger(__name__)

#: deepImageJ's ONNX runtime (1.13) reads opsets up to 17/18; 17 is what the legacy exporter writes well.
ONNX_OPSET = 17
_WRAPPER_CALLABLE = "TilenormExportedNetwork"


@dataclass
class ArchitectureArtifact:
    """What a package needs to rebuild its network from a state dict."""

    kind: str
    """``file`` (``source`` defines ``callable``) or ``library`` (``import_from.callable``)."""
    callable: str
    kwargs: dict[str, Any]
    source: Path | None = None
    import_from: str | None = None
    dependencies: Path | None = None
    """Conda environment file listing the library (``library`` kind, or a wrapper that imports one)."""
    spec: ArchitectureSpec | None = None
    """The architecture in tilenorm-bmz's terms (recorded in ``config.tilenorm_bmz``)."""
    notes: list[str] = field(default_factory=list)


# -- eval form ------------------------------------------------------------------------------------------
def _check_input(model: nn.Module, in_channels: int, sizes: Sequence[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand((2, in_channels, *sizes), generator=gen)


def eval_form(model: nn.Module, probe_sizes: Sequence[int], in_channels: int) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode with every BatchRenorm replaced by the equal ``nn.BatchNorm``.

    Raises ``RuntimeError`` if the eval outputs of the copy differ in any element from ``model``'s on a
    random probe of ``probe_sizes`` (a valid input size). Returns the copy and the number of converted layers.
    """
    source = model.eval()
    exported, report = convert_norm(source, to="batchnorm")
    exported.eval()
    leftover = [n for n, m in exported.named_modules() if isinstance(m, BatchRenorm)]
    if leftover:
        raise RuntimeError(f"BatchRenorm layers left after conversion: {leftover[:5]}")
    x = _check_input(source, in_channels, probe_sizes)
    with torch.no_grad():
        a = source(x)
        b = exported(x)
    if not torch.equal(a, b):
        diff = (a - b).abs().max().item()
        raise RuntimeError(f"eval outputs changed by the BatchRenorm -> BatchNorm conversion (max |diff| {diff:.3g})")
    return exported, len(report.converted)


# -- architecture ---------------------------------------------------------------------------------------
def _distribution_of(module_name: str) -> tuple[str, str] | None:
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top)
    if not dists:
        return None
    name = dists[0]
    try:
        return name, importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_environment(folder: Path, module_name: str) -> tuple[Path, str]:
    dist = _distribution_of(module_name)
    if dist is None:
        raise ValueError(
            f"cannot tell which installed distribution provides {module_name!r}; install it with pip so the "
            "package can name its dependency, or save the architecture as a source file (--arch-file)"
        )
    torch_version = torch.__version__.split("+")[0]
    env = {
        "name": "tilenorm-bmz-export",
        "channels": ["conda-forge", "nodefaults"],
        "dependencies": ["python>=3.10", "pip", {"pip": [f"torch=={torch_version}", f"{dist[0]}=={dist[1]}"]}],
    }
    path = folder / "environment.yaml"
    path.write_text(dump_yaml(env), encoding="utf-8")
    return path, f"{dist[0]}=={dist[1]}"


def _unet_kwargs_for_export(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    norm = out.get("norm", "batchrenorm")
    norm = dict(norm) if isinstance(norm, dict) else {"kind": norm}
    if norm.get("kind") == "batchrenorm":
        norm["kind"] = "batchnorm"
    out["norm"] = norm
    return out


def write_architecture(model: nn.Module, folder: Path, dims: int) -> ArchitectureArtifact:
    """Write the architecture files of ``model`` (the *original*, not the eval copy) into ``folder``."""
    from ..models import UNet
    from ..models import unet as unet_module

    spec = architecture_of(model)
    if isinstance(model, UNet) or (spec is not None and spec.kind == "unet"):
        kwargs = _unet_kwargs_for_export(model.init_kwargs if isinstance(model, UNet) else dict(spec.kwargs))
        path = folder / "unet.py"
        path.write_text(Path(inspect.getfile(unet_module)).read_text(encoding="utf-8"), encoding="utf-8")
        return ArchitectureArtifact(
            kind="file", callable="UNet", kwargs=kwargs, source=path,
            spec=ArchitectureSpec(kind="unet", kwargs=kwargs),
        )
    if spec is None:
        raise ValueError(
            f"cannot export a {type(model).__name__}: its architecture is unknown. Save it as a checkpoint "
            "with an architecture (tilenorm-bmz convert ... --arch module:Callable or --arch-file FILE.py)"
        )
    converted = spec.norm_conversion is not None
    if spec.kind == "callable":
        assert spec.target is not None
        module_name, _, name = spec.target.partition(":")
        env, requirement = _write_environment(folder, module_name)
        if not converted:
            return ArchitectureArtifact(
                kind="library", callable=name, kwargs=dict(spec.kwargs), import_from=module_name,
                dependencies=env, spec=spec, notes=[f"needs {requirement}"],
            )
        path = folder / "exported_network.py"
        path.write_text(_wrapper_source(), encoding="utf-8")
        return ArchitectureArtifact(
            kind="file", callable=_WRAPPER_CALLABLE,
            kwargs={"target": spec.target, "dims": spec.convert_dims or dims, "network_kwargs": dict(spec.kwargs)},
            source=path, dependencies=env, spec=spec, notes=[f"needs {requirement}"],
        )
    assert spec.source_code is not None and spec.callable is not None
    stem = Path(spec.source_name or "architecture.py").stem or "architecture"
    path = folder / f"{stem}.py"
    if not converted:
        path.write_text(spec.source_code, encoding="utf-8")
        return ArchitectureArtifact(kind="file", callable=spec.callable, kwargs=dict(spec.kwargs), source=path, spec=spec)
    text = spec.source_code.rstrip() + "\n\n\n# " + "-" * 96 + "\n" + _wrapper_source()
    path.write_text(text, encoding="utf-8")
    return ArchitectureArtifact(
        kind="file", callable=_WRAPPER_CALLABLE,
        kwargs={"target": spec.callable, "dims": spec.convert_dims or dims, "network_kwargs": dict(spec.kwargs)},
        source=path, spec=spec,
    )


def _wrapper_source() -> str:
    from . import _exported_network

    return Path(inspect.getfile(_exported_network)).read_text(encoding="utf-8")


def build_from_artifact(art: ArchitectureArtifact) -> nn.Module:
    """Instantiate the network as a consumer would from the written architecture (used to check it).

    The architecture was written here from a network this process already built, so its code is trusted.
    """
    from ..checkpoint import ArchitectureSpec, build_model

    if art.kind == "library":
        spec = ArchitectureSpec(kind="callable", target=f"{art.import_from}:{art.callable}", kwargs=art.kwargs)
    else:
        assert art.source is not None
        spec = ArchitectureSpec(kind="source", source_code=art.source.read_text(encoding="utf-8"),
                                source_name=art.source.name, callable=art.callable, kwargs=art.kwargs)
    return build_model(spec, trust_code=True)


# -- weight files ---------------------------------------------------------------------------------------
def write_state_dict(model: nn.Module, path: Path, art: ArchitectureArtifact) -> Path:
    """Save the pure state dict (loads with ``weights_only=True``) and check the architecture takes it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    rebuilt = build_from_artifact(art)
    result = rebuilt.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"the packaged architecture ({art.callable}) does not take the exported weights: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    torch.save(state, path)
    return path


def _probe_inputs(in_channels: int, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand((b, in_channels, *s), generator=gen) for s in sizes for b in (1, 2)]


def _check_against_eager(module: torch.jit.ScriptModule, model: nn.Module, in_channels: int,
                         sizes: Sequence[Sequence[int]], what: str) -> float:
    """Largest deviation of ``module`` from ``model`` over ``sizes`` x batch 1, 2; raises when they differ."""
    deviation = 0.0
    with torch.no_grad():
        for x in _probe_inputs(in_channels, sizes):
            expected = model(x)
            got = module(x)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
                raise RuntimeError(
                    f"the {what} differs from the network for input {tuple(x.shape)}: "
                    f"shape {tuple(got.shape)} vs {tuple(expected.shape)}, max |diff| "
                    f"{(got - expected).abs().max().item() if got.shape == expected.shape else float('nan'):.3g}"
                )
            deviation = max(deviation, (got - expected).abs().max().item())
    return deviation


def write_torchscript(
    model: nn.Module, path: Path, in_channels: int, sizes: Sequence[Sequence[int]]
) -> tuple[Path, float]:
    """Script ``model`` and check it against eager at ``sizes`` (each with batch 1 and 2).

    Scripting keeps every size working (tracing records one). When the scripted graph calls operators that
    libtorch 2.0.1 lacks (deepImageJ could not load it, :mod:`.libtorch`), the network is traced and frozen
    instead, and the traced file is used only if it needs no missing operator and equals eager at every size;
    otherwise the scripted file is written (with a warning; the compatibility report fails it for deepImageJ).
    Returns the path and the largest deviation from eager.
    """
    from .libtorch import LIBTORCH_REFERENCE, missing_operators

    try:
        scripted = torch.jit.script(model)
    except Exception as e:  # torch raises many types here; the message is what matters
        raise RuntimeError(
            f"torch.jit.script failed for {type(model).__name__}: {str(e).splitlines()[0]}. Drop torchscript "
            "from the weight formats (deepImageJ and ilastik then cannot run the package) or make the "
            "network scriptable"
        ) from e
    missing = missing_operators(scripted)
    module: torch.jit.ScriptModule = scripted
    if missing:
        try:
            example = _probe_inputs(in_channels, sizes[:1])[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings of shape checks: every size is compared below
                traced = torch.jit.freeze(torch.jit.trace(model.eval(), example))
            still = missing_operators(traced)
            if still:
                raise RuntimeError(f"the traced graph needs {', '.join(still)} too")
            _check_against_eager(traced, model, in_channels, sizes, "traced TorchScript export")
            module = traced
            logger.info("TorchScript traced and frozen: the scripted graph calls %s, which libtorch %s "
                        "(deepImageJ) lacks", ", ".join(missing), LIBTORCH_REFERENCE)
        except Exception as e:  # the scripted export stays; the compatibility report names the operators
            logger.warning("the TorchScript export calls %s, which libtorch %s (deepImageJ) lacks, and tracing "
                           "gives no replacement (%s)", ", ".join(missing), LIBTORCH_REFERENCE, e)
    module.save(str(path))
    loaded = torch.jit.load(str(path), map_location="cpu")
    return path, _check_against_eager(loaded, model, in_channels, sizes, "TorchScript export")


def write_onnx(
    model: nn.Module, path: Path, in_channels: int, sizes: Sequence[Sequence[int]]
) -> tuple[Path, float | None]:
    """Export a single-file ONNX model (legacy exporter, opset 17, dynamic batch and spatial sizes).

    Checked with onnxruntime (when installed) at ``sizes`` and batch 1 and 2; returns the path and the
    largest deviation from eager (None when onnxruntime is missing).
    """
    dims = len(sizes[0])
    names = ["z", "y", "x"][3 - dims :]
    dynamic = {0: "batch", **{2 + i: a for i, a in enumerate(names)}}
    example = _probe_inputs(in_channels, sizes[:1])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning (torch >= 2.9)
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": dynamic, "output": dynamic},
            external_data=False,
        )
    try:
        import onnxruntime as ort
    except ImportError:
        logger.info("onnxruntime is not installed: the ONNX file is checked by the bioimage.io test only")
        return path, None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    deviation = 0.0
    with torch.no_grad():
        for x in _probe_inputs(in_channels, sizes):
            got = session.run(None, {"input": x.numpy()})[0]
            expected = model(x).numpy()
            if got.shape != expected.shape:
                raise RuntimeError(
                    f"the ONNX export gives shape {got.shape} for input {tuple(x.shape)}, expected {expected.shape}"
                )
            deviation = max(deviation, float(abs(got - expected).max()))
    if deviation > 1e-3:
        raise RuntimeError(f"the ONNX export differs from the network by up to {deviation:.3g}")
    return path, deviation
