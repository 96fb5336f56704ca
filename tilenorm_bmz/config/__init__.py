"""Pydantic configuration models: the single source of truth for every run.

Every model is strict (``extra="forbid"``, assignments validated) and round-trips through YAML:
``Model.from_yaml(path)`` reads what ``model.to_yaml(path)`` wrote, and
``Model.model_validate(m.model_dump(mode="json")) == m`` holds for every config (tested).
Validators encode the rules of the network (sizes divisible by the pooling factors, ...) and their
messages say what to change.

Submodules (everything public is re-exported here; import from :mod:`tilenorm_bmz.config`):

* :mod:`~tilenorm_bmz.config._base`: :class:`StrictModel`, :func:`atomic_write_text`, shared validators.
* :mod:`~tilenorm_bmz.config.model`: :class:`NormConfig`, :class:`UNetConfig`, :class:`RenormSchedule`,
  the norm kinds (``NormKind``, ``NORM_KINDS``).
* :mod:`~tilenorm_bmz.config.data`: :class:`InputNormalization`, :class:`TargetConfig`, :class:`SplitConfig`,
  :class:`SyntheticConfig`, :class:`DataConfig`.
* :mod:`~tilenorm_bmz.config.train`: :class:`TrainConfig`.
* :mod:`~tilenorm_bmz.config.export`: :class:`PersonConfig`, :class:`MaintainerConfig`,
  :class:`CitationConfig`, :class:`ExportConfig`, the weight formats.
* :mod:`~tilenorm_bmz.config.gate`: :class:`GateConfig`, the gate checks and consumers.
"""

from __future__ import annotations

from ._base import StrictModel, atomic_write_text
from .data import (
    SAMPLE_NAMES,
    DataConfig,
    InputNormalization,
    NormalizationMode,
    SampleName,
    SplitConfig,
    SyntheticConfig,
    TargetConfig,
)
from .export import WEIGHT_FORMATS, CitationConfig, ExportConfig, MaintainerConfig, PersonConfig, WeightFormat
from .gate import GATE_CHECKS, GATE_CONSUMERS, GateCheck, GateConfig, GateConsumer
from .model import NORM_KINDS, NormConfig, NormKind, PoolFactor, RenormSchedule, UNetConfig
from .train import TrainConfig

__all__ = [
    "GATE_CHECKS",
    "GATE_CONSUMERS",
    "NORM_KINDS",
    "SAMPLE_NAMES",
    "WEIGHT_FORMATS",
    "CitationConfig",
    "DataConfig",
    "ExportConfig",
    "GateCheck",
    "GateConfig",
    "GateConsumer",
    "InputNormalization",
    "MaintainerConfig",
    "NormConfig",
    "NormKind",
    "NormalizationMode",
    "PersonConfig",
    "PoolFactor",
    "RenormSchedule",
    "SampleName",
    "SplitConfig",
    "StrictModel",
    "SyntheticConfig",
    "TargetConfig",
    "TrainConfig",
    "UNetConfig",
    "WeightFormat",
    "atomic_write_text",
]
