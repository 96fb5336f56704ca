"""Fine-tune a converted network with the training loop (``tilenorm-bmz convert ... --finetune``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import TrainConfig

if TYPE_CHECKING:
    from ..conversion import ConvertedModel

__all__ = ["finetune_model"]

logger = logging.getLogger(__name__)


def finetune_model(
    converted: ConvertedModel,
    config: TrainConfig | str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    progress: bool = False,
) -> ConvertedModel:
    """Train ``converted.model`` with the loop and schedule of ``config`` (its ``model`` section is unused).

    The schedule starts at step 0 (plain BatchNorm training while the running statistics settle, then
    the ramp to r_max/d_max), which is what a converted InstanceNorm/GroupNorm network needs. The run
    folder (default: next to the config, ``finetune_<source stem>``) holds the usual checkpoints and
    curves. Returns a copy of ``converted`` with the trained model, step and validation scores.
    """
    from .trainer import Trainer

    base_dir: Path | None = None
    if not isinstance(config, TrainConfig):
        base_dir = Path(config).resolve().parent
        config = TrainConfig.from_yaml(config)
    if config.model is not None:
        logger.warning("fine-tuning: the config's model section is ignored; the converted network is trained")
        config = config.model_copy(update={"model": None})
    run = Path(out_dir) if out_dir is not None else (base_dir or Path.cwd()) / f"finetune_{converted.source.stem}"
    trainer = Trainer(config, run, model=converted.model, architecture=converted.architecture,
                      base_dir=base_dir, device=device, progress=progress,
                      extra={"converted_from": str(converted.source), "source_kind": converted.source_kind,
                             "conversion": converted.report.model_dump(mode="json")})
    result = trainer.fit()
    extra = dict(converted.extra)
    extra.update(trainer._checkpoint_extra())
    extra["finetune_run"] = str(result.out_dir)
    from dataclasses import replace

    return replace(converted, model=trainer.model.cpu().eval(), step=result.step, extra=extra)
