"""One conversion of metadata to plain JSON values (for reports, rdf ``config`` entries and YAML)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import PurePath
from typing import Any

import numpy as np
from pydantic import BaseModel

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as JSON types: pydantic models dumped, numpy arrays and scalars as lists and numbers, paths as
    strings, mappings with string keys, sequences as lists; anything else as its ``str``."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return jsonable(value.value)
    for base in (bool, int, float, str):  # subclasses, e.g. torch's TorchVersion
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return [jsonable(v) for v in value]
    return str(value)
