"""Shared pieces of the configuration models: :class:`StrictModel` (strict, YAML round-trip) and helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, ConfigDict

from ..atomic import publish, remove_stale, temp_sibling

__all__ = ["StrictModel", "atomic_write_text"]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_halo(v: int | list[int] | None) -> int | list[int] | None:
    """A halo override: one non-negative int, or one per spatial axis (2 or 3)."""
    values = [v] if isinstance(v, int) else (v or [])
    if any(h < 0 for h in values):
        raise ValueError(f"halo must be >= 0, got {v}")
    if isinstance(v, list) and len(v) not in (2, 3):
        raise ValueError(f"halo needs one value or one per spatial axis (2 or 3), got {len(v)}")
    return v


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated, YAML round-trips."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialize to YAML (``model_dump(mode="json")``); also write it atomically when ``path`` is given."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike[str]) -> Self:
        """Load from a YAML file (or YAML text) and validate."""
        p = Path(path_or_text) if not (isinstance(path_or_text, str) and "\n" in path_or_text) else None
        if p is not None:
            if not p.exists():
                raise FileNotFoundError(f"config file {p} does not exist")
            text = p.read_text(encoding="utf-8")
        else:
            text = str(path_or_text)
        data = yaml.safe_load(text)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)
