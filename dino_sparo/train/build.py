"""The one factory of a training run's parts: student and teacher, their distributed wrappers, the DINO loss, the
optimizer, the fp16 GradScaler and the step that uses them all, from a :class:`~.config.TrainConfig`."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import DistributedContext, is_dist_initialized, wrap_in_ddp
from ..loss import DINOLoss
from ..models import DINOHead, MultiCropWrapper, build_backbone
from ..optim import build_optimizer, get_params_groups, unfrozen_param_groups
from .config import TrainConfig
from .step import TrainStep


def build_training(config: TrainConfig, ctx: DistributedContext | None = None) -> TrainStep:
    """The step of ``config``'s run and everything it owns, on ``ctx``'s device (default: a single process on
    ``config.device``)."""
    ctx = ctx or DistributedContext(device=torch.device(config.device))
    student, teacher = build_models(config, ctx.device)
    stepped = wrap_in_ddp(student, ctx)  # the teacher never is (it has no gradients), as in the reference
    dino_loss = DINOLoss(config.out_dim, config.ncrops, config.warmup_teacher_temp, config.teacher_temp,
                         config.warmup_teacher_temp_epochs, config.epochs).to(ctx.device)
    optimizer = build_optimizer(config.optimizer, get_params_groups(student, config.model.readout_options),
                                ctx.device)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    return TrainStep(config=config, student=stepped, student_module=student, teacher=teacher, dino_loss=dino_loss,
                     optimizer=optimizer, scaler=scaler, device=ctx.device)


def build_models(config: TrainConfig, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path, head with ``norm_last_layer``; with ``--freeze_blocks``, its embeddings and first blocks
    frozen) and a separate teacher (no drop path, head with the last-layer norm fixed) holding the student's
    weights; the teacher gets no gradients. With ``--use_bn_in_head`` in a process group on GPUs, BatchNorm is
    SyncBatchNorm in both."""
    backbone = build_backbone(config.model, drop_path_rate=config.drop_path_rate)
    head_sizes = dict(use_bn=config.use_bn_in_head, hidden_dim=config.head_hidden_dim,
                      bottleneck_dim=config.head_bottleneck_dim)
    student = MultiCropWrapper(backbone, DINOHead(backbone.feature_dim, config.out_dim,
                                                  norm_last_layer=config.norm_last_layer, **head_sizes))
    teacher = MultiCropWrapper(build_backbone(config.model, drop_path_rate=0.0),
                               DINOHead(backbone.feature_dim, config.out_dim, norm_last_layer=True, **head_sizes))
    teacher.load_state_dict(student.state_dict())
    if config.freeze_blocks is not None:
        student.backbone.freeze_blocks(config.freeze_blocks)
    if config.compile:
        student.backbone.compile_blocks()
        teacher.backbone.compile_blocks()
    if config.use_bn_in_head and is_dist_initialized() and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student.to(device)
    teacher.to(device)
    teacher.requires_grad_(False)
    student_storage = {p.untyped_storage().data_ptr() for p in student.parameters()}
    # A teacher aliased to the student never lags behind it: the loss stays at ln(out_dim) (DINOv2 issue 407).
    assert not any(p.untyped_storage().data_ptr() in student_storage for p in teacher.parameters()), \
        "teacher shares storage with the student"
    return student, teacher


def unfreeze_backbone(step: TrainStep, config: TrainConfig, ctx: DistributedContext) -> None:
    """Continued training's second stage (``--unfreeze_at``): what ``--freeze_blocks`` froze trains from now on.
    The optimizer gains their groups (following the backbone's schedule, with the layer-wise decay) and keeps the
    read-out's and head's state; the student is wrapped in DistributedDataParallel anew, which registers the
    parameters that need gradients when it is built; the teacher's EMA covers them too."""
    student = step.student_module
    frozen = {f"backbone.{name}" for name, param in student.backbone.named_parameters() if not param.requires_grad}
    student.backbone.unfreeze_blocks()
    for group in unfrozen_param_groups(student, frozen, config.layerwise_decay):
        step.optimizer.add_param_group(group)
    step.frozen_blocks = None
    step.student = wrap_in_ddp(student, ctx)
    step.pair_for_ema()
