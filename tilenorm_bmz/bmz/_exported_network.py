"""Rebuild a third-party network with its normalization layers as ``torch.nn.BatchNorm`` (export form).

tilenorm-bmz ships this file (imports ``torch`` only) as the architecture of a bioimage.io package whose
network is not tilenorm-bmz's UNet but whose normalization layers were converted to BatchRenorm: the
original architecture is built, then every BatchNorm / InstanceNorm / GroupNorm layer is replaced by the
``BatchNorm{dims}d`` that holds the exported running statistics (the eval form of BatchRenorm). When the
architecture itself is defined in source code, that code precedes this block in the same file.
"""

# No ``from __future__`` import and ``typing.Dict`` on purpose: this block is appended to foreign source
# files (where a __future__ import mid-file is a SyntaxError) and consumers may run older Pythons.
import importlib
from typing import Any, Dict  # noqa: UP035

from torch import nn

_CONVERTIBLE = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _resolve(target: str) -> Any:
    if ":" in target:
        module_name, _, name = target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    return globals()[target]


def _num_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    return layer.num_features


class TilenormExportedNetwork(nn.Module):
    """Build ``target(**network_kwargs)`` and swap its normalization layers for ``BatchNorm{dims}d``.

    ``target`` is ``"package.module:Callable"`` or the name of a callable defined earlier in this file.
    Calling the class returns the rebuilt network itself, not a wrapper around it (so the state dict keys are
    the network's); it is a ``torch.nn.Module`` class so that tools which only build network classes accept it.
    """

    def __new__(cls, target: str, dims: int, network_kwargs: Dict[str, Any]) -> nn.Module:  # noqa: UP006
        model = _resolve(target)(**network_kwargs)
        replace = [(name, m) for name, m in model.named_modules() if name and isinstance(m, _CONVERTIBLE)]
        for name, layer in replace:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _BATCHNORM[dims](_num_features(layer), eps=layer.eps))
        return model
