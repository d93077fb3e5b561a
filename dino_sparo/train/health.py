"""Is training healthy? A non-finite loss stops the run (found on the device, read at logging intervals only);
a run that looks collapsed gets one clear warning with the usual remedies; running out of device memory is one
line naming what fills it."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..distributed import is_dist_initialized
from ..errors import NonFiniteLossError, UserError
from .config import TrainConfig

logger = logging.getLogger(__name__)


class NonFiniteWatch:
    """Remembers, on the device, the first iteration of an epoch whose loss was not finite."""

    def __init__(self, niter: int, device: torch.device) -> None:
        self.none = niter + 1
        self.first_bad = torch.full((), self.none, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, index: int) -> None:
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad & (self.first_bad == self.none), torch.full_like(self.first_bad, index),
                                     self.first_bad)

    def raise_if_any(self, epoch: int) -> None:
        """Raises :class:`NonFiniteLossError` when any rank saw a non-finite loss (a collective when distributed)."""
        first_bad = self.first_bad
        if is_dist_initialized():
            first_bad = first_bad.clone()
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        iteration = int(first_bad.item())
        if iteration != self.none:
            raise NonFiniteLossError(
                f"the loss became non-finite at epoch {epoch}, iteration {iteration}; training stopped and the last "
                f"checkpoint was kept as it was (try --precision bf16 or fp32, a lower --lr, or --clip_grad)")


def warn_if_collapsed(stats: Mapping[str, Any], config: TrainConfig) -> bool:
    """Warns once, clearly, when an epoch looks collapsed (the loss within 1% of ln(out_dim), i.e. a uniform
    teacher, or a one-hot teacher); returns whether it did."""
    uniform_loss = math.log(config.out_dim)
    loss = stats["train_loss"]
    reasons = []
    if abs(loss - uniform_loss) <= 0.01 * uniform_loss:
        reasons.append(f"the loss {loss:.4f} is within 1% of ln(out_dim) = {uniform_loss:.4f}, i.e. the teacher's "
                       f"output is (nearly) uniform")
    if stats["train_teacher_mode_share"] >= 0.95 and config.batch_size_per_gpu * 2 >= 16:
        reasons.append(f"{100 * stats['train_teacher_mode_share']:.0f}% of the teacher's outputs pick the same "
                       f"prototype (a one-hot teacher)")
    if not reasons:
        return False
    logger.warning(f"WARNING: training looks collapsed at epoch {stats['epoch']}: {'; '.join(reasons)}. Usual "
                   f"remedies: a lower --teacher_temp (now {config.teacher_temp}), a higher --momentum_teacher (now "
                   f"{config.momentum_teacher}), a smaller --out_dim (now {config.out_dim}), a lower --lr (now "
                   f"{config.lr}) or a longer --warmup_epochs.")
    return True


def out_of_memory_error(config: TrainConfig, device: torch.device, epoch: int, iteration: int) -> UserError:
    """The one-line error for an out-of-memory error in the step: what sets the memory a step needs (images per
    process, crops and their sizes, precision) and the flags that lower it."""
    local = (f"{config.local_crops_number} local crops of {config.local_crop_size} px"
             if config.local_crops_number else "no local crops")
    lower_precision = ", or --precision bf16 (fp16 on GPUs older than Ampere)" if config.precision == "fp32" else ""
    return UserError(f"out of memory in the training step at epoch {epoch}, iteration {iteration} on {device} "
                     f"(batch {config.batch_size_per_gpu} per process, 2 global crops of {config.global_crop_size} "
                     f"px and {local}, precision {config.precision}): lower --batch_size_per_gpu (the learning rate "
                     f"scales with it), --local_crops_number, --global_crop_size or --local_crop_size"
                     f"{lower_precision}")
