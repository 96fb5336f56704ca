"""The one checkpoint format of tilenorm-bmz.

A checkpoint is a ``torch.save``'d dict made only of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` (no pickled code is ever executed)::

    format            "tilenorm_bmz.checkpoint"
    format_version    1
    tool_version      tilenorm_bmz version that wrote it
    torch_version
    architecture      how to rebuild the network (see ArchitectureSpec):
                      {"kind": "unet", "kwargs": {...}}                          our UNet
                      {"kind": "callable", "target": "pkg.mod:Fn", "kwargs": {...}}  importable callable
                      {"kind": "source", "source_code": "...", "callable": "Fn", "kwargs": {...}}
                      plus "norm_conversion": "batchrenorm" | null for foreign networks whose norm layers
                      were converted after construction
    state_dict        the model's state dict (BatchRenorm limits included)
    state_dict_sha256 checksum of the state dict (detects a modified or corrupted file)
    step              the trainer's global step (drives the BatchRenorm schedule)
    optimizer_state   optimizer.state_dict() or None
    schedule          RenormSchedule as a dict, or None
    extra             JSON-like metadata (training config, input normalization, data used, ...)

Files are written atomically (temporary file + rename), so an interrupted save never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import sys
import types
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ._version import __version__
from .atomic import publish, remove_stale, temp_sibling
from .config import RenormSchedule
from .errors import TilenormError, TrustError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "ArchitectureSpec",
    "CheckpointError",
    "CheckpointInfo",
    "build_model",
    "load_checkpoint",
    "load_state_strict",
    "load_torch_file",
    "save_checkpoint",
    "state_dict_sha256",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tilenorm_bmz.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(TilenormError, ValueError):
    """A file is not a valid tilenorm-bmz checkpoint (truncated, foreign, or modified)."""


#: Network classes of installed libraries that a file may name without ``--trust-code``: building one runs the
#: library's code (what the user installed), not code the file carries. Only these classes (checked by where
#: they are defined, after import), and only with kwargs that name no file or URL: some library networks load
#: a checkpoint named in their kwargs (torch-em's UNETR unpickles ``encoder_checkpoint``), others download.
TRUSTED_NETWORKS: dict[str, frozenset[str]] = {
    "tilenorm_bmz.models": frozenset({"UNet"}),
    "torch_em.model": frozenset({"UNet2d", "UNet3d", "AnisotropicUNet"}),
    "monai.networks.nets": frozenset({"UNet", "BasicUNet", "BasicUnet", "Basicunet", "AttentionUnet", "DynUNet",
                                      "SegResNet", "VNet"}),
}

#: kwarg names that point a library network at a file or URL to load: building with them needs trust
_LOADING_KWARGS = ("checkpoint", "pretrained", "url", "path", "file", "weights", "download")

TRUST_HINT = (
    "pass --trust-code (trust_code=True) only if you trust whoever made the file: its code then runs with "
    "your permissions"
)


class ArchitectureSpec(BaseModel):
    """How to rebuild a network from a checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["unet", "callable", "source"]
    kwargs: dict[str, Any] = {}
    target: str | None = None
    """``module.path:Callable`` for ``kind="callable"``."""
    source_code: str | None = None
    """Python source defining ``callable`` for ``kind="source"``."""
    source_name: str | None = None
    """File name the source came from (for messages and packaging)."""
    callable: str | None = None
    norm_conversion: Literal["batchrenorm"] | None = None
    """Apply ``convert_norm(to=...)`` after construction (foreign networks with converted norm layers)."""
    convert_dims: int | None = None
    divisor: tuple[int, ...] | None = None
    """Spatial size divisor per axis, for a network that does not expose ``divisor`` itself (set on it)."""

    def describe(self) -> str:
        if self.kind == "unet":
            return "tilenorm_bmz UNet"
        if self.kind == "callable":
            return f"{self.target}"
        return f"{self.callable} from {self.source_name or 'embedded source'}"


@dataclass
class CheckpointInfo:
    """Everything in a checkpoint besides the model itself."""

    path: Path | None
    architecture: ArchitectureSpec
    step: int = 0
    optimizer_state: dict[str, Any] | None = None
    schedule: RenormSchedule | None = None
    tool_version: str = ""
    torch_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def norm_kind(self) -> str | None:
        if self.architecture.kind == "unet":
            norm = self.architecture.kwargs.get("norm", "batchrenorm")
            return norm.get("kind") if isinstance(norm, dict) else norm
        return self.architecture.norm_conversion


# -- helpers ------------------------------------------------------------------------------------------
def _to_plain(value: Any, where: str) -> Any:
    """Convert metadata to what ``torch.load(weights_only=True)`` accepts (and YAML/JSON can show)."""
    if value is None or isinstance(value, torch.Tensor) or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):  # str subclasses (e.g. torch's TorchVersion) would be pickled as objects
        return str(value)
    for base in (bool, int, float):  # subclasses such as IntEnum members or numpy-like scalars
        if isinstance(value, base):
            return base(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return _to_plain(value.value, where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        # int keys stay ints (optimizer state is keyed by parameter index)
        return {(k if type(k) in (int, str) else str(k)): _to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"checkpoint field {where} has a value of type {type(value).__name__}, which cannot be stored "
        "safely; use plain Python values, tensors, or pydantic models"
    )


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Checksum over names, dtypes, shapes and bytes of a state dict (order independent)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_sibling(path)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class InertObject:
    """Stands in for a pickled object of a class or function a file names (see :func:`load_torch_file`).

    It records the arguments and state the pickle gave it and does nothing else: no import of what the file
    names, no call of it. ``name`` is the ``module.qualname`` the file named.
    """

    name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


def _placeholder(name: str) -> type[InertObject]:
    return type(f"Inert[{name}]", (InertObject,), {"name": name, "__module__": __name__})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def pickled_globals(path: str | os.PathLike[str]) -> list[str]:
    """The classes and functions a torch file's pickle names beyond tensors and plain containers.

    Read from the pickle's opcodes without executing anything (``torch.serialization``'s scanner).
    """
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception:  # legacy (non-zip) torch files cannot be scanned
        return []


def load_torch_file(path: str | os.PathLike[str], *, inert: bool = False) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with clear errors.

    Parameters
    ----------
    inert
        Also load files whose pickle names other classes or functions (a torch-em trainer checkpoint pickles
        its data loaders, a Lightning checkpoint its hyper-parameters): each one becomes an
        :class:`InertObject` that holds the pickled arguments and state, and nothing the file names is
        imported or called. Tensors and plain containers load as usual.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    CheckpointError
        The file is not a PyTorch file (truncated or another format), or (``inert=False``) it holds pickled
        objects other than tensors and plain containers, which are never unpickled here.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder, not a checkpoint file")
    names = pickled_globals(p)
    try:
        if inert and names:
            with torch.serialization.safe_globals([(_placeholder(n), n) for n in names]):
                return torch.load(p, map_location="cpu", weights_only=True)
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not names:  # nothing pickled that we refuse: the bytes are not a torch.save file at all
            raise CheckpointError(
                f"{p} is not a PyTorch checkpoint (not a torch.save file: truncated or another format): "
                f"{_first_line(e)}"
            ) from e
        named = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
        raise CheckpointError(
            f"{p} holds pickled Python objects besides tensors ({named}); tilenorm-bmz never unpickles them, "
            "since unpickling can run code the file carries. Save the weights alone (model.state_dict()) with "
            "their architecture, or convert a torch-em checkpoint with `tilenorm-bmz convert`"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"{p} is not a PyTorch checkpoint (not a torch.save file: truncated or another format): "
            f"{_first_line(e)}"
        ) from e


# -- model construction -------------------------------------------------------------------------------
def _import_network_class(target: str) -> type[nn.Module]:
    """Import ``module.path:Class`` and check that it is an ``nn.Module`` subclass before anything is called."""
    if ":" not in target:
        raise ValueError(f"architecture target must look like 'package.module:Class', got {target!r}")
    mod_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} for architecture {target!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_name!r} has no attribute {attr!r} (architecture {target!r})")
        obj = getattr(obj, part)
        if isinstance(obj, types.ModuleType):  # a class is named by its module, not reached through others
            raise TrustError(f"architecture {target!r} reaches through the module {obj.__name__}: name the class as "
                             "'package.module:Class'")
    return _network_class(obj, target)


def _network_class(obj: Any, what: str) -> type[nn.Module]:
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise TrustError(
            f"architecture {what} is a {type(obj).__name__}, not a torch.nn.Module class: refused (an "
            "architecture must name a network class; nothing was called)"
        )
    return obj


def _trusted_library(target: str) -> str | None:
    """The trusted library whose network class ``target`` (``module:Class``) names, if any."""
    module, _, name = target.partition(":")
    for lib, classes in TRUSTED_NETWORKS.items():
        if (module == lib or module.startswith(f"{lib}.")) and name in classes:
            return lib
    return None


def _loading_kwargs(kwargs: dict[str, Any]) -> list[str]:
    return [k for k in kwargs if any(word in k.lower() for word in _LOADING_KWARGS)]


def _class_from_source(source: str, name: str, filename: str) -> type[nn.Module]:
    mod_name = f"tilenorm_bmz_arch_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    module = sys.modules.get(mod_name)
    if module is None:
        module = types.ModuleType(mod_name)
        module.__file__ = filename
        sys.modules[mod_name] = module  # dataclasses / typing need the module registered
        try:
            exec(compile(source, filename, "exec"), module.__dict__)  # only with trust_code (build_model)
        except Exception:
            del sys.modules[mod_name]
            raise
    if not hasattr(module, name):
        raise ValueError(f"architecture source {filename} defines no {name!r}")
    return _network_class(getattr(module, name), f"{name} from {filename}")


def needs_trust(spec: ArchitectureSpec) -> bool:
    """Whether building ``spec`` runs code that the file carries or names (then ``trust_code`` is required)."""
    if spec.kind == "unet":
        return False
    if spec.kind == "callable":
        return not (spec.target and _trusted_library(spec.target)) or bool(_loading_kwargs(spec.kwargs))
    return True


def load_state_strict(model: nn.Module, state: Any, what: str, hint: str = "") -> None:
    """``model.load_state_dict(state)`` with one clear :class:`CheckpointError` for any mismatch.

    ``what`` starts the message (e.g. ``"x.pt: the weights do not match UNet"``); ``hint`` ends it.
    """
    suffix = f". {hint}" if hint else ""
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:4])
        raise CheckpointError(f"{what}: {detail}{suffix}") from e
    if result.missing_keys or result.unexpected_keys:
        def few(keys: list[str]) -> str:
            return f"{keys[:6]}{' ...' if len(keys) > 6 else ''}"

        raise CheckpointError(
            f"{what}: missing keys {few(result.missing_keys)}, unexpected keys {few(result.unexpected_keys)}{suffix}"
        )


def network_class(spec: ArchitectureSpec, *, trust_code: bool = False) -> type[nn.Module]:
    """The network class ``spec`` names, imported (callable) or defined (source), not yet called.

    Raises :class:`TrustError` when that needs trust and ``trust_code`` is False, or when it is not an
    ``nn.Module`` subclass.
    """
    if spec.kind == "unet":
        from .models import UNet

        return UNet
    if needs_trust(spec) and not trust_code:
        loading = _loading_kwargs(spec.kwargs) if spec.kind == "callable" else []
        where = (f"imports and calls {spec.target} with kwargs that name files or URLs to load ({', '.join(loading)})"
                 if loading else f"imports and calls {spec.target}" if spec.kind == "callable"
                 else f"runs the Python source {spec.source_name or 'stored in the file'}")
        raise TrustError(f"building this network {where}, which is code the file brings with it: {TRUST_HINT}")
    if spec.kind == "callable":
        if not spec.target:
            raise ValueError("architecture kind 'callable' needs a target 'module:Class'")
        cls = _import_network_class(spec.target)
        lib = _trusted_library(spec.target)
        if not trust_code and (lib is None or not cls.__module__.startswith(lib)):
            raise TrustError(f"architecture {spec.target!r} resolves to {cls.__module__}.{cls.__qualname__}, which is "
                             f"not a network class of the trusted libraries: {TRUST_HINT}")
        return cls
    if not spec.source_code or not spec.callable:
        raise ValueError("architecture kind 'source' needs source_code and callable")
    return _class_from_source(spec.source_code, spec.callable, spec.source_name or "<architecture>")


def build_model(spec: ArchitectureSpec, *, trust_code: bool = False) -> nn.Module:
    """Instantiate the (untrained) network described by ``spec``, norm conversion included.

    Trust policy: our ``unet`` and the network classes of :data:`TRUSTED_NETWORKS` build without trust;
    any other callable (imported by name) and any stored source (executed) only with ``trust_code=True``,
    and even then the callable must be a ``torch.nn.Module`` subclass, checked before it is called.

    Raises
    ------
    TrustError
        The architecture needs ``trust_code`` and it was not given, or it names something that is not a
        network class.
    """
    if spec.kind == "unet":
        from .models import UNet

        model: nn.Module = UNet(**spec.kwargs)
    else:
        model = network_class(spec, trust_code=trust_code)(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"architecture {spec.describe()} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.norm_conversion:
        from .norm import convert_norm

        convert_norm(model, to=spec.norm_conversion, inplace=True, dims=spec.convert_dims)
    if spec.divisor and getattr(model, "divisor", None) is None:
        model.divisor = tuple(spec.divisor)  # what tiling, export and the gate read
    model._tilenorm_architecture = spec  # type: ignore[assignment]  # remembered for re-saving
    return model


def architecture_of(model: nn.Module) -> ArchitectureSpec | None:
    """The :class:`ArchitectureSpec` that rebuilds ``model``, if known."""
    spec = getattr(model, "_tilenorm_architecture", None)
    if isinstance(spec, ArchitectureSpec):
        return spec
    from .models import UNet

    if isinstance(model, UNet):
        return ArchitectureSpec(kind="unet", kwargs=model.init_kwargs)
    return None


# -- save / load --------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    step: int = 0,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    schedule: RenormSchedule | None = None,
    architecture: ArchitectureSpec | None = None,
    **extra: Any,
) -> Path:
    """Save ``model`` and training state atomically.

    Parameters
    ----------
    path
        Output file (``.pt``); its folder is created.
    model
        Our :class:`~tilenorm_bmz.models.UNet`, or any module built by :func:`build_model` /
        :func:`load_checkpoint`, or any module when ``architecture`` says how to rebuild it.
    step
        The trainer's global step.
    optimizer
        An optimizer (its ``state_dict()`` is stored) or a state dict.
    schedule
        The BatchRenorm schedule in use.
    **extra
        JSON-like metadata stored under ``extra`` (pydantic models are dumped).
    """
    spec = architecture or architecture_of(model)
    if spec is None:
        raise ValueError(
            f"cannot save a {type(model).__name__} without knowing how to rebuild it: pass "
            "architecture=ArchitectureSpec(kind='callable', target='module:Callable', kwargs=...)"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "tool_version": __version__,
        "torch_version": str(torch.__version__),
        "architecture": spec.model_dump(mode="json"),
        "state_dict": state,
        "state_dict_sha256": state_dict_sha256(state),
        "step": int(step),
        "optimizer_state": _to_plain(opt_state, "optimizer_state") if opt_state is not None else None,
        "schedule": schedule.model_dump(mode="json") if schedule is not None else None,
        "extra": _to_plain(dict(extra), "extra"),
    }
    out = Path(path)
    _atomic_torch_save(ckpt, out)
    logger.info("saved checkpoint %s (step %d)", out, step)
    return out


def _describe_foreign(obj: Any) -> str:
    if isinstance(obj, dict):
        if "model_state" in obj and "init" in obj:
            return (
                "it looks like a torch-em checkpoint: convert it with `tilenorm-bmz convert FILE -o OUT.pt` "
                "(needs torch-em importable)"
            )
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return (
                "it is a plain state dict: convert it with `tilenorm-bmz convert FILE --arch module:Callable "
                "--arch-kwargs '{...}' -o OUT.pt`"
            )
        keys = ", ".join(sorted(map(str, obj))[:8])
        return f"it is a dict with keys {keys}"
    return f"it holds a {type(obj).__name__}"


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check the raw checkpoint dict (no model is built)."""
    p = Path(path)
    obj = load_torch_file(p)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a tilenorm-bmz checkpoint: {_describe_foreign(obj)}")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format version {version!r}; this tilenorm-bmz ({__version__}) reads up to "
            f"{CHECKPOINT_FORMAT_VERSION}: upgrade tilenorm-bmz"
        )
    missing = [k for k in ("architecture", "state_dict", "state_dict_sha256") if k not in obj]
    if missing:
        raise CheckpointError(f"{p} is damaged: missing {', '.join(missing)}")
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} is damaged: its state_dict is not a mapping of tensors")
    if state_dict_sha256(state) != obj["state_dict_sha256"]:
        raise CheckpointError(
            f"{p} failed its checksum: the weights were modified after saving or the file is corrupted"
        )
    return obj


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", trust_code: bool = False
) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns the model (in eval mode, on ``map_location``) and a :class:`CheckpointInfo` with the training
    state and metadata. ``trust_code``: build a stored architecture that is code (a source, or a callable
    outside the trusted libraries; see :func:`build_model`).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CheckpointError
        Truncated, foreign (with a hint how to convert it), tampered or inconsistent file.
    TrustError
        The stored architecture is code and ``trust_code`` was not given.
    """
    p = Path(path)
    obj = read_checkpoint(p)
    try:
        spec = ArchitectureSpec.model_validate(obj["architecture"])
    except Exception as e:
        raise CheckpointError(f"{p} has an invalid architecture entry: {e}") from e
    model = build_model(spec, trust_code=trust_code)
    load_state_strict(model, obj["state_dict"], f"{p}: the weights do not match the architecture {spec.describe()}")
    model.to(map_location).eval()
    schedule = obj.get("schedule")
    info = CheckpointInfo(
        path=p,
        architecture=spec,
        step=int(obj.get("step") or 0),
        optimizer_state=obj.get("optimizer_state"),
        schedule=RenormSchedule.model_validate(schedule) if schedule else None,
        tool_version=str(obj.get("tool_version", "")),
        torch_version=str(obj.get("torch_version", "")),
        extra=dict(obj.get("extra") or {}),
    )
    return model, info
