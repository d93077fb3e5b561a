"""DINO pretraining with a choice of read-out (SPARO by default), top-down: set up, resume or initialise, run the
epochs (checkpointing each), and optionally score the teacher with k-NN at the end."""
from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoint import TrainState, load_student_weights
from ..data.demo import DEMO_CLASS_LABEL
from ..distributed import DistributedContext, barrier, init_distributed, peer_failure
from ..errors import Preempted
from ..loss import DINOLoss
from ..models.config import architecture_args
from ..optim import build_optimizer, get_params_groups
from .health import warn_if_collapsed
from .loop import train_one_epoch
from .metrics import TrainingLog
from .preemption import PreemptionGuard
from .schedules import build_schedules, peak_learning_rate
from .setup import (
    build_models,
    build_training_data,
    frozen_blocks,
    jsonable_args,
    prepare_output_dir,
    resolve_args,
    resolve_precision,
    seed_everything,
    validate_args,
    wrap_for_distributed,
)
from .slot_monitor import SlotMonitor
from .step import TrainStep


@dataclass
class TrainResult:
    student: nn.Module
    teacher: nn.Module
    dino_loss: DINOLoss
    start_epoch: int
    epoch_stats: list[dict[str, Any]] = field(default_factory=list)
    knn: dict[str, float] | None = None


def train_dino(args: argparse.Namespace) -> TrainResult:
    """Trains from ``args`` (as main_dino.py parses them); resumes from ``output_dir/checkpoint.pth``."""
    validate_args(args)
    ctx = init_distributed(args.device, args.dist_url, args.local_rank, args.dist_timeout)
    say = _printer(ctx.is_main)
    args = resolve_args(args, ctx.is_main, say)
    precision = resolve_precision(args.precision, args.use_fp16, ctx.device)
    prepare_output_dir(args.output_dir, ctx.is_main, say)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    sampler, loader, views = build_training_data(args, ctx, say)

    student_module, teacher = build_models(args, ctx.device)
    initial_backbone = copy.deepcopy(teacher.backbone.state_dict()) if args.knn_data_path else None
    student, student_module, teacher = wrap_for_distributed(student_module, teacher, args, ctx)
    trainable = sum(p.numel() for p in student_module.parameters() if p.requires_grad)
    frozen = f", {frozen_blocks(args)} blocks frozen (retrofit)" if args.freeze_blocks is not None else ""
    say(f"student: {sum(p.numel() for p in student_module.parameters()) / 1e6:.2f} M parameters, "
        f"{trainable / 1e6:.2f} M trainable{frozen} "
        f"({args.arch}/{args.patch_size}, depth {args.depth}, read-out {args.readout}, feature dim "
        f"{student_module.backbone.feature_dim}); precision {precision}; device {ctx.device}; "
        f"{ctx.world_size} process(es)")
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(ctx.device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student_module, args), ctx.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    niter = len(loader)
    global_batch = args.batch_size_per_gpu * ctx.world_size
    schedules = build_schedules(args, niter, ctx.world_size)

    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    state = TrainState(student_module, teacher, optimizer, dino_loss, scaler, jsonable_args(args), ctx.world_size)
    log = TrainingLog(args.output_dir, ctx.is_main)
    start_epoch, start_iteration, start_samples_done = _resume_or_initialise(args, state, checkpoint_path,
                                                                             len(sampler.dataset), niter, ctx, log,
                                                                             say)
    step = TrainStep(args, student, student_module, teacher, dino_loss, optimizer, scaler, precision, ctx.device,
                     frozen_blocks(args))
    result = TrainResult(student_module, teacher, dino_loss, start_epoch)
    run_facts: dict[str, Any] = {"precision": precision, "device": str(ctx.device), "world_size": ctx.world_size,
                                 "augment_device": "pil" if views.augmentation is None else str(views.augment_device)}
    if start_epoch or start_samples_done:
        run_facts.update(resumed_from_epoch=start_epoch, resumed_from_iteration=start_iteration)

    monitor = (SlotMonitor(args.data_path, args.global_crop_size, ctx.device, viz_freq=args.viz_freq)
               if ctx.is_main and student_module.backbone.readout_module.has_attention_maps else None)
    collapse_warned = False
    try:
        with PreemptionGuard(args.log_freq) as guard:
            for epoch in range(start_epoch, args.epochs):
                first_iteration = start_iteration if epoch == start_epoch else 0
                sampler.set_epoch(epoch)
                sampler.samples_done = start_samples_done if epoch == start_epoch else 0
                outcome = train_one_epoch(step, loader, views, epoch, niter, schedules, ctx, log, say, args, guard,
                                          first_iteration)
                if outcome.stopped_at is not None:
                    samples_done = sampler.samples_done + (outcome.stopped_at - first_iteration) * global_batch
                    if ctx.is_main:
                        state.save(checkpoint_path, epoch, outcome.stopped_at, samples_done)
                    barrier()  # no rank exits (which makes torchrun stop the others) before the checkpoint is saved
                    raise Preempted(guard.signum, epoch, outcome.stopped_at, checkpoint_path)
                stats = {**outcome.stats, **run_facts}
                if monitor is not None:
                    stats.update(monitor(teacher.backbone, epoch, log))
                result.epoch_stats.append(stats)
                if ctx.is_main:
                    # checkpoint.pth last: it commits the epoch, so a kill before it leaves no epoch half recorded
                    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                        state.save(os.path.join(args.output_dir, f"checkpoint{epoch:04d}.pth"), epoch + 1,
                                   log_record=stats)
                    state.save(checkpoint_path, epoch + 1, log_record=stats)
                # after the checkpoint, as the reference: a rerun never logs an epoch twice (and one killed before
                # this line logs it from the checkpoint's copy of the record)
                log.epoch(stats)
                collapse_warned = collapse_warned or warn_if_collapsed(stats, args, ctx.is_main)
                if epoch + 1 < args.epochs and guard.agreed_stop():
                    barrier()
                    raise Preempted(guard.signum, epoch + 1, 0, checkpoint_path)
    except RuntimeError as error:
        lost = peer_failure(error, args.dist_timeout)
        if lost is None:
            raise
        raise lost from None
    finally:
        log.close()
    if args.knn_data_path:
        result.knn = final_knn(args, teacher.backbone, initial_backbone, ctx, say)
    return result


def _resume_or_initialise(args: argparse.Namespace, state: TrainState, checkpoint_path: str, num_samples: int,
                          niter: int, ctx: DistributedContext, log: TrainingLog,
                          say: Callable[[str], None]) -> tuple[int, int, int]:
    """``(epoch, iteration, samples_done)`` to start from: those of ``checkpoint_path`` when it exists (the run
    resumes), else (0, 0, 0) with the weights of ``--init_from`` when given.

    A preempted epoch resumes after the ``samples_done`` samples of its order that all processes together had
    consumed, whatever the number of processes now (see ``ResumableDistributedSampler``). Its remaining samples
    make the last iterations of the epoch at this run's global batch, so the schedules continue at the iteration
    that covers the same share of the epoch.
    """
    resumed = state.resume(checkpoint_path, architecture_args(args))
    if resumed is None:
        if args.init_from:
            load_student_weights(state.student, args.init_from, args.init_from_key, verbose=ctx.is_main)
            state.teacher.load_state_dict(state.student.state_dict())
        return 0, 0, 0
    if resumed.log_record is not None and log.recover(resumed.log_record):
        say(f"log.txt had no line for epoch {resumed.log_record['epoch']} (the run was stopped between its "
            f"checkpoint and its log line): written from the checkpoint")
    if state.fp16_scaler is not None and not resumed.scaler_restored:
        say(f"{checkpoint_path} was saved without fp16 training: starting a fresh GradScaler")
    global_batch = args.batch_size_per_gpu * ctx.world_size
    epoch, iteration, samples_done = resumed.epoch, 0, 0
    if resumed.iteration:
        # checkpoints without samples_done predate resuming on another number of processes: same world size
        samples_done = resumed.samples_done if resumed.samples_done is not None else resumed.iteration * global_batch
        left = max(0, num_samples - samples_done) // global_batch
        iteration = niter - left
        if left == 0:  # nothing left of it at this global batch (or the data set shrank): the epoch counts as done
            epoch, iteration, samples_done = epoch + 1, 0, 0
    if resumed.world_size is not None and resumed.world_size != ctx.world_size:
        before = resumed.world_size
        say(f"resuming a run of {before} process(es) on {ctx.world_size}: the global batch is now {global_batch} "
            f"images (was {args.batch_size_per_gpu * before}), so the peak learning rate (--lr {args.lr:g} x global "
            f"batch / 256) is now {peak_learning_rate(args, ctx.world_size):.4g} (was "
            f"{peak_learning_rate(args, before):.4g}), and an epoch has {niter} iterations (had "
            f"{num_samples // (args.batch_size_per_gpu * before)})")
    where = (f", iteration {iteration} of {niter} (a preempted epoch), after {samples_done} of its {num_samples} "
             f"images" if samples_done else "")
    say(f"resumed from {checkpoint_path} at epoch {epoch}{where} (epochs done: {epoch} of {args.epochs})"
        + (f"; --init_from {args.init_from} is ignored when resuming" if args.init_from else ""))
    return epoch, iteration, samples_done


def _printer(enabled: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if enabled:
            print(message, flush=True)
    return say


def final_knn(args: argparse.Namespace, backbone: nn.Module, initial_state: dict[str, torch.Tensor] | None,
              ctx: DistributedContext, say: Callable[[str], None]) -> dict[str, float]:
    """k-NN top-1 (percent) on ``knn_data_path/val`` of the trained teacher backbone and of the same model at
    its random initialisation, printed side by side; computed by ``eval_knn.py``'s code, sharded over ranks."""
    from ..eval.knn_eval import knn_on_folders

    crop = args.knn_crop_size or args.global_crop_size
    resize = args.knn_resize_size or round(crop * 256 / 224)
    models = {"trained": backbone}
    if initial_state is not None:
        initial = copy.deepcopy(backbone)
        initial.load_state_dict(initial_state)
        models = {"random_init": initial, "trained": backbone}
    scores = {}
    for name, model in models.items():
        knn = knn_on_folders(model, args.knn_data_path, resize, crop, [args.knn_k], args.knn_temperature,
                             batch_size=256, num_workers=min(args.num_workers, 2), context=ctx)
        scores[name] = knn[args.knn_k][0]
    label = f"{DEMO_CLASS_LABEL} classes" if args.demo else "class folders"
    line = f"k-NN top-1 on {os.path.join(args.knn_data_path, 'val')} ({label}, k={args.knn_k}): "
    if "random_init" in scores:
        line += f"random init {scores['random_init']:.1f}%  ->  trained teacher {scores['trained']:.1f}%"
    else:
        line += f"trained teacher {scores['trained']:.1f}%"
    say(line)
    return scores
