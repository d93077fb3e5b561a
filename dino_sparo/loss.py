"""DINO's self-distillation loss with a centred, sharpened teacher (Caron et al., ICCV 2021)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import is_dist_initialized


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                                 nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up over ``warmup_teacher_temp_epochs``, then constant."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    return np.concatenate((warmup, np.full(max(0, nepochs - warmup_teacher_temp_epochs), teacher_temp)))


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax on the 2 global views and the student's
    softmax on every view, over all (teacher view, student view) pairs except a view with itself.

    ``student_output`` is (ncrops * B, out_dim) in crop order, ``teacher_output`` is (2 * B, out_dim). The
    center (a buffer, so it is saved and restored) is an EMA of the teacher's batch mean over all ranks and is
    updated after the loss has used the previous value.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINOLoss needs the 2 global crops, got ncrops={ncrops}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    @property
    def num_pairs(self) -> int:
        """Number of (teacher view, student view) pairs the loss averages over: 2 * ncrops - 2."""
        return 2 * self.ncrops - 2

    def teacher_temperature(self, epoch: int) -> float:
        schedule = self.teacher_temp_schedule
        return float(schedule[min(epoch, len(schedule) - 1)])

    def teacher_probabilities(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """softmax((t - center) / teacher_temp) as (2, B, out_dim), in float32 and without gradient."""
        temp = self.teacher_temperature(epoch)
        probs = F.softmax((teacher_output.detach().float() - self.center) / temp, dim=-1)
        return probs.view(2, -1, self.out_dim)

    def student_log_probabilities(self, student_output: torch.Tensor) -> torch.Tensor:
        """log_softmax(s / student_temp) as (ncrops, B, out_dim), in float32."""
        return F.log_softmax(student_output.float() / self.student_temp, dim=-1).view(self.ncrops, -1, self.out_dim)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                update_center: bool = True) -> torch.Tensor:
        """The loss with the current center; then (``update_center``) the center's EMA step on this batch. With
        gradient accumulation the center moves once per optimizer step instead: pass ``update_center=False`` for
        each micro-batch and give :meth:`update_center_from_sum` their :meth:`teacher_sum`."""
        teacher = self.teacher_probabilities(teacher_output, epoch)
        student = self.student_log_probabilities(student_output)
        # Sum over all pairs with one reduction instead of DINO's double loop: teacher view i meets every
        # student view except student view i, i.e. (sum over all student views) minus its own view.
        other_views = student.sum(dim=0, keepdim=True) - student[:2]
        per_sample = -(teacher * other_views).sum(dim=-1)  # (2, B): summed over the student views of each pair
        loss = per_sample.mean(dim=1).sum() / self.num_pairs
        if update_center:
            self.update_center(teacher_output)
        return loss

    @staticmethod
    @torch.no_grad()
    def teacher_sum(teacher_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the rows of ``teacher_output`` as (1, out_dim) in float32, their count) of this rank."""
        batch_sum = teacher_output.detach().float().sum(dim=0, keepdim=True)
        # new_full fills on the device: no host-to-device copy, hence no synchronisation in the step.
        return batch_sum, batch_sum.new_full((), float(teacher_output.shape[0]))

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, averaged over ranks when a process group exists."""
        self.update_center_from_sum(*self.teacher_sum(teacher_output))

    @torch.no_grad()
    def update_center_from_sum(self, batch_sum: torch.Tensor, count: torch.Tensor) -> None:
        """The EMA step towards ``batch_sum / count`` summed over ranks (the teacher rows of a whole step)."""
        if is_dist_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def training_signals(loss_fn: DINOLoss, student_output: torch.Tensor, teacher_output: torch.Tensor,
                     epoch: int) -> dict[str, torch.Tensor]:
    """On-device health signals of a step (no host sync): teacher mean entropy (nats), student/teacher
    agreement (share of loss pairs whose argmaxes match) and the share of teacher outputs that pick the
    batch's most common prototype (near 1 = a one-hot collapse).

    Uses the center before :meth:`DINOLoss.forward` updates it, so call it first.
    """
    teacher = loss_fn.teacher_probabilities(teacher_output, epoch)
    entropy = -(teacher * teacher.clamp_min(1e-12).log()).sum(dim=-1).mean()
    teacher_choice = teacher.argmax(dim=-1)  # (2, B)
    student_choice = student_output.detach().view(loss_fn.ncrops, -1, loss_fn.out_dim).argmax(dim=-1)
    matches = teacher_choice[:, None] == student_choice[None]  # (2, ncrops, B)
    # Dense masks and scatter_add instead of boolean indexing and bincount: on CUDA those two read a size back
    # to the host, which would stall the step.
    pair_mask = 1.0 - torch.eye(2, loss_fn.ncrops, device=matches.device)
    agreement = (matches.float() * pair_mask[..., None]).sum() / (pair_mask.sum() * matches.shape[-1])
    choices = teacher_choice.flatten()
    ones = torch.ones(choices.shape, device=choices.device)
    counts = ones.new_zeros(loss_fn.out_dim).scatter_add_(0, choices, ones)
    mode_share = counts.max() / choices.numel()
    return {"teacher_entropy": entropy, "agreement": agreement, "teacher_mode_share": mode_share}
