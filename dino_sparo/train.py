"""DINO pretraining with a choice of read-out (SPARO by default): arguments, set-up and the training loop."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dino_sparo.checkpoint import (load_checkpoint_file, load_pretrained_weights, load_weights,
                                   remove_stale_temporaries, restart_from_checkpoint, save_checkpoint,
                                   select_state_dict, strip_prefixes_keep_wrapper)
from dino_sparo.cli import UserError, add_model_args, bool_flag, build_model_from_config, ensure_writable_dir, \
    positive_int, resolve_model_config
from dino_sparo.data.augment import DataAugmentationDINO
from dino_sparo.data.datasets import DEMO_CLASS_LABEL, ImageDataset, ResumableDistributedSampler, ensure_demo_dataset
from dino_sparo.distributed import DistributedContext, any_rank, barrier, init_distributed, is_dist_initialized
from dino_sparo.logging import MetricLogger, TrainingLog, max_memory_mb
from dino_sparo.loss import DINOLoss, training_signals
from dino_sparo.models import DINOHead, MultiCropWrapper
from dino_sparo.preemption import Preempted, PreemptionGuard
from dino_sparo.optim import (build_optimizer, cancel_gradients_last_layer, clip_gradients, get_params_groups,
                              update_teacher)
from dino_sparo.schedules import cosine_scheduler

PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# The built-in demo: a small model and a recipe that learns visibly on the generated images within a few CPU
# minutes (about 300 steps). DINO's ImageNet defaults collapse or barely move on a few thousand tiny images
# (design.md §6): a sharper teacher (0.02) keeps it from drifting to uniform, and a fast teacher (momentum
# 0.97) lets the evaluated teacher follow a student that trains for so few steps.
DEMO_PRESET: dict[str, Any] = dict(
    arch="vit_tiny", patch_size=8, depth=3, sparo_slots=16, sparo_slot_dim=16, sparo_attn_dim=16,
    out_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128, momentum_teacher=0.97, teacher_temp=0.02,
    warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0, lr=0.004, min_lr=1e-5, warmup_epochs=1,
    weight_decay=0.04, weight_decay_end=0.1, epochs=10, batch_size_per_gpu=32, drop_path_rate=0.0,
    freeze_last_layer=1, global_crop_size=32, local_crop_size=16, local_crops_number=2,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), num_workers=2, saveckp_freq=0,
    output_dir=os.path.join("runs", "demo"), precision="fp32", log_freq=20,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and iteration."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DINO pretraining with a SPARO read-out", add_help=True,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser, from_checkpoint=False)
    group = parser.add_argument_group("DINO head and loss")
    group.add_argument("--out_dim", type=positive_int, default=65536, help="dimensionality of the DINO head output")
    group.add_argument("--norm_last_layer", type=bool_flag, default=True,
                       help="fix the norm of the head's last layer to 1 (false: more accurate but less stable)")
    group.add_argument("--momentum_teacher", type=float, default=0.996,
                       help="base EMA momentum of the teacher, cosine-scheduled to 1 (0.9995 for batch 256)")
    group.add_argument("--use_bn_in_head", type=bool_flag, default=False, help="BatchNorm in the head MLP")
    group.add_argument("--head_hidden_dim", type=positive_int, default=2048, help="width of the head's MLP")
    group.add_argument("--head_bottleneck_dim", type=positive_int, default=256,
                       help="size of the head's L2-normalised bottleneck")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    group.add_argument("--teacher_temp", type=float, default=0.04,
                       help="teacher temperature after warm-up (above 0.07 tends to be unstable)")
    group.add_argument("--warmup_teacher_temp_epochs", type=int, default=0, help="epochs of teacher temperature warm-up")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast on CUDA GPUs and on CPUs with AVX512-BF16 or AMX, else fp32; fp16 "
                       "uses a GradScaler (CUDA only)")
    group.add_argument("--use_fp16", type=bool_flag, default=None,
                       help="reference flag: true = --precision fp16, false = --precision fp32 (when --precision "
                       "is auto)")
    group.add_argument("--weight_decay", type=float, default=0.04, help="initial weight decay")
    group.add_argument("--weight_decay_end", type=float, default=0.4, help="final weight decay (cosine schedule)")
    group.add_argument("--clip_grad", type=float, default=3.0, help="per-parameter gradient norm clip; 0 disables")
    group.add_argument("--batch_size_per_gpu", type=positive_int, default=64, help="images per process and step")
    group.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    group.add_argument("--freeze_last_layer", type=int, default=1,
                       help="epochs during which the head's last layer is not updated")
    group.add_argument("--lr", type=float, default=0.0005,
                       help="peak learning rate for a global batch of 256 (scaled linearly with the batch)")
    group.add_argument("--warmup_epochs", type=int, default=10, help="epochs of linear learning-rate warm-up")
    group.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate (cosine schedule)")
    group.add_argument("--optimizer", choices=("adamw", "sgd", "lars"), default="adamw", help="optimizer")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student")

    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0),
                       help="area range of the global crops ((0.14, 1) when --local_crops_number 0)")
    group.add_argument("--local_crops_number", type=int, default=8, help="local crops per image; 0 disables")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4), help="area range of local crops")
    group.add_argument("--global_crop_size", type=positive_int, default=224, help="side of the global crops in px")
    group.add_argument("--local_crop_size", type=positive_int, default=96, help="side of the local crops in px")

    group = parser.add_argument_group("data, output and start")
    group.add_argument("--data_path", default=None,
                       help="image folder: class sub-folders (ImageFolder layout) or images directly in it")
    group.add_argument("--output_dir", default=".", help="checkpoints, log.txt and TensorBoard events; a "
                       "checkpoint.pth found here is resumed")
    group.add_argument("--saveckp_freq", type=int, default=20, help="also keep checkpointNNNN.pth every N epochs; 0: never")
    group.add_argument("--init_from", default=None,
                       help="start the student and teacher from these weights (this project's or an official DINO "
                       "checkpoint; backbone, and the head when it fits); ignored when output_dir has a checkpoint")
    group.add_argument("--init_from_key", default="teacher", help="which weights of --init_from to use")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--num_workers", type=int, default=10, help="data-loading processes per training process")
    group.add_argument("--log_freq", type=positive_int, default=10, help="iterations between progress lines")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dist_url", default="env://", help="process-group initialisation URL")
    group.add_argument("--local_rank", "--local-rank", type=int, default=0,
                       help="set by legacy launchers; torchrun's LOCAL_RANK variable takes precedence")

    group = parser.add_argument_group("end-of-training k-NN and the built-in demo")
    group.add_argument("--knn_data_path", default="",
                       help="folder with train/ and val/ class sub-folders: print the teacher's k-NN top-1 on val "
                       "(and that of the initial model) after training")
    group.add_argument("--knn_k", type=positive_int, default=20, help="neighbours of the final k-NN")
    group.add_argument("--knn_temperature", type=float, default=0.07, help="temperature of the k-NN vote")
    group.add_argument("--knn_resize_size", type=positive_int, default=None,
                       help="k-NN resize side (default: global_crop_size * 256 / 224)")
    group.add_argument("--knn_crop_size", type=positive_int, default=None,
                       help="k-NN centre-crop side (default: global_crop_size)")
    group.add_argument("--demo", action="store_true",
                       help="the built-in demo: generated shapes data set and a small tuned recipe; any flag given "
                       "explicitly overrides the preset")
    group.add_argument("--demo_data_dir", default=None,
                       help="where the demo data set is generated (default: $DINO_SPARO_CACHE/demo or "
                       "~/.cache/dino_sparo/demo)")
    group.add_argument("--demo_num_images", type=positive_int, default=2000,
                       help="training images of the demo set (plus a quarter as many for validation)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses flags; with ``--demo`` the demo preset replaces the defaults, explicit flags still win."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_PRESET)
        args = parser.parse_args(argv)
    return args


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` as plain JSON types (tuples become lists), safe for ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(vars(args), default=str))


def validate_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work become one-line :class:`UserError`s before anything starts."""
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    check(0 <= args.momentum_teacher <= 1, f"--momentum_teacher must be in [0, 1], got {args.momentum_teacher}")
    check(args.teacher_temp > 0 and args.warmup_teacher_temp > 0, "teacher temperatures must be > 0")
    check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    check(args.min_lr >= 0, f"--min_lr must be >= 0, got {args.min_lr}")
    check(args.clip_grad >= 0, f"--clip_grad must be >= 0, got {args.clip_grad}")
    check(args.warmup_epochs >= 0 and args.warmup_teacher_temp_epochs >= 0 and args.freeze_last_layer >= 0,
          "epoch counts (--warmup_epochs, --warmup_teacher_temp_epochs, --freeze_last_layer) must be >= 0")
    check(0 <= args.drop_path_rate < 1, f"--drop_path_rate must be in [0, 1), got {args.drop_path_rate}")
    check(args.local_crops_number >= 0, f"--local_crops_number must be >= 0, got {args.local_crops_number}")
    check(args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}")
    check(args.saveckp_freq >= 0, f"--saveckp_freq must be >= 0, got {args.saveckp_freq}")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        check(0 < low <= high <= 1, f"--{name} must satisfy 0 < min <= max <= 1, got {low} {high}")
    for name in ("global_crop_size", "local_crop_size"):
        check(getattr(args, name) % args.patch_size == 0,
              f"--{name} {getattr(args, name)} is not a multiple of --patch_size {args.patch_size}")


def resolve_precision(args: argparse.Namespace, device: torch.device) -> str:
    """``fp32``, ``fp16`` or ``bf16`` from ``--precision`` (and the reference's ``--use_fp16``)."""
    precision = args.precision
    if precision == "auto" and args.use_fp16 is not None:
        precision = "fp16" if args.use_fp16 else "fp32"
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        # Without AVX512-BF16 or AMX, CPU bf16 matmuls are emulated and several times slower than fp32.
        cpu_bf16 = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                             or torch.cpu._is_amx_tile_supported())
        precision = "bf16" if cuda_bf16 or cpu_bf16 else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 (or --use_fp16 true) needs a CUDA GPU; on CPU use --precision bf16 or fp32")
    return precision


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path, head with ``norm_last_layer``) and a separate teacher (no drop path, head with the
    last-layer norm fixed) holding the student's weights; the teacher gets no gradients."""
    config = resolve_model_config(args)
    backbone = build_model_from_config(config, drop_path_rate=args.drop_path_rate)
    head_sizes = dict(use_bn=args.use_bn_in_head, hidden_dim=args.head_hidden_dim,
                      bottleneck_dim=args.head_bottleneck_dim)
    student = MultiCropWrapper(backbone, DINOHead(backbone.feature_dim, args.out_dim,
                                                  norm_last_layer=args.norm_last_layer, **head_sizes))
    teacher = MultiCropWrapper(build_model_from_config(config, drop_path_rate=0.0),
                               DINOHead(backbone.feature_dim, args.out_dim, norm_last_layer=True, **head_sizes))
    teacher.load_state_dict(student.state_dict())
    student.to(device)
    teacher.to(device)
    for param in teacher.parameters():
        param.requires_grad = False
    student_storage = {p.untyped_storage().data_ptr() for p in student.parameters()}
    assert not any(p.untyped_storage().data_ptr() in student_storage for p in teacher.parameters()), \
        "teacher shares storage with the student"
    return student, teacher


def init_from_weights(student: MultiCropWrapper, path: str, key: str, verbose: bool) -> None:
    """Loads a backbone (and the DINO head when its shapes fit) into the student from ``path``."""
    load_pretrained_weights(student.backbone, path, checkpoint_key=key, verbose=verbose)
    state = select_state_dict(load_checkpoint_file(path), key, path)
    head = {k[len("head."):]: v for k, v in strip_prefixes_keep_wrapper(state).items() if k.startswith("head.")}
    if not head:
        return
    own = student.head.state_dict()
    if any(k in own and own[k].shape != v.shape for k, v in head.items()):
        if verbose:
            print(f"head of {path} not loaded: its shapes differ (another --out_dim or read-out size?)", flush=True)
        return
    report = load_weights(student.head, head, "head")
    if verbose:
        print(f"head from {path}: loaded {len(report.loaded)} tensors", flush=True)


@dataclass
class TrainResult:
    student: nn.Module
    teacher: nn.Module
    dino_loss: DINOLoss
    start_epoch: int
    epoch_stats: list[dict[str, Any]] = field(default_factory=list)
    knn: dict[str, float] | None = None


def train_dino(args: argparse.Namespace) -> TrainResult:
    """Trains from ``args`` (as built by :func:`parse_args`); resumes from ``output_dir/checkpoint.pth``."""
    validate_args(args)
    ctx = init_distributed(args.device, args.dist_url, args.local_rank)
    say = _printer(ctx.is_main)
    if args.demo and not args.data_path:
        root = ensure_demo_dataset(args.demo_data_dir, num_train=args.demo_num_images,
                                   num_val=max(1, args.demo_num_images // 4), verbose=ctx.is_main)
        args.data_path = os.path.join(root, "train")
        args.knn_data_path = args.knn_data_path or root
        say(f"demo data: {root} (class folders = {DEMO_CLASS_LABEL}; all attributes in attributes.csv)")
    if not args.data_path:
        raise UserError("no data given: pass --data_path FOLDER (or --demo for the built-in demo data)")
    for split in ("train", "val") if args.knn_data_path else ():
        # checked now, not after hours of training
        if not os.path.isdir(os.path.join(args.knn_data_path, split)):
            raise UserError(f"--knn_data_path {args.knn_data_path} has no {split}/ folder")
    precision = resolve_precision(args, ctx.device)
    ensure_writable_dir(args.output_dir)
    if ctx.is_main:
        stale = remove_stale_temporaries(args.output_dir)
        if stale:
            say(f"removed {len(stale)} partial checkpoint file(s) left by an interrupted save: {', '.join(stale)}")
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    seed_everything(args.seed)
    transform = DataAugmentationDINO(tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                                     args.local_crops_number, args.global_crop_size, args.local_crop_size)
    dataset = ImageDataset(args.data_path, transform, count_skipped=True)
    sampler = ResumableDistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=args.seed)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                        pin_memory=ctx.device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise UserError(f"{len(dataset)} images are fewer than one batch of {args.batch_size_per_gpu} x "
                        f"{ctx.world_size} processes: lower --batch_size_per_gpu")
    layout = f"{len(dataset.classes)} class folders" if dataset.classes else "flat folder"
    say(f"data: {len(dataset)} images in {args.data_path} ({layout}); {len(loader)} iterations per epoch")
    if dataset.ignored_loose_files:
        say(f"note: {dataset.ignored_loose_files} images directly in {args.data_path} are ignored because it has "
            f"class sub-folders")

    student, teacher = build_models(args, ctx.device)
    initial_backbone = copy.deepcopy(teacher.backbone.state_dict()) if args.knn_data_path and ctx.is_main else None
    if args.use_bn_in_head and is_dist_initialized() and ctx.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student_module = student
    if is_dist_initialized():
        student = DistributedDataParallel(student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    say(f"student: {sum(p.numel() for p in student_module.parameters()) / 1e6:.2f} M parameters "
        f"({args.arch}/{args.patch_size}, depth {args.depth}, read-out {args.readout}, feature dim "
        f"{student_module.backbone.feature_dim}); precision {precision}; device {ctx.device}; "
        f"{ctx.world_size} process(es)")

    ncrops = args.local_crops_number + 2
    dino_loss = DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(ctx.device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student_module), ctx.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    niter = len(loader)
    lr_schedule = cosine_scheduler(args.lr * args.batch_size_per_gpu * ctx.world_size / 256.0, args.min_lr,
                                   args.epochs, niter, warmup_epochs=args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum_schedule = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter)

    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    resumed = restart_from_checkpoint(checkpoint_path, expected_args=_architecture_args(args), student=student_module,
                                      teacher=teacher, optimizer=optimizer, fp16_scaler=scaler, dino_loss=dino_loss)
    start_epoch = start_iteration = 0
    if resumed is not None:
        start_epoch, start_iteration = int(resumed["epoch"]), int(resumed.get("iteration", 0))
        if start_iteration >= niter:  # the data set shrank since: the interrupted epoch counts as done
            start_epoch, start_iteration = start_epoch + 1, 0
        where = f", iteration {start_iteration} of {niter} (a preempted epoch)" if start_iteration else ""
        say(f"resumed from {checkpoint_path} at epoch {start_epoch}{where} (epochs done: {start_epoch} of "
            f"{args.epochs})" + (f"; --init_from {args.init_from} is ignored when resuming" if args.init_from else ""))
    elif args.init_from:
        init_from_weights(student_module, args.init_from, args.init_from_key, ctx.is_main)
        teacher.load_state_dict(student_module.state_dict())

    log = TrainingLog(args.output_dir, ctx.is_main)
    result = TrainResult(student_module, teacher, dino_loss, start_epoch)
    step = TrainStep(args, student, student_module, teacher, dino_loss, optimizer, scaler, precision, ctx.device)
    collapse_warned = False

    def training_state(next_epoch: int, iteration: int) -> dict[str, Any]:
        """``epoch`` is the next epoch to run; a preempted epoch also records ``iteration``, where to resume it."""
        state = {"student": student_module.state_dict(), "teacher": teacher.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": next_epoch, "args": jsonable_args(args),
                 "dino_loss": dino_loss.state_dict(), "fp16_scaler": scaler.state_dict() if scaler is not None else None}
        if iteration:
            state["iteration"] = iteration
        return state

    def stop_for_preemption(guard: PreemptionGuard, next_epoch: int, iteration: int) -> None:
        if ctx.is_main:
            save_checkpoint(training_state(next_epoch, iteration), checkpoint_path)
        barrier()  # no rank exits (which makes torchrun stop the others) before the checkpoint is on disk
        raise Preempted(guard.signum, next_epoch, iteration, checkpoint_path)

    try:
        with PreemptionGuard() as guard:
            for epoch in range(start_epoch, args.epochs):
                first_iteration = start_iteration if epoch == start_epoch else 0
                sampler.set_epoch(epoch)
                sampler.skip = first_iteration * args.batch_size_per_gpu
                # Reseeded per epoch so that resuming reproduces the augmentations of an uninterrupted run.
                seed_everything(args.seed + 10007 * epoch + ctx.rank)
                stats = _train_one_epoch(step, loader, epoch, niter, lr_schedule, wd_schedule, momentum_schedule, ctx,
                                         log, say, args, guard, first_iteration)
                if "stopped_at_iteration" in stats:
                    stop_for_preemption(guard, epoch, stats["stopped_at_iteration"])
                result.epoch_stats.append(stats)
                log.epoch(stats)
                if not collapse_warned:
                    collapse_warned = _warn_if_collapsed(stats, args, ctx.is_main)
                if ctx.is_main:
                    state = training_state(epoch + 1, 0)
                    save_checkpoint(state, checkpoint_path)
                    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                        save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04d}.pth"))
                if epoch + 1 < args.epochs and any_rank(guard.requested):
                    barrier()
                    raise Preempted(guard.signum, epoch + 1, 0, checkpoint_path)
    finally:
        log.close()
    if args.knn_data_path and ctx.is_main:
        result.knn = final_knn(args, teacher.backbone, initial_backbone, ctx.device, say)
    return result


def _architecture_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a checkpoint's weights depend on, as resuming compares them with the saved ones."""
    names = [*resolve_model_config(args), "out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head"]
    return {name: getattr(args, name) for name in names}


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(message, flush=True)
    return say


class TrainStep:
    """One optimisation step: forward under autocast, loss, backward, clipping, last-layer freeze, optimizer
    step and teacher EMA, without any host synchronisation."""

    def __init__(self, args, student, student_module, teacher, dino_loss, optimizer, scaler, precision, device):
        self.args = args
        self.student, self.student_module, self.teacher = student, student_module, teacher
        self.dino_loss, self.optimizer, self.scaler = dino_loss, optimizer, scaler
        self.device = device
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        student_named = dict(student_module.named_parameters())
        teacher_named = dict(teacher.named_parameters())
        assert student_named.keys() == teacher_named.keys()
        self.ema_pairs = ([student_named[k] for k in student_named], [teacher_named[k] for k in student_named])

    def __call__(self, crops: list[torch.Tensor], epoch: int, momentum: float) -> dict[str, torch.Tensor]:
        args = self.args
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
            signals = training_signals(self.dino_loss, student_output, teacher_output, epoch)
            loss = self.dino_loss(student_output, teacher_output, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                clip_gradients(self.student_module, args.clip_grad)
            cancel_gradients_last_layer(epoch, self.student_module, args.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if args.clip_grad:
                clip_gradients(self.student_module, args.clip_grad)
            cancel_gradients_last_layer(epoch, self.student_module, args.freeze_last_layer)
            self.optimizer.step()
        update_teacher(*self.ema_pairs, momentum)
        return {"loss": loss.detach(), **signals}


def _train_one_epoch(step: TrainStep, loader, epoch, niter, lr_schedule, wd_schedule, momentum_schedule,
                     ctx: DistributedContext, log: TrainingLog, say, args, guard: PreemptionGuard | None = None,
                     first_iteration: int = 0) -> dict[str, Any]:
    """Trains from ``first_iteration`` to the end of the epoch, or, when a preemption signal arrived, to an
    iteration all ranks agree on: then the stats carry ``stopped_at_iteration`` (the next one to run)."""
    metrics = MetricLogger(f"Epoch: [{epoch}/{args.epochs}]", niter)
    # Iteration of the first non-finite loss, kept on the device and read only at logging intervals.
    no_failure = niter + 1
    first_bad = torch.full((), no_failure, dtype=torch.long, device=ctx.device)
    skipped = 0
    epoch_start = interval_start = time.time()
    data_time = 0.0
    images_per_step = args.batch_size_per_gpu * ctx.world_size
    last_ready = time.time()
    stopped_at = None
    for index, (crops, _, skipped_here) in enumerate(loader, start=first_iteration):
        data_time += time.time() - last_ready
        iteration = epoch * niter + index
        for group_index, group in enumerate(step.optimizer.param_groups):
            group["lr"] = float(lr_schedule[iteration])
            if group_index == 0:  # only the regularised group is decayed
                group["weight_decay"] = float(wd_schedule[iteration])
        crops = [crop.to(ctx.device, non_blocking=True) for crop in crops]
        skipped += int(skipped_here.sum())
        values = step(crops, epoch, float(momentum_schedule[iteration]))
        bad = ~torch.isfinite(values["loss"])
        first_bad = torch.where(bad & (first_bad == no_failure), torch.full_like(first_bad, index), first_bad)
        metrics.update(**values, lr=lr_schedule[iteration], wd=wd_schedule[iteration],
                       teacher_momentum=momentum_schedule[iteration],
                       teacher_temp=step.dino_loss.teacher_temperature(epoch))
        last_ready = time.time()
        if (index + 1) % args.log_freq == 0 or index == niter - 1:
            _raise_if_nonfinite(first_bad, no_failure, epoch)
            latest = metrics.flush()
            elapsed = time.time() - interval_start
            steps = (index % args.log_freq) + 1
            images_per_s = images_per_step * steps / max(elapsed, 1e-9)
            say(metrics.progress_line(index, images_per_s, data_time / steps, elapsed / steps,
                                      max_memory_mb(ctx.device)))
            log.scalars({**latest, "images_per_s": images_per_s}, iteration)
            interval_start, data_time = time.time(), 0.0
        if guard is not None and index < niter - 1 and _preemption_agreed(guard, index, args.log_freq):
            _raise_if_nonfinite(first_bad, no_failure, epoch)  # never save a state that has gone non-finite
            stopped_at = index + 1
            say(f"preemption signal received: stopping at epoch {epoch}, iteration {stopped_at} of {niter}")
            break
    averages = metrics.averages(ctx.device)
    if is_dist_initialized():
        total = torch.tensor(skipped, device=ctx.device)
        torch.distributed.all_reduce(total)
        skipped = int(total.item())
    epoch_time = time.time() - epoch_start
    stats = {f"train_{name}": value for name, value in averages.items()}
    stats.update(epoch=epoch, images_per_s=images_per_step * niter / epoch_time, epoch_time_s=round(epoch_time, 2),
                 skipped_images=skipped)
    if stopped_at is not None:
        stats["stopped_at_iteration"] = stopped_at
        return stats
    say(f"Epoch {epoch} done in {epoch_time:.1f}s: loss {stats['train_loss']:.4f}, teacher entropy "
        f"{stats['train_teacher_entropy']:.3f} nats, student/teacher agreement {stats['train_agreement']:.3f}"
        + (f", skipped {skipped} unreadable images" if skipped else ""))
    return stats


def _preemption_agreed(guard: PreemptionGuard, index: int, log_freq: int) -> bool:
    """Whether to stop after iteration ``index``. One process checks its flag every iteration; several agree
    at logging intervals only, where the loop already synchronises, so steps stay free of host syncs."""
    if not is_dist_initialized():
        return guard.requested
    return (index + 1) % log_freq == 0 and any_rank(guard.requested)


def _raise_if_nonfinite(first_bad: torch.Tensor, no_failure: int, epoch: int) -> None:
    if is_dist_initialized():
        first_bad = first_bad.clone()
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    iteration = int(first_bad.item())
    if iteration != no_failure:
        raise NonFiniteLossError(
            f"the loss became non-finite at epoch {epoch}, iteration {iteration}; training stopped and the last "
            f"checkpoint was kept as it was (try --precision bf16 or fp32, a lower --lr, or --clip_grad)")


def _warn_if_collapsed(stats: dict[str, Any], args: argparse.Namespace, enabled: bool) -> bool:
    """Prints one clear warning when an epoch looks collapsed; returns whether it did."""
    uniform_loss = math.log(args.out_dim)
    loss = stats["train_loss"]
    reasons = []
    if abs(loss - uniform_loss) <= 0.01 * uniform_loss:
        reasons.append(f"the loss {loss:.4f} is within 1% of ln(out_dim) = {uniform_loss:.4f}, i.e. the teacher's "
                       f"output is (nearly) uniform")
    if stats["train_teacher_mode_share"] >= 0.95 and args.batch_size_per_gpu * 2 >= 16:
        reasons.append(f"{100 * stats['train_teacher_mode_share']:.0f}% of the teacher's outputs pick the same "
                       f"prototype (a one-hot teacher)")
    if not reasons:
        return False
    if enabled:
        print(f"WARNING: training looks collapsed at epoch {stats['epoch']}: {'; '.join(reasons)}. Usual remedies: "
              f"a lower --teacher_temp (now {args.teacher_temp}), a higher --momentum_teacher (now "
              f"{args.momentum_teacher}), a smaller --out_dim (now {args.out_dim}), a lower --lr (now {args.lr}) or "
              f"a longer --warmup_epochs.", file=sys.stderr, flush=True)
    return True


def _knn_features(model: nn.Module, args: argparse.Namespace, device: torch.device, root: str):
    from dino_sparo.eval.features import eval_transform, extract_features

    crop = args.knn_crop_size or args.global_crop_size
    resize = args.knn_resize_size or round(crop * 256 / 224)
    transform = eval_transform(resize, crop)
    sets = {}
    for split in ("train", "val"):
        dataset = ImageDataset(os.path.join(root, split), transform)
        if not dataset.classes:
            raise UserError(f"--knn_data_path needs class sub-folders in {os.path.join(root, split)}")
        sets[split] = dataset
    index = {name: i for i, name in enumerate(sets["train"].classes)}
    unknown = sorted(set(sets["val"].classes) - set(index))
    if unknown:
        raise UserError(f"validation classes {', '.join(unknown)} have no training images in {root}/train")
    remap = torch.tensor([index[name] for name in sets["val"].classes])
    features = {}
    for split, dataset in sets.items():
        loader = DataLoader(dataset, batch_size=256, num_workers=min(args.num_workers, 2))
        feats, labels = extract_features(model, loader, device)
        features[split] = (feats, remap[labels] if split == "val" else labels)
    return features, len(index)


def final_knn(args: argparse.Namespace, backbone: nn.Module, initial_state: dict[str, torch.Tensor] | None,
              device: torch.device, say) -> dict[str, float]:
    """k-NN top-1 (percent) on ``knn_data_path/val`` of the trained teacher backbone and of the same model at
    its random initialisation, printed side by side."""
    from dino_sparo.eval.knn import knn_classifier

    scores = {}
    models = {"trained": backbone}
    if initial_state is not None:
        initial = copy.deepcopy(backbone)
        initial.load_state_dict(initial_state)
        models = {"random_init": initial, "trained": backbone}
    for name, model in models.items():
        features, num_classes = _knn_features(model, args, device, args.knn_data_path)
        top1, _ = knn_classifier(*features["train"], *features["val"], k=args.knn_k, T=args.knn_temperature,
                                 num_classes=num_classes)
        scores[name] = top1
    label = f"{DEMO_CLASS_LABEL} classes" if args.demo else "class folders"
    line = f"k-NN top-1 on {os.path.join(args.knn_data_path, 'val')} ({label}, k={args.knn_k}): "
    if "random_init" in scores:
        line += f"random init {scores['random_init']:.1f}%  ->  trained teacher {scores['trained']:.1f}%"
    else:
        line += f"trained teacher {scores['trained']:.1f}%"
    say(line)
    return scores
