"""One training epoch: schedules applied per iteration, the step, progress lines and TensorBoard scalars at
logging intervals (the only points where the host waits on the device), and stopping at an iteration all ranks
agree on when a preemption signal arrives."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..distributed import DistributedContext, is_dist_initialized
from .data import TrainingData
from .health import NonFiniteWatch, out_of_memory_error
from .metrics import MetricLogger, TrainingLog, max_memory_mb
from .preemption import PreemptionGuard
from .schedules import Schedules
from .step import TrainStep

logger = logging.getLogger(__name__)
T = TypeVar("T")


def optimizer_steps(loader: Iterable[T], accum_steps: int) -> Iterator[list[T]]:
    """The loader's batches in groups of ``accum_steps``, one group per optimizer step; the last fewer than
    ``accum_steps`` batches of an epoch are left out, as ``drop_last`` leaves out an incomplete batch."""
    group: list[T] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []


@dataclass
class EpochOutcome:
    """What an epoch did: its ``stats`` (log.txt's record), and ``stopped_at``, the next iteration to run, when a
    preemption signal ended it early (None: the epoch is complete)."""
    stats: dict[str, Any]
    stopped_at: int | None = None


def train_one_epoch(step: TrainStep, data: TrainingData, epoch: int, niter: int, schedules: Schedules,
                    ctx: DistributedContext, log: TrainingLog, guard: PreemptionGuard | None = None,
                    first_iteration: int = 0) -> EpochOutcome:
    """Trains from ``first_iteration`` to the end of the epoch, or, when a preemption signal arrived, to an
    iteration all ranks agree on."""
    config = step.config
    metrics = MetricLogger(f"Epoch: [{epoch}/{config.epochs}]", niter)
    nonfinite = NonFiniteWatch(niter, ctx.device)
    skipped = 0
    epoch_start = interval_start = last_ready = time.time()
    data_time = data_wait = 0.0
    images_per_step = config.images_per_step(ctx.world_size)
    stopped_at = None
    steps_run = 0
    for index, batches in enumerate(optimizer_steps(data.loader, config.accum_steps), start=first_iteration):
        steps_run += 1
        waited = time.time() - last_ready
        data_time += waited
        data_wait += waited
        iteration = epoch * niter + index
        schedules.apply(step.optimizer, iteration)
        skipped += sum(int(skipped_here.sum()) for _, _, skipped_here in batches)
        # The step's own draws (stochastic depth) from (seed, iteration, rank): a run resumed in the middle of an
        # epoch then takes the very steps of an uninterrupted one.
        torch.manual_seed(((config.seed * 7_919 + iteration) * 104_729 + ctx.rank) % 2**63)  # not the views' seed
        micro_batches = [data.views(crops, iteration * config.accum_steps + micro)
                         for micro, (crops, _, _) in enumerate(batches)]
        try:
            values = step(micro_batches, epoch, float(schedules.momentum[iteration]))
        except torch.OutOfMemoryError:
            raise out_of_memory_error(config, ctx.device, epoch, index) from None
        nonfinite.update(values["loss"], index)
        scheduled = {"lr": schedules.lr[iteration], "wd": schedules.weight_decay[iteration],
                     "teacher_momentum": schedules.momentum[iteration],
                     "teacher_temp": step.dino_loss.teacher_temperature(epoch)}
        if schedules.backbone_lr is not None:
            scheduled["backbone_lr"] = schedules.backbone_lr[iteration]
        metrics.update(**values, **scheduled)
        last_ready = time.time()
        if (index + 1) % config.log_freq == 0 or index == niter - 1:
            nonfinite.raise_if_any(epoch)
            latest = metrics.flush()
            elapsed = time.time() - interval_start
            steps = (index % config.log_freq) + 1
            images_per_s = images_per_step * steps / max(elapsed, 1e-9)
            logger.info(metrics.progress_line(index, images_per_s, data_time / steps, elapsed / steps,
                                              max_memory_mb(ctx.device)))
            log.scalars({**latest, "images_per_s": images_per_s}, iteration)
            interval_start, data_time = time.time(), 0.0
        if guard is not None and index < niter - 1 and guard.agreed_stop(index):
            nonfinite.raise_if_any(epoch)  # never save a state that has gone non-finite
            stopped_at = index + 1
            logger.info(f"preemption signal received: stopping at epoch {epoch}, iteration {stopped_at} of {niter}")
            break
    averages = metrics.averages(ctx.device)
    if is_dist_initialized():
        total = torch.tensor(skipped, device=ctx.device)
        torch.distributed.all_reduce(total)
        skipped = int(total.item())
    epoch_time = time.time() - epoch_start
    stats = {f"train_{name}": value for name, value in averages.items()}
    stats.update(epoch=epoch, images_per_s=images_per_step * steps_run / epoch_time, epoch_time_s=round(epoch_time, 2),
                 data_wait_share=round(data_wait / max(epoch_time, 1e-9), 4), skipped_images=skipped)
    peak_memory = max_memory_mb(ctx.device)
    if peak_memory is not None:
        stats["max_memory_mb"] = round(peak_memory, 1)
    if stopped_at is not None:
        return EpochOutcome(stats, stopped_at)
    logger.info(f"Epoch {epoch} done in {epoch_time:.1f}s: loss {stats['train_loss']:.4f}, teacher entropy "
        f"{stats['train_teacher_entropy']:.3f} nats, student/teacher agreement {stats['train_agreement']:.3f}"
        + (f", skipped {skipped} unreadable images" if skipped else ""))
    return EpochOutcome(stats)
