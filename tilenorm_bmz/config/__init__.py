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
    NORMALIZATION_CHOICES,
    SAMPLE_NAMES,
    DataConfig,
    InputNormalization,
    NormalizationChoice,
    NormalizationMode,
    SampleName,
    SplitConfig,
    SyntheticConfig,
    TargetConfig,
)
from .export import (
    INPUT_NORM_KINDS,
    WEIGHT_FORMATS,
    CitationConfig,
    ExportConfig,
    InputNormKind,
    MaintainerConfig,
    PersonConfig,
    WeightFormat,
)
from .gate import (
    GATE_CHECKS,
    GATE_CONSUMERS,
    REPORT_FORMATS,
    GateCheck,
    GateConfig,
    GateConsumer,
    ReportFormat,
)
from .model import NORM_KINDS, NormConfig, NormKind, PoolFactor, RenormSchedule, UNetConfig
from .train import EXAMPLE_KINDS, STUDY_RUN_SETS, ExampleKind, StudyRunSet, TrainConfig

__all__ = [
    "EXAMPLE_KINDS",
    "STUDY_RUN_SETS",
    "GATE_CHECKS",
    "GATE_CONSUMERS",
    "INPUT_NORM_KINDS",
    "NORMALIZATION_CHOICES",
    "NORM_KINDS",
    "REPORT_FORMATS",
    "SAMPLE_NAMES",
    "WEIGHT_FORMATS",
    "CitationConfig",
    "DataConfig",
    "ExampleKind",
    "ExportConfig",
    "GateCheck",
    "GateConfig",
    "GateConsumer",
    "InputNormKind",
    "InputNormalization",
    "MaintainerConfig",
    "NormConfig",
    "NormKind",
    "NormalizationChoice",
    "NormalizationMode",
    "PersonConfig",
    "PoolFactor",
    "ReportFormat",
    "RenormSchedule",
    "SampleName",
    "SplitConfig",
    "StrictModel",
    "SyntheticConfig",
    "TargetConfig",
    "StudyRunSet",
    "TrainConfig",
    "UNetConfig",
    "WeightFormat",
    "atomic_write_text",
]
