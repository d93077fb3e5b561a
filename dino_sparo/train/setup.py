"""Everything a DINO run sets up before its first step: checked and resolved flags, precision, seeds, data, the
student and teacher, and their distributed wrappers."""
from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..cli import ensure_writable_dir
from ..data.augment import DataAugmentationDINO, MultiCropUint8
from ..data.datasets import ImageDataset, ResumableDistributedSampler
from ..data.demo import DEMO_CLASS_LABEL, ensure_demo_dataset
from ..data.device_augment import DeviceAugmentation, StepViews
from ..distributed import DistributedContext, is_dist_initialized, resolve_device
from ..errors import UserError
from ..models import DINOHead, MultiCropWrapper
from ..models.backbone import replaced_blocks
from ..models.config import build_backbone, resolve_model_config
from ..models.readouts.sparo import KEY_INIT_GAIN
from ..utils.files import remove_stale_temporaries
from .preemption import ignore_preemption_signals

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AUGMENT_DEVICES = ("auto", "pil", "cpu", "cuda")
Say = Callable[[str], None]
# On frozen blocks a short retrofit ends about where its read-out's initialisation starts (k-NN before the first
# step and after 5 epochs agree within noise), so the initial attention decides: gain 4's peaked slots score below
# the CLS model on photos, gain 1's near-uniform ones match it (experiments/retrofit.py, held-out images).
RETROFIT_KEY_INIT_GAIN = 1.0


DINO_LOCAL_CROP_SIZE = 96


def with_model_config(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the model config resolved (what the arch leaves to defaults filled in) and the local
    crop size defaulted to DINO's 96 px rounded to the nearest multiple of the patch size."""
    resolved = argparse.Namespace(**{**vars(args), **resolve_model_config(args)})
    if resolved.local_crop_size is None:
        patch = resolved.patch_size
        resolved.local_crop_size = max(patch, round(DINO_LOCAL_CROP_SIZE / patch) * patch)
    return resolved


def validate_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work become one-line :class:`UserError`s before anything starts."""
    args = with_model_config(args)
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
    check(args.dist_timeout is None or args.dist_timeout > 0, f"--dist_timeout must be > 0, got {args.dist_timeout}")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        check(0 < low <= high <= 1, f"--{name} must satisfy 0 < min <= max <= 1, got {low} {high}")
    for name in ("global_crop_size", "local_crop_size"):
        check(getattr(args, name) % args.patch_size == 0,
              f"--{name} {getattr(args, name)} is not a multiple of --patch_size {args.patch_size}")
    if args.freeze_blocks not in (None, "all"):
        blocks = encoder_blocks(args)
        check(0 <= args.freeze_blocks <= blocks, f"--freeze_blocks {args.freeze_blocks} is out of range: this model "
              f"keeps {blocks} blocks before its read-out (0 to {blocks}, or all)")


def encoder_blocks(args: argparse.Namespace) -> int:
    """Transformer blocks before the read-out: ``--depth``, less those the read-out replaces."""
    return args.depth - replaced_blocks(args.readout, args.readout_replace_blocks)


def frozen_blocks(args: argparse.Namespace) -> int | None:
    """How many blocks ``--freeze_blocks`` freezes (``all``: every block before the read-out); None: no freezing."""
    return encoder_blocks(args) if args.freeze_blocks == "all" else args.freeze_blocks


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` as plain JSON types (tuples become lists), safe for ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(vars(args), default=str))


def resolve_precision(precision: str, use_fp16: bool | None, device: torch.device) -> str:
    """``fp32``, ``fp16`` or ``bf16`` from ``--precision`` (and the reference's ``--use_fp16``).

    ``auto`` takes bf16 only where it is native: CUDA GPUs that compute in bf16 (Ampere and later; V100 and T4
    only emulate it, so they get fp16 + GradScaler as in the reference) and CPUs with AVX512-BF16 or AMX
    (elsewhere emulated bf16 matmuls are several times slower than fp32).
    """
    if precision == "auto" and use_fp16 is not None:
        precision = "fp16" if use_fp16 else "fp32"
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            precision = "bf16" if native else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 (or --use_fp16 true) needs a CUDA GPU; on CPU use --precision bf16 or fp32")
    return precision


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_args(args: argparse.Namespace, is_main: bool, say: Say) -> argparse.Namespace:
    """A copy of ``args`` with what defaults leave open filled in: the model config (so the checkpoint's saved args
    name the architecture exactly), SPARO's key gain (:data:`RETROFIT_KEY_INIT_GAIN` in a retrofit) and, for the
    demo, the data folders (generated on first use). The folders are checked before any work."""
    resolved = with_model_config(args)
    if resolved.readout == "sparo" and resolved.sparo_key_init_gain is None:
        retrofit = resolved.freeze_blocks is not None
        resolved.sparo_key_init_gain = RETROFIT_KEY_INIT_GAIN if retrofit else KEY_INIT_GAIN
        if retrofit:
            say(f"retrofit (--freeze_blocks): --sparo_key_init_gain {RETROFIT_KEY_INIT_GAIN:g} (from scratch: "
                f"{KEY_INIT_GAIN:g}; pass the flag to choose)")
    if resolved.demo and not resolved.data_path:
        root = ensure_demo_dataset(resolved.demo_data_dir, num_train=resolved.demo_num_images,
                                   num_val=max(1, resolved.demo_num_images // 4), verbose=is_main)
        resolved.data_path = os.path.join(root, "train")
        resolved.knn_data_path = resolved.knn_data_path or root
        say(f"demo data: {root} (class folders = {DEMO_CLASS_LABEL}; all attributes in attributes.csv)")
    if not resolved.data_path:
        raise UserError("no data given: pass --data_path FOLDER (or --demo for the built-in demo data)")
    for split in ("train", "val") if resolved.knn_data_path else ():
        # checked now, not after hours of training
        if not os.path.isdir(os.path.join(resolved.knn_data_path, split)):
            raise UserError(f"--knn_data_path {resolved.knn_data_path} has no {split}/ folder")
    return resolved


def prepare_output_dir(output_dir: str, is_main: bool, say: Say) -> None:
    ensure_writable_dir(output_dir)
    if is_main:
        stale = remove_stale_temporaries(output_dir)
        if stale:
            say(f"removed {len(stale)} partial checkpoint file(s) left by an interrupted save: {', '.join(stale)}")


def build_training_data(args: argparse.Namespace, ctx: DistributedContext, say: Say
                        ) -> tuple[ResumableDistributedSampler, DataLoader, StepViews]:
    """The resumable distributed sampler, the multi-crop loader (drop_last, as the reference) and what turns a
    batch into the step's views on the training device.

    ``--augment_device pil`` runs the reference chain in the workers. Otherwise (the default) workers only
    decode, crop, resize and flip to uint8, and the colour, blur and solarisation ops run batched on
    ``--augment_device`` (auto: the training device).
    """
    crop_args = (tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.local_crops_number,
                 args.global_crop_size, args.local_crop_size)
    if args.augment_device == "pil":
        transform, augmentation, augment_device = DataAugmentationDINO(*crop_args), None, ctx.device
    else:
        transform = MultiCropUint8(*crop_args)
        augmentation = DeviceAugmentation(args.local_crops_number, args.global_crop_size)
        augment_device = (ctx.device if args.augment_device == "auto"
                          else resolve_device(args.augment_device, ctx.local_rank, "--augment_device"))
    views = StepViews(augmentation, augment_device, ctx.device, args.seed, ctx.rank)
    dataset = ImageDataset(args.data_path, transform, count_skipped=True)
    sampler = ResumableDistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=args.seed, seed_samples=True)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                        pin_memory=ctx.device.type == "cuda", drop_last=True,
                        worker_init_fn=ignore_preemption_signals)
    if len(loader) == 0:
        raise UserError(f"{len(dataset)} images are fewer than one batch of {args.batch_size_per_gpu} x "
                        f"{ctx.world_size} processes: lower --batch_size_per_gpu")
    layout = f"{len(dataset.classes)} class folders" if dataset.classes else "flat folder"
    say(f"data: {len(dataset)} images in {args.data_path} ({layout}); {len(loader)} iterations per epoch")
    if dataset.ignored_loose_files:
        say(f"note: {dataset.ignored_loose_files} images directly in {args.data_path} are ignored because it has "
            f"class sub-folders")
    return sampler, loader, views


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path, head with ``norm_last_layer``; with ``--freeze_blocks``, its embeddings and first blocks
    frozen) and a separate teacher (no drop path, head with the last-layer norm fixed) holding the student's
    weights; the teacher gets no gradients."""
    config = resolve_model_config(args)
    backbone = build_backbone(config, drop_path_rate=args.drop_path_rate)
    head_sizes = dict(use_bn=args.use_bn_in_head, hidden_dim=args.head_hidden_dim,
                      bottleneck_dim=args.head_bottleneck_dim)
    student = MultiCropWrapper(backbone, DINOHead(backbone.feature_dim, args.out_dim,
                                                  norm_last_layer=args.norm_last_layer, **head_sizes))
    teacher = MultiCropWrapper(build_backbone(config, drop_path_rate=0.0),
                               DINOHead(backbone.feature_dim, args.out_dim, norm_last_layer=True, **head_sizes))
    teacher.load_state_dict(student.state_dict())
    if frozen_blocks(args) is not None:
        student.backbone.freeze_blocks(frozen_blocks(args))
    if args.compile:
        student.backbone.compile_blocks()
        teacher.backbone.compile_blocks()
    student.to(device)
    teacher.to(device)
    teacher.requires_grad_(False)
    student_storage = {p.untyped_storage().data_ptr() for p in student.parameters()}
    # A teacher aliased to the student never lags behind it: the loss stays at ln(out_dim) (DINOv2 issue 407).
    assert not any(p.untyped_storage().data_ptr() in student_storage for p in teacher.parameters()), \
        "teacher shares storage with the student"
    return student, teacher


def wrap_for_distributed(student: nn.Module, teacher: nn.Module, args: argparse.Namespace, ctx: DistributedContext
                         ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(student as stepped, student module, teacher)``: with a process group, BatchNorm in the head becomes
    SyncBatchNorm on GPUs and the student is wrapped in DistributedDataParallel; the teacher never is (no
    gradients), as in the reference."""
    if args.use_bn_in_head and is_dist_initialized() and ctx.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if not is_dist_initialized():
        return student, student, teacher
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids), student, teacher
