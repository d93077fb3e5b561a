"""One DINO optimisation step, free of host synchronisation so the GPU is never left waiting on Python."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from ..loss import DINOLoss, training_signals
from ..optim import cancel_gradients_last_layer, clip_gradients, update_teacher
from .config import TrainConfig

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainStep:
    """Forward under autocast (teacher on the 2 global crops, student on all), loss, backward (scaled for fp16),
    per-parameter clipping, the last-layer freeze, the optimizer step and the teacher EMA.

    Built by :func:`~.build.build_training`, which owns its parts: ``student`` is what runs the forward
    (DistributedDataParallel when distributed), ``student_module`` the module inside it, whose trainable parameters
    the teacher averages. With ``--freeze_blocks`` (a retrofit), the frozen embeddings and blocks run once per crop
    group without a graph and both networks start from their output: they are identical in student and teacher,
    so only the trainable part is computed twice.
    """

    def __init__(self, *, config: TrainConfig, student: nn.Module, student_module: nn.Module, teacher: nn.Module,
                 dino_loss: DINOLoss, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 device: torch.device) -> None:
        self.config = config
        self.clip_grad, self.freeze_last_layer = config.clip_grad, config.freeze_last_layer
        self.frozen_blocks = config.freeze_blocks
        self.student, self.student_module, self.teacher = student, student_module, teacher
        self.dino_loss, self.optimizer, self.scaler = dino_loss, optimizer, scaler
        self.precision, self.device = config.precision, device
        dtype = AUTOCAST_DTYPES.get(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.pair_for_ema()

    def pair_for_ema(self) -> None:
        """Pairs each trainable student parameter with its teacher twin, which the EMA moves (again after a
        freeze ends)."""
        student_named = dict(self.student_module.named_parameters())
        teacher_named = dict(self.teacher.named_parameters())
        assert student_named.keys() == teacher_named.keys()
        trainable = [name for name, param in student_named.items() if param.requires_grad]
        self.ema_pairs = ([student_named[k] for k in trainable], [teacher_named[k] for k in trainable])

    def __call__(self, micro_batches: Sequence[list[torch.Tensor]], epoch: int,
                 momentum: float) -> dict[str, torch.Tensor]:
        """One optimizer step over ``micro_batches`` (``--accum_steps`` of them, each a list of crops); returns the
        loss and the health signals as device tensors (read them at logging intervals only).

        The gradients of the micro-batches add up to those of one batch of all their images: each micro-batch's
        loss is divided by their number, the DDP all-reduce runs on the last one only (``no_sync`` before), the
        teacher's center moves once from all of them, and clipping, the last-layer freeze, the optimizer and the
        teacher's EMA run once. Each phase runs in a ``torch.profiler.record_function`` scope
        (``dino_sparo:forward``, ``:loss``, ``:backward``, ``:clip``, ``:optimizer``, ``:ema``), which costs
        nothing unless a profiler is recording."""
        count = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        signals: dict[str, torch.Tensor] = {}
        teacher_sums = []
        for index, crops in enumerate(micro_batches):
            # DDP averages gradients over ranks when the backward of the last micro-batch ends
            distributed = isinstance(self.student, DistributedDataParallel)
            sync = self.student.no_sync if distributed and index < count - 1 else nullcontext
            with sync():
                with self.autocast():
                    with record_function("dino_sparo:forward"):
                        shared = {}
                        if self.frozen_blocks is not None:
                            shared = {"frozen_tokens": self.student_module.frozen_tokens(crops, self.frozen_blocks),
                                      "frozen_blocks": self.frozen_blocks}
                        with torch.no_grad():
                            teacher_output = self.teacher(crops[:2], **shared)
                        student_output = self.student(crops, **shared)
                    with record_function("dino_sparo:loss"):
                        for name, value in training_signals(self.dino_loss, student_output, teacher_output,
                                                            epoch).items():
                            signals[name] = signals.get(name, 0) + value / count
                        micro_loss = self.dino_loss(student_output, teacher_output, epoch, update_center=False)
                        micro_loss = micro_loss / count
                        teacher_sums.append(self.dino_loss.teacher_sum(teacher_output))
                with record_function("dino_sparo:backward"):
                    (micro_loss if self.scaler is None else self.scaler.scale(micro_loss)).backward()
            loss = loss + micro_loss.detach()
        with record_function("dino_sparo:loss"):
            self.dino_loss.update_center_from_sum(sum(part[0] for part in teacher_sums),
                                                  sum(part[1] for part in teacher_sums))
        with record_function("dino_sparo:clip"):
            if self.clip_grad:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                clip_gradients(self.student_module, self.clip_grad)
            cancel_gradients_last_layer(epoch, self.student_module, self.freeze_last_layer)
        with record_function("dino_sparo:optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        with record_function("dino_sparo:ema"):
            update_teacher(*self.ema_pairs, momentum)
        return {"loss": loss, **signals}
