"""Training logs: progress lines with ETA, per-epoch JSON lines and TensorBoard scalars.

Metrics may be handed over as device tensors; they are copied to the host in one batch at each
logging interval, so training steps do not wait on the accelerator in between.
"""
from __future__ import annotations

import datetime
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..distributed import is_dist_initialized
from ..utils.files import append_json_line, read_json_lines


class SmoothedValue:
    """Recent-window median and whole-epoch mean of a scalar."""

    def __init__(self, window_size: int = 20) -> None:
        self.window: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        values = sorted(self.window)
        return values[len(values) // 2] if values else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def synchronize(self, device: torch.device) -> None:
        """Sums count and total over ranks (the window stays local), as DINO's MetricLogger does."""
        if not is_dist_initialized():
            return
        summed = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        self.count, self.total = int(summed[0].item()), float(summed[1].item())


class MetricLogger:
    """Collects per-iteration metrics (tensors or numbers) and formats progress lines."""

    def __init__(self, header: str, num_iters: int) -> None:
        self.header = header
        self.num_iters = num_iters
        self.meters: dict[str, SmoothedValue] = {}
        self._pending: list[tuple[str, torch.Tensor | float]] = []
        self.start = time.time()

    def update(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            self._pending.append((name, value.detach() if isinstance(value, torch.Tensor) else float(value)))

    def flush(self) -> dict[str, float]:
        """Moves pending values to the host (one copy for all tensors) and returns their latest values."""
        tensors = [v for _, v in self._pending if isinstance(v, torch.Tensor)]
        host = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist()) if tensors else iter(())
        latest = {}
        for name, value in self._pending:
            number = next(host) if isinstance(value, torch.Tensor) else value
            self.meters.setdefault(name, SmoothedValue()).update(number)
            latest[name] = number
        self._pending.clear()
        return latest

    def averages(self, device: torch.device) -> dict[str, float]:
        """Epoch means over all ranks."""
        self.flush()
        for meter in self.meters.values():
            meter.synchronize(device)
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def progress_line(self, iteration: int, images_per_s: float, data_time: float, iter_time: float,
                      max_mem_mb: float | None) -> str:
        remaining = iter_time * (self.num_iters - iteration - 1)
        eta = str(datetime.timedelta(seconds=int(remaining)))
        width = len(str(self.num_iters))
        parts = [f"{self.header} [{iteration + 1:>{width}}/{self.num_iters}]", f"eta: {eta}"]
        parts += [f"{name}: {_format(meter.median)} ({_format(meter.global_avg)})"
                  for name, meter in self.meters.items()]
        parts += [f"img/s: {images_per_s:.1f}", f"time: {iter_time:.3f}", f"data: {data_time:.3f}"]
        if max_mem_mb is not None:
            parts.append(f"max mem: {max_mem_mb:.0f}MB")
        return "  ".join(parts)


def _format(value: float) -> str:
    return f"{value:.6f}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}"


def max_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


class TrainingLog:
    """``log.txt`` (one JSON line per epoch) and TensorBoard scalars in ``output_dir``, on the main process."""

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and rank 0 only

            self.writer = SummaryWriter(log_dir=output_dir)

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "train/") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(prefix + name, value, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """A PIL image as a TensorBoard image."""
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def epoch(self, stats: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        append_json_line(self.path, stats)
        if self.writer is not None:
            self.writer.flush()

    def recover(self, record: Mapping[str, Any]) -> bool:
        """Appends ``record`` (a finished epoch's line, kept in its checkpoint) unless ``log.txt`` has that epoch:
        a run killed between writing the checkpoint and its log line left it out. Whether it was appended."""
        if not self.enabled or any(line.get("epoch") == record["epoch"] for line in read_json_lines(self.path)):
            return False
        append_json_line(self.path, record)
        return True

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, "log.txt")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

