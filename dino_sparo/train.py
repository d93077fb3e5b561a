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

from .checkpoint import load_student_weights, restart_from_checkpoint, save_atomic
from .data.demo import DEMO_CLASS_LABEL
from .distributed import DistributedContext, any_rank, barrier, init_distributed
from .errors import Preempted
from .health import warn_if_collapsed
from .logging import TrainingLog
from .loss import DINOLoss
from .models.config import architecture_args
from .optim import build_optimizer, get_params_groups
from .preemption import PreemptionGuard
from .slot_monitor import SlotMonitor
from .train_loop import train_one_epoch
from .train_setup import (
    build_models,
    build_schedules,
    build_training_data,
    frozen_blocks,
    jsonable_args,
    prepare_output_dir,
    resolve_data_paths,
    resolve_precision,
    seed_everything,
    validate_args,
    wrap_for_distributed,
)
from .train_step import TrainStep


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
    ctx = init_distributed(args.device, args.dist_url, args.local_rank)
    say = _printer(ctx.is_main)
    resolve_data_paths(args, ctx, say)
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
    optimizer = build_optimizer(args.optimizer, get_params_groups(student_module, args.sparo_lr_mult,
                                                                  args.sparo_weight_decay), ctx.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    niter = len(loader)
    schedules = build_schedules(args, niter, ctx.world_size)

    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, start_iteration = _resume_or_initialise(args, checkpoint_path, niter, student_module, teacher,
                                                         optimizer, scaler, dino_loss, ctx, say)
    step = TrainStep(args, student, student_module, teacher, dino_loss, optimizer, scaler, precision, ctx.device,
                     frozen_blocks(args))
    result = TrainResult(student_module, teacher, dino_loss, start_epoch)

    def save(next_epoch: int, iteration: int = 0, path: str = checkpoint_path) -> None:
        """``epoch`` is the next epoch to run; a preempted epoch also records ``iteration``, where to resume it."""
        state = {"student": student_module.state_dict(), "teacher": teacher.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": next_epoch, "args": jsonable_args(args),
                 "dino_loss": dino_loss.state_dict(), "fp16_scaler": scaler.state_dict() if scaler else None}
        if iteration:
            state["iteration"] = iteration
        save_atomic(state, path)

    log = TrainingLog(args.output_dir, ctx.is_main)
    monitor = (SlotMonitor(args.data_path, args.global_crop_size, ctx.device, viz_freq=args.viz_freq)
               if ctx.is_main and args.readout == "sparo" else None)
    collapse_warned = False
    try:
        with PreemptionGuard() as guard:
            for epoch in range(start_epoch, args.epochs):
                first_iteration = start_iteration if epoch == start_epoch else 0
                sampler.set_epoch(epoch)
                sampler.skip = first_iteration * args.batch_size_per_gpu
                # Reseeded per epoch so that resuming reproduces the augmentations of an uninterrupted run.
                seed_everything(args.seed + 10007 * epoch + ctx.rank)
                stats = train_one_epoch(step, loader, views, epoch, niter, schedules, ctx, log, say, args, guard,
                                        first_iteration)
                if "stopped_at_iteration" in stats:
                    if ctx.is_main:
                        save(epoch, stats["stopped_at_iteration"])
                    barrier()  # no rank exits (which makes torchrun stop the others) before the checkpoint is saved
                    raise Preempted(guard.signum, epoch, stats["stopped_at_iteration"], checkpoint_path)
                if monitor is not None:
                    stats.update(monitor(teacher.backbone, epoch, log))
                result.epoch_stats.append(stats)
                if ctx.is_main:
                    save(epoch + 1)
                    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                        save(epoch + 1, path=os.path.join(args.output_dir, f"checkpoint{epoch:04d}.pth"))
                log.epoch(stats)  # after the checkpoint, as the reference: a rerun never logs an epoch twice
                collapse_warned = collapse_warned or warn_if_collapsed(stats, args, ctx.is_main)
                if epoch + 1 < args.epochs and any_rank(guard.requested):
                    barrier()
                    raise Preempted(guard.signum, epoch + 1, 0, checkpoint_path)
    finally:
        log.close()
    if args.knn_data_path:
        result.knn = final_knn(args, teacher.backbone, initial_backbone, ctx, say)
    return result


def _resume_or_initialise(args: argparse.Namespace, checkpoint_path: str, niter: int, student: nn.Module,
                          teacher: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                          dino_loss: DINOLoss, ctx: DistributedContext, say: Callable[[str], None]
                          ) -> tuple[int, int]:
    """``(epoch, iteration)`` to start from: those of ``checkpoint_path`` when it exists (the run resumes),
    else (0, 0) with the weights of ``--init_from`` when given."""
    resumed = restart_from_checkpoint(checkpoint_path, expected_args=architecture_args(args), optional=("fp16_scaler",),
                                      student=student, teacher=teacher, optimizer=optimizer, fp16_scaler=scaler,
                                      dino_loss=dino_loss)
    if resumed is None:
        if args.init_from:
            load_student_weights(student, args.init_from, args.init_from_key, verbose=ctx.is_main)
            teacher.load_state_dict(student.state_dict())
        return 0, 0
    if scaler is not None and resumed.get("fp16_scaler") is None:
        say(f"{checkpoint_path} was saved without fp16 training: starting a fresh GradScaler")
    epoch, iteration = int(resumed["epoch"]), int(resumed.get("iteration", 0))
    if iteration >= niter:  # the data set shrank since: the interrupted epoch counts as done
        epoch, iteration = epoch + 1, 0
    where = f", iteration {iteration} of {niter} (a preempted epoch)" if iteration else ""
    say(f"resumed from {checkpoint_path} at epoch {epoch}{where} (epochs done: {epoch} of {args.epochs})"
        + (f"; --init_from {args.init_from} is ignored when resuming" if args.init_from else ""))
    return epoch, iteration


def _printer(enabled: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if enabled:
            print(message, flush=True)
    return say


def final_knn(args: argparse.Namespace, backbone: nn.Module, initial_state: dict[str, torch.Tensor] | None,
              ctx: DistributedContext, say: Callable[[str], None]) -> dict[str, float]:
    """k-NN top-1 (percent) on ``knn_data_path/val`` of the trained teacher backbone and of the same model at
    its random initialisation, printed side by side; computed by ``eval_knn.py``'s code, sharded over ranks."""
    from .eval.knn_eval import knn_on_folders

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
