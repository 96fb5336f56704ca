"""Files that other tools wrote: what kind a model file is, and the loaders for torch-em and plain state dicts.

* :func:`detect_source_kind`: our checkpoint, a plain state dict, a torch-em checkpoint, or a bioimage.io
  package (zip, folder, rdf.yaml).
* :func:`read_torch_em`: a checkpoint written by torch-em's trainer (``DefaultTrainer.save_checkpoint``).
  It pickles the trainer's ``init`` arguments, data loaders and datasets included, so it does not load with
  ``weights_only=True``. It is read with the inert loader of :func:`~tilenorm_bmz.checkpoint.load_torch_file`:
  tensors and plain containers load, every pickled class or function becomes an inert placeholder, and
  nothing the file names is imported or called. Only ``model_state`` and ``init["model_class"]`` /
  ``init["model_kwargs"]`` are used.
* :func:`extract_state_dict`: the tensors of a plain state dict (also under ``state_dict`` /
  ``model_state_dict`` / ``model_state`` / ``model``).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import CHECKPOINT_FORMAT, ArchitectureSpec, CheckpointError, InertObject, load_torch_file

__all__ = ["SourceKind", "TorchEmCheckpoint", "detect_source_kind", "extract_state_dict", "is_bioimageio",
           "read_torch_em"]

SourceKind = Literal["checkpoint", "state_dict", "torch_em", "bioimageio"]

_STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model")

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
"""The names of a bioimage.io description at the top of a package."""


def is_bioimageio(path: Path) -> bool:
    """A bioimage.io package: a folder with an rdf, an rdf.yaml, or a zip holding one (not a torch file)."""
    if path.is_dir():
        return any((path / n).exists() for n in RDF_NAMES)
    if path.suffix.lower() in (".yaml", ".yml"):
        return True
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
        return bool(names & set(RDF_NAMES))
    return False


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict in ``obj`` (itself, or under one of the usual keys), or None."""
    def tensors(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if tensors(obj):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if tensors(obj.get(key)):
                return obj[key]
    return None


def _is_torch_em(obj: Any) -> bool:
    return isinstance(obj, dict) and "model_state" in obj and isinstance(obj.get("init"), dict)


def detect_source_kind(path: Path, obj: Any = None) -> SourceKind:
    """Which kind of source ``path`` is (``obj``: its content as loaded with ``load_torch_file(inert=True)``)."""
    if is_bioimageio(path):
        return "bioimageio"
    if obj is None:
        obj = load_torch_file(path, inert=True)
    if isinstance(obj, dict):
        if obj.get("format") == CHECKPOINT_FORMAT:
            return "checkpoint"
        if _is_torch_em(obj):
            return "torch_em"
        if extract_state_dict(obj) is not None:
            return "state_dict"
    raise CheckpointError(
        f"{path} is not a checkpoint, state dict, torch-em checkpoint or bioimage.io package "
        f"(it holds a {type(obj).__name__})"
    )


@dataclass(frozen=True)
class TorchEmCheckpoint:
    """What a torch-em trainer checkpoint says about its network."""

    model_class: str
    """``init["model_class"]`` as the file names it, e.g. ``torch_em.model.unet.UNet2d``."""
    model_kwargs: dict[str, Any]
    """``init["model_kwargs"]`` as read: pickled class references in it are inert placeholders."""
    state_dict: dict[str, torch.Tensor]
    iteration: int | None = None
    path: Path | None = None

    @property
    def target(self) -> str:
        module, _, name = self.model_class.rpartition(".")
        return f"{module}:{name}"

    def spec(self, architecture: ArchitectureSpec | None = None, *, trust_code: bool = False) -> ArchitectureSpec:
        """The architecture to build: the one the checkpoint names, or ``architecture`` (the user's) when given;
        in both, kwargs default to the checkpoint's, made plain (see :func:`plain_kwargs`)."""
        from .checkpoint import network_class

        spec = architecture or ArchitectureSpec(kind="callable", target=self.target)
        if architecture is not None and architecture.kwargs:
            return architecture
        cls = network_class(spec, trust_code=trust_code or architecture is not None)
        kwargs = plain_kwargs(self.model_kwargs, constructor_defaults(cls), f"{self.path}: init['model_kwargs']")
        return spec.model_copy(update={"kwargs": kwargs})

    def describe_kwargs(self) -> dict[str, Any]:
        """The kwargs for metadata: placeholders as the names they stand for."""
        return {k: (f"<{inert_name(v)}>" if inert_name(v) else v) for k, v in self.model_kwargs.items()}


def inert_name(value: Any) -> str | None:
    """The ``module.qualname`` an inert placeholder (an instance or the placeholder class itself) stands for."""
    if isinstance(value, InertObject) or (isinstance(value, type) and issubclass(value, InertObject)):
        return value.name
    return None


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The default values of a class's constructor parameters."""
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (ValueError, TypeError):
        return {}
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _qualname(obj: Any) -> str | None:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if module and name else None


def plain_kwargs(kwargs: dict[str, Any], defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """Network kwargs as plain values. torch-em pickles some of them as class references (``conv_block_impl``
    and friends); one that names the constructor's own default (``defaults``) is dropped, since the default
    is that class; any other pickled object is refused: it would have to be imported on the file's say-so."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        named = inert_name(value)
        if named is None:
            if isinstance(value, dict | list | tuple) and _contains_inert(value):
                raise CheckpointError(f"{where}: {key} holds pickled objects, which tilenorm-bmz does not rebuild; "
                                      "give the architecture with --arch-file FILE --arch-callable NAME --arch-kwargs JSON")
            out[key] = value
        elif not (key in defaults and _same_class(defaults[key], named)):
            raise CheckpointError(
                f"{where}: {key} is the pickled object {named}, which is not the network's default and which "
                "tilenorm-bmz does not import on a file's say-so; give the architecture with --arch-file FILE "
                "--arch-callable NAME --arch-kwargs JSON"
            )
    return out


def _same_class(default: Any, named: str) -> bool:
    """``named`` (``module.Class``) is the class ``default``, by its qualified name; a class defined in an
    architecture file the user gave (another module name) matches by its class name and the tail of its module."""
    q = _qualname(default)
    if q is None or not isinstance(default, type):
        return False
    if q == named:
        return True
    return q.rpartition(".")[2] == named.rpartition(".")[2] and default.__module__.startswith("tilenorm_bmz_arch_")


def _contains_inert(value: Any) -> bool:
    if inert_name(value) is not None:
        return True
    if isinstance(value, dict):
        return any(_contains_inert(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_inert(v) for v in value)
    return False


_COMPILED_PREFIX = "_orig_mod."


def _strip_compiled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-em compiles its models (``torch.compile``), so their state dict keys start with ``_orig_mod.``."""
    if state and all(k.startswith(_COMPILED_PREFIX) for k in state):
        return {k[len(_COMPILED_PREFIX):]: v for k, v in state.items()}
    return state


def read_torch_em(path: Path, obj: Any = None) -> TorchEmCheckpoint:
    """Read a torch-em trainer checkpoint without running anything it pickles (see the module docstring)."""
    obj = load_torch_file(path, inert=True) if obj is None else obj
    if not _is_torch_em(obj):
        raise CheckpointError(f"{path} is not a torch-em checkpoint (no model_state and init)")
    init = obj["init"]
    cls_path = init.get("model_class")
    cls_path = inert_name(cls_path) or cls_path  # older torch-em pickled the class itself
    if not isinstance(cls_path, str) or "." not in cls_path:
        raise CheckpointError(f"{path}: torch-em checkpoint has no usable init['model_class'] ({cls_path!r})")
    state = extract_state_dict({"model_state": obj["model_state"]})
    if state is None:
        raise CheckpointError(f"{path}: torch-em checkpoint's model_state is not a mapping of tensors")
    iteration = obj.get("iteration")
    return TorchEmCheckpoint(cls_path, dict(init.get("model_kwargs") or {}), _strip_compiled(dict(state)),
                             int(iteration) if isinstance(iteration, int) else None, path)
