#!/usr/bin/env python3
"""Dump the TorchScript operator schemas known to one torch/libtorch build.

This is a standalone *generator* script. It is NOT part of the tilenorm_bmz
package at runtime and must NOT be run in the project's own environment (which
has a much newer torch).  It is meant to run in a throw-away side virtual
environment that holds exactly the torch release whose libtorch you want to
describe, e.g. for deepImageJ / JDLL (libtorch <= 2.0.0):

    python3.11 -m venv /tmp/side-torch20
    /tmp/side-torch20/bin/pip install torch==2.0.1
    /tmp/side-torch20/bin/python make_libtorch_schemas.py \
        libtorch-2.0.1-schemas.txt.gz

(torch 2.0.0 and 2.0.1 are the same operator set except bug fixes; 2.0.1 was
used because it is what PyPI resolves for the 2.0 line.)

Output format (gzip-compressed UTF-8 text, one record per line):

* lines starting with ``#`` are comments / metadata (torch version, git hash,
  counts, section markers);
* section ``# section: operators`` -- every ``str(schema)`` from
  ``torch._C._jit_get_all_schemas()``, sorted, deduplicated, e.g.
  ``aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor``;
  the operator name with overload is the text before the first ``(``
  (``aten::add.Tensor``; no overload -> ``aten::conv3d``);
* section ``# section: custom_class_methods`` -- every ``str(schema)`` from
  ``torch._C._jit_get_custom_class_schemas()`` (TorchBind class methods; their
  names carry no ``::`` namespace, the class is the type of the first
  argument), sorted, deduplicated; the section is empty if the function does
  not exist in that torch build.

Not included: node kinds that the TorchScript interpreter handles itself and
that are not registered operators (prim::Constant, prim::If, prim::Loop,
prim::GetAttr, prim::ListConstruct, prim::TupleConstruct, prim::CallMethod,
...).  torch offers no documented API that enumerates them
(``torch._C._jit_get_operation`` answers "No such operator" for them), so
they are deliberately not listed.

The output is deterministic for a given torch build (no timestamps are
written into it), so its sha256 can be recorded.
"""
from __future__ import annotations

import gzip
import sys
import warnings


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        print("usage: make_libtorch_schemas.py OUTPUT.txt.gz", file=sys.stderr)
        return 2
    out_path = argv[1]

    warnings.filterwarnings("ignore")  # e.g. "numpy not available" at import
    import torch

    ops = sorted({str(s) for s in torch._C._jit_get_all_schemas()})
    get_custom = getattr(torch._C, "_jit_get_custom_class_schemas", None)
    custom = sorted({str(s) for s in get_custom()}) if get_custom is not None else []

    op_names = {line.split("(", 1)[0] for line in ops}
    lines = [
        "# TorchScript operator schemas of one torch/libtorch build",
        f"# torch.__version__ = {torch.__version__}",
        f"# torch.version.git_version = {torch.version.git_version}",
        "# generator = make_libtorch_schemas.py (see PROVENANCE.md)",
        f"# operators = {len(ops)} (distinct name.overload: {len(op_names)})",
        f"# custom_class_methods = {len(custom)}"
        + ("" if get_custom is not None else " (_jit_get_custom_class_schemas absent)"),
        "# section: operators",
        *ops,
        "# section: custom_class_methods",
        *custom,
    ]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    # mtime=0 and no file name in the gzip header -> byte-identical reruns
    with open(out_path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(data)
    print(
        f"torch {torch.__version__} ({torch.version.git_version}): "
        f"{len(ops)} operator schemas, {len(op_names)} distinct names, "
        f"{len(custom)} custom class method schemas -> {out_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
