"""YAML 1.2 as bioimageio.spec reads and writes it (ruyaml).

PyYAML implements YAML 1.1, where ``1e-05`` (as bioimageio.spec dumps floats) is a *string*; reading an
rdf with it would silently turn such numbers into text. Every rdf is therefore read and written here.
"""

from __future__ import annotations

import io
from typing import Any

from ruyaml import YAML

__all__ = ["dump_yaml", "load_yaml"]


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    yaml.allow_unicode = True
    yaml.width = 4096
    return yaml


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML 1.2 text."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return _yaml().load(text)


def dump_yaml(data: Any) -> str:
    """Serialize to YAML 1.2 text, keeping the key order."""
    stream = io.StringIO()
    _yaml().dump(data, stream)
    return stream.getvalue()
