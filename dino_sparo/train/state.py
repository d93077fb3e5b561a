"""What main_dino.py checkpoints and resumes (:class:`TrainState`), written and read through
:mod:`dino_sparo.checkpoint`, the one reader and writer."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import restart_from_checkpoint, save_atomic
from ..errors import UserError


@dataclass
class ResumePoint:
    """Where a resumed run starts: ``epoch`` (the next one to run) and, inside a preempted epoch, ``iteration``
    and ``samples_done`` (of the epoch's sample order, by all processes together; 0 after a whole epoch);
    ``world_size``: the number of processes that wrote the checkpoint. ``log_record``: the ``log.txt`` record of
    the epoch the checkpoint ends (None for a preempted epoch), so that a run killed between its checkpoint and its
    log line can still log that epoch."""
    epoch: int
    iteration: int
    samples_done: int
    world_size: int
    scaler_restored: bool
    log_record: dict[str, Any] | None = None


@dataclass
class TrainState:
    """What main_dino.py checkpoints and resumes, defined once: ``checkpoint.pth`` holds ``student``, ``teacher``,
    ``optimizer``, ``dino_loss`` (its center) and ``fp16_scaler`` state dicts, ``args`` (a plain dict), ``epoch``
    (the next epoch to run), ``world_size`` (the processes that wrote it) and, for a preempted epoch,
    ``iteration`` and ``samples_done`` (where to resume it, see :class:`ResumePoint`), else ``log_record`` (the
    finished epoch's ``log.txt`` line): the reference's entries and these, loadable with
    ``torch.load(weights_only=True)``."""
    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    dino_loss: nn.Module
    fp16_scaler: Any | None  # a torch.amp.GradScaler for fp16 training
    args: dict[str, Any]
    world_size: int = 1
    unfrozen: bool = False  # continued training's second stage has begun (the optimizer holds its groups)

    def save(self, path: str | os.PathLike, epoch: int, iteration: int = 0, samples_done: int = 0,
             log_record: Mapping[str, Any] | None = None) -> None:
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": epoch, "args": self.args,
                 "dino_loss": self.dino_loss.state_dict(), "world_size": self.world_size,
                 "fp16_scaler": self.fp16_scaler.state_dict() if self.fp16_scaler is not None else None}
        if iteration:
            state.update(iteration=iteration, samples_done=samples_done)
        if self.unfrozen:
            state["unfrozen"] = True
        if log_record is not None:
            state["log_record"] = json.loads(json.dumps(dict(log_record)))  # plain types: weights_only loads it
        save_atomic(state, path)

    def resume(self, path: str | os.PathLike, expected_args: Mapping[str, Any],
               saved_view: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
               unfreeze: Callable[[], None] | None = None) -> ResumePoint | None:
        """Restores every part from ``path``; None when there is no checkpoint there (see
        :func:`restart_from_checkpoint` for the checks)."""
        def before_restore(checkpoint: Mapping[str, Any]) -> None:
            if checkpoint.get("unfrozen") and not self.unfrozen:
                if unfreeze is None:
                    raise UserError(f"{path} was written after the backbone was unfrozen (--unfreeze_at): resume it "
                                    f"with the same --unfreeze_at")
                unfreeze()
                self.unfrozen = True

        checkpoint = restart_from_checkpoint(path, expected_args, optional=("fp16_scaler",), saved_view=saved_view,
                                             before_restore=before_restore, student=self.student,
                                             teacher=self.teacher, optimizer=self.optimizer,
                                             dino_loss=self.dino_loss, fp16_scaler=self.fp16_scaler)
        if checkpoint is None:
            return None
        if "world_size" not in checkpoint:
            raise UserError(f"{path} records no world_size: it is not a training checkpoint of this project that "
                            f"can be resumed; use another --output_dir (or --init_from it)")
        return ResumePoint(int(checkpoint["epoch"]), int(checkpoint.get("iteration", 0)),
                           int(checkpoint.get("samples_done", 0)), int(checkpoint["world_size"]),
                           checkpoint.get("fp16_scaler") is not None, log_record=checkpoint.get("log_record"))
