"""DINO pretraining with a choice of read-out (SPARO by default), top-down: set up, resume or initialise, run the
epochs (checkpointing each), and optionally score the teacher with k-NN at the end."""
from __future__ import annotations

import copy
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_student_weights
from ..cli import ensure_writable_dir
from ..data.demo import DEMO_CLASS_LABEL, ensure_demo_dataset
from ..distributed import DistributedContext, barrier, init_distributed, peer_failure
from ..errors import Preempted, UserError
from ..logger import setup_logging
from ..loss import DINOLoss
from ..utils.files import remove_stale_temporaries
from .build import build_training, unfreeze_backbone
from .config import TrainConfig, saved_architecture
from .data import build_training_data
from .health import warn_if_collapsed
from .loop import train_one_epoch
from .metrics import TrainingLog
from .preemption import PreemptionGuard
from .schedules import build_schedules, peak_learning_rate
from .slot_monitor import SlotMonitor
from .state import TrainState

logger = logging.getLogger(__name__)
# The end-of-training k-NN: DINO's protocol (its eval_knn.py reports k = 20 as usually the best, T = 0.07).
FINAL_KNN_K, FINAL_KNN_TEMPERATURE = 20, 0.07


@dataclass
class TrainResult:
    student: nn.Module
    teacher: nn.Module
    dino_loss: DINOLoss
    start_epoch: int
    epoch_stats: list[dict[str, Any]] = field(default_factory=list)
    knn: dict[str, float] | None = None


def train_dino(config: TrainConfig) -> TrainResult:
    """Trains as ``config`` says; resumes from ``output_dir/checkpoint.pth`` when there is one."""
    ctx = init_distributed(config.device, config.dist_url, config.local_rank, config.dist_timeout)
    setup_logging(ctx.rank)
    for note in config.notes:
        logger.info(note)
    _prepare_output_dir(config.output_dir, ctx.is_main)
    if config.demo_data_dir:
        ensure_demo_dataset(config.demo_data_dir, num_train=config.demo_num_images,
                            num_val=max(1, config.demo_num_images // 4), verbose=ctx.is_main)
        logger.info(f"demo data: {config.demo_data_dir} (class folders = {DEMO_CLASS_LABEL}; all attributes in "
                    f"attributes.csv)")
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _seed_everything(config.seed)
    data = build_training_data(config, ctx)
    step = build_training(config, ctx)
    student, teacher = step.student_module, step.teacher
    initial_backbone = copy.deepcopy(teacher.backbone.state_dict()) if config.knn_data_path else None
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    frozen = f", {config.freeze_blocks} blocks frozen (retrofit)" if config.freeze_blocks is not None else ""
    model = config.model
    logger.info(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters, "
                f"{trainable / 1e6:.2f} M trainable{frozen} ({model.arch}/{model.patch_size}, depth {model.depth}, "
                f"read-out {model.readout}, feature dim {student.backbone.feature_dim}); precision "
                f"{config.precision}; device {ctx.device}; {ctx.world_size} process(es)")
    niter = len(data.loader) // config.accum_steps
    if niter == 0:
        raise UserError(f"an epoch has {len(data.loader)} batches per process, fewer than --accum_steps "
                        f"{config.accum_steps}: lower --accum_steps or --batch_size_per_gpu")
    schedules = build_schedules(config, niter, ctx.world_size)
    checkpoint_path = os.path.join(config.output_dir, "checkpoint.pth")
    state = TrainState(student, teacher, step.optimizer, step.dino_loss, step.scaler, config.to_dict(),
                       ctx.world_size)
    log = TrainingLog(config.output_dir, ctx.is_main)
    def unfreeze() -> None:
        unfreeze_backbone(step, config, ctx)
        state.unfrozen = True

    start_epoch, start_iteration, start_samples_done = _resume_or_initialise(config, state, checkpoint_path,
                                                                             data.num_images, niter, ctx, log,
                                                                             unfreeze)
    result = TrainResult(student, teacher, step.dino_loss, start_epoch)
    run_facts: dict[str, Any] = {"precision": config.precision, "device": str(ctx.device),
                                 "world_size": ctx.world_size,
                                 "augment_device": "pil" if data.views.augmentation is None
                                 else str(data.views.augment_device)}
    if start_epoch or start_samples_done:
        run_facts.update(resumed_from_epoch=start_epoch, resumed_from_iteration=start_iteration)
    monitor = (SlotMonitor(config.data_path, config.global_crop_size, ctx.device, viz_freq=config.viz_freq)
               if ctx.is_main and student.backbone.readout_module.has_attention_maps else None)
    global_batch = config.images_per_step(ctx.world_size)
    collapse_warned = False
    try:
        with PreemptionGuard(config.log_freq) as guard:
            for epoch in range(start_epoch, config.epochs):
                if config.unfreeze_at is not None and epoch >= config.unfreeze_at and not state.unfrozen:
                    unfreeze()
                    logger.info(f"epoch {epoch}: the backbone is unfrozen (--unfreeze_at {config.unfreeze_at}): its "
                                f"{config.freeze_blocks} blocks, embeddings and tokens train from now on, their "
                                f"learning rate rising to --backbone_lr {config.backbone_lr:g} x batch / 256 over "
                                f"{config.unfreeze_warmup} steps")
                first_iteration = start_iteration if epoch == start_epoch else 0
                data.sampler.set_epoch(epoch)
                data.sampler.samples_done = start_samples_done if epoch == start_epoch else 0
                outcome = train_one_epoch(step, data, epoch, niter, schedules, ctx, log, guard, first_iteration)
                if outcome.stopped_at is not None:
                    samples_done = data.sampler.samples_done + (outcome.stopped_at - first_iteration) * global_batch
                    if ctx.is_main:
                        state.save(checkpoint_path, epoch, outcome.stopped_at, samples_done)
                    barrier()  # no rank exits (which makes torchrun stop the others) before the checkpoint is saved
                    raise Preempted(guard.signum, epoch, outcome.stopped_at, checkpoint_path)
                stats = {**outcome.stats, **run_facts}
                if config.freeze_blocks is not None:  # continued training's stage: 1 frozen, 2 unfrozen
                    stats["stage"] = 2 if state.unfrozen else 1
                if monitor is not None:
                    stats.update(monitor(teacher.backbone, epoch, log))
                result.epoch_stats.append(stats)
                if ctx.is_main:
                    # checkpoint.pth last: it commits the epoch, so a kill before it leaves no epoch half recorded
                    if config.saveckp_freq and epoch % config.saveckp_freq == 0:
                        state.save(os.path.join(config.output_dir, f"checkpoint{epoch:04d}.pth"), epoch + 1,
                                   log_record=stats)
                    state.save(checkpoint_path, epoch + 1, log_record=stats)
                # after the checkpoint, as the reference: a rerun never logs an epoch twice (and one killed before
                # this line logs it from the checkpoint's copy of the record)
                log.epoch(stats)
                collapse_warned = collapse_warned or warn_if_collapsed(stats, config)
                if epoch + 1 < config.epochs and guard.agreed_stop():
                    barrier()
                    raise Preempted(guard.signum, epoch + 1, 0, checkpoint_path)
    except RuntimeError as error:
        lost = peer_failure(error, config.dist_timeout)
        if lost is None:
            raise
        raise lost from None
    finally:
        log.close()
    if config.knn_data_path:
        result.knn = final_knn(config, teacher.backbone, initial_backbone, ctx)
    return result


def _prepare_output_dir(output_dir: str, is_main: bool) -> None:
    ensure_writable_dir(output_dir)
    if is_main:
        stale = remove_stale_temporaries(output_dir)
        if stale:
            logger.info(f"removed {len(stale)} partial checkpoint file(s) left by an interrupted save: "
                        f"{', '.join(stale)}")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _resume_or_initialise(config: TrainConfig, state: TrainState, checkpoint_path: str, num_samples: int,
                          niter: int, ctx: DistributedContext, log: TrainingLog,
                          unfreeze: Callable[[], None] | None = None) -> tuple[int, int, int]:
    """``(epoch, iteration, samples_done)`` to start from: those of ``checkpoint_path`` when it exists (the run
    resumes), else (0, 0, 0) with the weights of ``--init_from`` when given.

    A preempted epoch resumes after the ``samples_done`` samples of its order that all processes together had
    consumed, whatever the number of processes now (see ``ResumableDistributedSampler``). Its remaining samples
    make the last iterations of the epoch at this run's global batch, so the schedules continue at the iteration
    that covers the same share of the epoch. A checkpoint written after ``--unfreeze_at`` has unfrozen the backbone
    is restored into an unfrozen one (``unfreeze``).
    """
    resumed = state.resume(checkpoint_path, config.architecture(), saved_view=saved_architecture,
                           unfreeze=unfreeze if config.unfreeze_at is not None else None)
    if resumed is None:
        if config.init_from:
            load_student_weights(state.student, config.init_from, config.init_from_key, verbose=ctx.is_main)
            state.teacher.load_state_dict(state.student.state_dict())
        return 0, 0, 0
    if resumed.log_record is not None and log.recover(resumed.log_record):
        logger.info(f"log.txt had no line for epoch {resumed.log_record['epoch']} (the run was stopped between its "
                    f"checkpoint and its log line): written from the checkpoint")
    if state.fp16_scaler is not None and not resumed.scaler_restored:
        logger.info(f"{checkpoint_path} was saved without fp16 training: starting a fresh GradScaler")
    epoch, iteration, samples_done = resumed.epoch, 0, resumed.samples_done
    if samples_done:
        left = max(0, num_samples - samples_done) // config.images_per_step(ctx.world_size)
        iteration = niter - left
        if left == 0:  # nothing left of it at this global batch (or the data set shrank): the epoch counts as done
            epoch, iteration, samples_done = epoch + 1, 0, 0
    if resumed.world_size != ctx.world_size:
        before = resumed.world_size
        logger.info(f"resuming a run of {before} process(es) on {ctx.world_size}: the global batch is now "
                    f"{config.images_per_step(ctx.world_size)} images (was {config.images_per_step(before)}), so the "
                    f"peak learning rate (--lr {config.lr:g} x global batch / 256) is now "
                    f"{peak_learning_rate(config, ctx.world_size):.4g} (was {peak_learning_rate(config, before):.4g}),"
                    f" and an epoch has {niter} iterations (had {num_samples // config.images_per_step(before)})")
    where = (f", iteration {iteration} of {niter} (a preempted epoch), after {samples_done} of its {num_samples} "
             f"images" if samples_done else "")
    logger.info(f"resumed from {checkpoint_path} at epoch {epoch}{where} (epochs done: {epoch} of {config.epochs})"
                + (f"; --init_from {config.init_from} is ignored when resuming" if config.init_from else ""))
    return epoch, iteration, samples_done


def final_knn(config: TrainConfig, backbone: nn.Module, initial_state: dict[str, torch.Tensor] | None,
              ctx: DistributedContext) -> dict[str, float]:
    """k-NN top-1 (percent) on ``knn_data_path/val`` of the trained teacher backbone and of the same model at
    its random initialisation, printed side by side; computed by ``eval_knn.py``'s code, sharded over ranks."""
    from ..eval.knn_eval import knn_on_folders

    models = {"trained": backbone}
    if initial_state is not None:
        initial = copy.deepcopy(backbone)
        initial.load_state_dict(initial_state)
        models = {"random_init": initial, "trained": backbone}
    scores = {}
    for name, model in models.items():
        knn = knn_on_folders(model, config.knn_data_path, *config.knn_view, [FINAL_KNN_K], FINAL_KNN_TEMPERATURE,
                             batch_size=256, num_workers=min(config.num_workers, 2), context=ctx)
        scores[name] = knn[FINAL_KNN_K][0]
    label = f"{DEMO_CLASS_LABEL} classes" if config.knn_data_path == config.demo_data_dir else "class folders"
    line = f"k-NN top-1 on {os.path.join(config.knn_data_path, 'val')} ({label}, k={FINAL_KNN_K}): "
    if "random_init" in scores:
        line += f"random init {scores['random_init']:.1f}%  ->  trained teacher {scores['trained']:.1f}%"
    else:
        line += f"trained teacher {scores['trained']:.1f}%"
    logger.info(line)
    return scores
