"""Training: the loop, learning-rate schedules and checkpoints."""

from saftune.train.checkpoint import CheckpointError
from saftune.train.trainer import NonFiniteLossError, TrainConfig, TrainResult, fit

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainConfig", "TrainResult", "fit"]
