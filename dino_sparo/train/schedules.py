"""Per-iteration schedules (learning rate, weight decay, teacher momentum) as in DINO."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration (``epochs * niter_per_ep``): a linear warm-up from ``start_warmup_value`` to
    ``base_value`` over ``warmup_epochs``, then a cosine from ``base_value`` down (or up) to ``final_value``."""
    total = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


@dataclass
class Schedules:
    """Per-iteration values over the whole run, as DINO's ``cosine_scheduler`` arrays; ``backbone_lr``: that of the
    backbone unfrozen by ``--unfreeze_at`` (None without)."""
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    backbone_lr: np.ndarray | None = None

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Sets ``iteration``'s learning rate on every group (times its ``lr_mult``; the unfrozen backbone's groups,
        marked ``backbone``, follow ``backbone_lr``) and its weight decay on the ``regularized`` groups only
        (biases and norms are never decayed), as the reference does."""
        for group in optimizer.param_groups:
            schedule = self.backbone_lr if group.get("backbone") else self.lr
            group["lr"] = float(schedule[iteration]) * group.get("lr_mult", 1.0)
            if group.get("regularized", False):
                group["weight_decay"] = float(self.weight_decay[iteration])


def peak_learning_rate(config: TrainConfig, world_size: int) -> float:
    """``--lr`` is given for 256 images: the peak learning rate scales linearly with the effective batch (with
    gradient accumulation, the images of one optimizer step)."""
    return config.lr * config.images_per_step(world_size) / 256.0


def build_schedules(config: TrainConfig, niter_per_epoch: int, world_size: int) -> Schedules:
    """The learning rate (:func:`peak_learning_rate`) warms up linearly and decays by a cosine to min_lr; weight
    decay rises by a cosine; the teacher momentum rises to 1; one value per optimizer step (``niter_per_epoch`` of
    them per epoch)."""
    peak = peak_learning_rate(config, world_size)
    lr = cosine_scheduler(peak, config.min_lr, config.epochs, niter_per_epoch, warmup_epochs=config.warmup_epochs)
    return Schedules(
        lr=lr,
        weight_decay=cosine_scheduler(config.weight_decay, config.weight_decay_end, config.epochs, niter_per_epoch),
        momentum=cosine_scheduler(config.momentum_teacher, 1.0, config.epochs, niter_per_epoch),
        backbone_lr=None if config.unfreeze_at is None else _backbone_schedule(config, lr / peak, niter_per_epoch,
                                                                              world_size),
    )


def _backbone_schedule(config: TrainConfig, shape: np.ndarray, niter_per_epoch: int, world_size: int) -> np.ndarray:
    """The unfrozen backbone's learning rate: 0 until ``--unfreeze_at``, then a linear ramp over
    ``--unfreeze_warmup`` optimizer steps to ``--backbone_lr`` (scaled by the batch as ``--lr``), multiplied
    throughout by the main schedule's ``shape`` (its value over its peak), so that it decays with the rest."""
    peak = config.backbone_lr * config.images_per_step(world_size) / 256.0
    since = np.arange(len(shape)) - config.unfreeze_at * niter_per_epoch
    ramp = np.clip((since + 1) / max(1, config.unfreeze_warmup), 0.0, 1.0) * (since >= 0)
    return peak * ramp * shape
