"""Training: Dice loss, the BatchRenorm schedule, validation, checkpoints and exact resume."""

from .examples import commented_yaml, example_config, example_yaml
from .finetune import finetune_model
from .loss import dice_loss
from .trainer import StepLog, Trainer, TrainResult, train

__all__ = [
    "StepLog",
    "TrainResult",
    "Trainer",
    "commented_yaml",
    "dice_loss",
    "example_config",
    "example_yaml",
    "finetune_model",
    "train",
]
