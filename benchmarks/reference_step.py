"""A DINO training step executed the way the reference code does by default, kept only as the benchmark baseline.

On a GPU facebookresearch/dino trains with fp16 autocast and a GradScaler (``--use_fp16 true``: the loss scaled,
gradients unscaled before the per-parameter clipping, the last layer's gradients dropped while it is frozen, then
``scaler.step`` and ``scaler.update``); on a CPU, where it cannot use fp16, in fp32. In both: explicit softmax
attention in every timm block (``fused_attn = False``), each read-out as first written (SPARO projecting every
token to every slot's keys), the loss as a double loop over crop pairs, per-parameter clipping with a host sync per
parameter, the single-tensor AdamW (``foreach=False``: PyTorch 1.7, the reference's, had no other; today's default on
a GPU is the multi-tensor one), a Python-loop teacher EMA and a ``loss.item()`` sync every step.
The models are the very same modules the fast path trains.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import Attention
from torch import nn

from dino_sparo.loss import DINOLoss
from dino_sparo.models import Readout

from .reference_readouts import reference_forward


def make_reference_style(model: nn.Module) -> None:
    """Switches every timm attention of ``model`` to explicit softmax attention and every read-out to its
    straightforward formulation (:func:`~.reference_readouts.reference_forward`: same parameters, same maths)."""
    for module in model.modules():
        if isinstance(module, (Attention, EvaAttention)):  # DINOv3's blocks are timm's Eva ones
            module.fused_attn = False
        if isinstance(module, Readout):
            module.forward = partial(reference_forward, module)


def reference_dino_loss(loss: DINOLoss, student_output: torch.Tensor, teacher_output: torch.Tensor,
                        epoch: int) -> torch.Tensor:
    """DINO's loss loop: chunk per crop, one cross-entropy per (teacher view, other student view) pair."""
    student_out = (student_output / loss.student_temp).chunk(loss.ncrops)
    temp = loss.teacher_temperature(epoch)
    teacher_out = F.softmax((teacher_output - loss.center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    loss.update_center(teacher_output)
    return total / terms


def reference_precision(device: torch.device) -> str:
    """What the reference trains in by default on ``device``: fp16 with a GradScaler on a GPU, fp32 on a CPU."""
    return "fp16" if device.type == "cuda" else "fp32"


class ReferenceStep:
    """One reference-style optimisation step over ``student`` (trained) and ``teacher`` (EMA), in ``precision``
    (``fp32``, or ``fp16``: autocast and a GradScaler on the crops' device, as the reference's ``--use_fp16``;
    on a CPU that runs under CPU autocast, for tests of the logic)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, dino_loss: DINOLoss, param_groups: list[dict],
                 clip_grad: float, freeze_last_layer: int, precision: str = "fp32",
                 device: torch.device | str = "cpu") -> None:
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"the reference trains in fp32 or fp16, not {precision!r}")
        make_reference_style(student)
        make_reference_style(teacher)
        self.student, self.teacher, self.dino_loss = student, teacher, dino_loss
        self.optimizer = torch.optim.AdamW(param_groups, foreach=False)
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        fp16, device_type = precision == "fp16", torch.device(device).type
        self.scaler = torch.amp.GradScaler(device_type) if fp16 else None
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.float16)) if fp16 else nullcontext

    def __call__(self, crops: list[torch.Tensor], epoch: int, momentum: float) -> float:
        with self.autocast():
            teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
            loss = reference_dino_loss(self.dino_loss, student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise RuntimeError("non-finite loss")
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad:
            for param in self.student.parameters():
                if param.grad is not None:
                    clip_coef = self.clip_grad / (param.grad.data.norm(2) + 1e-6)
                    if clip_coef < 1:
                        param.grad.data.mul_(clip_coef)
        if epoch < self.freeze_last_layer:
            for name, param in self.student.named_parameters():
                if "last_layer" in name:
                    param.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        return loss.item()
