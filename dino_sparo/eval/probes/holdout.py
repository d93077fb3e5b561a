"""The held-out part of the training images that the probe grid is chosen on (never the val images)."""
from __future__ import annotations

import torch

from ...errors import UserError


def holdout_size(val_split: float, num_images: int) -> int:
    """Training images to hold out for ``--val_split``: 0 for none, a fraction in (0, 1) of ``num_images`` (at
    least one image), or a whole number of images >= 1. A split that leaves no image to train on is a
    :class:`UserError`."""
    if val_split < 0:
        raise UserError(f"--val_split must be a fraction in [0, 1) or a number of images, got {val_split:g}")
    if val_split == 0:
        return 0
    if val_split < 1:
        size = max(1, round(val_split * num_images))
    elif val_split == int(val_split):
        size = int(val_split)
    else:
        raise UserError(f"--val_split {val_split:g}: give a fraction below 1 or a whole number of images")
    if size >= num_images:
        raise UserError(f"--val_split {val_split:g} holds out {size} of the {num_images} training images: it must "
                        f"leave at least one to train on")
    return size


def split_holdout(num_images: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both sorted: ``size`` indices drawn uniformly without replacement by
    a generator seeded with ``seed``, the same on every process and every run."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_images, generator=generator)
    held = sorted(order[:size].tolist())
    kept = sorted(order[size:].tolist())
    return kept, held
