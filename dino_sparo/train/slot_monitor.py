"""Watching the slots form during training: the slot statistics of the teacher on a fixed set of training images
every epoch (log.txt and TensorBoard scalars), and every ``--viz_freq`` epochs the attention maps of its most peaked
slots on those images (TensorBoard images), drawn by the same code as ``visualize_sparo.py``."""
from __future__ import annotations

import time

import torch
from PIL import Image

from ..data.datasets import ImageDataset, evenly_spaced
from ..data.transforms import eval_view, normalize
from ..eval.slot_stats import measure_slots
from ..viz import render
from ..viz.attention import patch_grid
from .metrics import TrainingLog


class SlotMonitor:
    """``count`` training images (evenly spaced over the data set), resized and centre-cropped to the global crop
    size, on which :meth:`__call__` measures the attention maps of a backbone's read-out (SPARO's slots)."""

    def __init__(self, data_path: str, crop_size: int, device: torch.device, count: int = 16, viz_freq: int = 5,
                 slots_drawn: int = 8) -> None:
        chosen = evenly_spaced(ImageDataset(data_path, eval_view(round(crop_size * 256 / 224), crop_size)), count)
        self.pixels: list[Image.Image] = [image for image, _ in chosen]
        self.images = torch.stack([normalize()(image) for image in self.pixels])
        self.device, self.viz_freq, self.slots_drawn = device, viz_freq, slots_drawn

    def __call__(self, backbone: torch.nn.Module, epoch: int, log: TrainingLog) -> dict[str, float]:
        """The statistics' means (also written as TensorBoard scalars under ``slots/``), with the maps every
        ``viz_freq`` epochs (and at epoch 0), and ``slot_monitor_s``, the seconds this took (its cost)."""
        start = time.perf_counter()
        draw = self.viz_freq > 0 and epoch % self.viz_freq == 0
        stats, attention = measure_slots(backbone, [self.images], self.device, return_attention=True)
        summary = stats.summary()
        log.scalars(summary, epoch, prefix="slots/")
        if draw:
            log.image("slots/most_peaked", self._grid(backbone, attention, stats.peakedness), epoch)
        return {**summary, "slot_monitor_s": round(time.perf_counter() - start, 3)}

    def _grid(self, backbone: torch.nn.Module, attention: torch.Tensor, peakedness: torch.Tensor) -> Image.Image:
        """One row per slot (the most peaked first), one column per image."""
        patch = backbone.patch_embed.patch_size[0]
        grid_size = (self.images.shape[-2] // patch, self.images.shape[-1] // patch)
        maps = patch_grid(attention, grid_size, backbone.readout_module.num_prefix_tokens)  # (B, L, rows, cols)
        chosen = torch.argsort(peakedness, descending=True, stable=True)[: self.slots_drawn].tolist()
        label = backbone.readout_module.map_label
        rows = [[render.labelled(render.overlay(pixels, maps[image, slot], 64), f"{label} {slot}")
                 for image, pixels in enumerate(self.pixels)] for slot in chosen]
        return render.grid(rows)
