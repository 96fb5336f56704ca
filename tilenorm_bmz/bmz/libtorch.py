"""Will a TorchScript file load in deepImageJ? Its operators checked against libtorch 2.0.1's.

deepImageJ runs TorchScript through JDLL with libtorch at most 2.0.0. ``torch.jit.load`` resolves every
operator of every method when it reads the file, so a file saved by a newer torch loads there only if all
its operators exist in 2.0: a scripted ``F.interpolate``, for one, compiles every mode's branch and brings
``aten::_upsample_lanczos2d_aa``, which 2.0 lacks ("Unknown builtin op"), while the traced (and frozen)
export of the same network holds only the operator the traced mode calls.

The reference is ``data/libtorch-2.0.1-schemas.txt.gz``: ``torch._C._jit_get_all_schemas()`` of torch 2.0.1
(2.0.0 registers the same list), written once in a side environment by ``scripts/make_libtorch_schemas.py``
(provenance in ``data/libtorch-2.0.1-schemas.PROVENANCE.md``). An operator is known when its
``name.overload`` is in that list; graph nodes without a registered schema (``prim::Constant``, ``prim::If``,
``prim::Loop``, ... which the interpreter itself runs) are not operators and are not checked.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

__all__ = ["LIBTORCH_REFERENCE", "known_operators", "missing_operators", "torchscript_operators"]

LIBTORCH_REFERENCE = "2.0.1"
"""The libtorch release whose operators a TorchScript file must stay within (deepImageJ / JDLL: <= 2.0.0,
which registers the same operators)."""
_SCHEMAS = "libtorch-2.0.1-schemas.txt.gz"


def _schema_name(schema: str) -> str:
    """``"aten::add.Tensor(Tensor self, ...) -> Tensor"`` -> ``"aten::add.Tensor"``."""
    return schema.split("(", 1)[0].strip()


@lru_cache(maxsize=1)
def known_operators() -> frozenset[str]:
    """``name.overload`` (or ``name`` for the default overload) of every operator libtorch 2.0.1 registers."""
    data = resources.files("tilenorm_bmz.bmz").joinpath("data", _SCHEMAS).read_bytes()
    names: set[str] = set()
    section = ""
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        if line.startswith("# section:"):
            section = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and section == "operators":
            names.add(_schema_name(line))
    return frozenset(names)


def _graphs(module: torch.jit.ScriptModule) -> Iterator[torch.Graph]:
    """The graph of every compiled method of ``module`` and its submodules, functions inlined."""
    for sub in module.modules():
        c = getattr(sub, "_c", None)
        if c is None:
            continue
        for name in c._method_names():
            graph = c._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            yield graph


def _nodes(block: torch.Block | torch.Graph) -> Iterator[torch.Node]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def torchscript_operators(module: torch.jit.ScriptModule | str | os.PathLike[str]) -> set[str]:
    """The registered operators (``name.overload``) a TorchScript module or file calls, in any method."""
    if not isinstance(module, torch.jit.ScriptModule):
        module = torch.jit.load(str(Path(module)), map_location="cpu")
    ops: set[str] = set()
    for graph in _graphs(module):
        for node in _nodes(graph):
            try:
                schema = node.schema()
            except RuntimeError:
                continue
            if schema and schema != "(no schema)":
                ops.add(_schema_name(schema))
    return ops


def missing_operators(module: torch.jit.ScriptModule | str | os.PathLike[str]) -> list[str]:
    """Operators of a TorchScript module or file that libtorch 2.0.1 does not have (sorted; empty: it loads)."""
    return sorted(torchscript_operators(module) - known_operators())
