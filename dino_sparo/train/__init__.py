"""DINO pretraining, top-down in :mod:`.trainer`: the flags (:mod:`.flags`) resolved into one config
(:mod:`.config`), the training data (:mod:`.data`), the factory of the run's parts (:mod:`.build`), the epoch loop
(:mod:`.loop`), the optimisation step (:mod:`.step`), schedules, health checks, the slot monitor, metrics and
preemption."""
from __future__ import annotations

from .trainer import TrainResult, train_dino

__all__ = ["TrainResult", "train_dino"]
