"""Data-loader throughput: a ``torch.utils.data.DataLoader`` with several worker processes that decode JPEGs of
ImageNet-like size and apply a multi-crop transform, i.e. what has to feed one GPU during pretraining.

The JPEGs are generated (500x375, quality 90, a smooth colour field with grain: about 90 KB each, near the size
of an ImageNet photo, so decoding costs what it would) into a temporary folder removed afterwards. After a
warm-up pass (worker start, page cache), ``passes`` timed passes run over the same persistent workers. Each pass
starts and drains like an epoch, so the figure understates the steady rate, never overstates it; the shorter the
pass against workers x batch, the more (16 workers: 337 img/s at 512 images per pass, 390 at 1024).

The transform is chosen by name from :data:`TRANSFORMS`, so that another pipeline can be registered beside the
current one and compared on the same machine.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dino_sparo.data.augment import DataAugmentationDINO, MultiCropUint8

MultiCrop = Callable[[Image.Image], list[torch.Tensor]]

IMAGE_SIZE = (500, 375)  # width, height: about the mean ImageNet photo
JPEG_QUALITY = 90
GRAIN = 32  # grey levels of noise: brings a file to about 90 KB, as a typical ImageNet JPEG
DISTINCT_FILES = 64  # passes longer than this cycle over the files, as an epoch cycles over a data set
BATCH_SIZE = 8


# name -> the per-image multi-crop transform class (constructor: crop counts and sizes). "pil" is the reference
# chain with floats out; "uint8" is the workers' half of the fast path (the rest runs batched on the device).
TRANSFORMS: dict[str, Callable[..., MultiCrop]] = {"pil": DataAugmentationDINO, "uint8": MultiCropUint8}


def write_jpegs(folder: str, count: int, seed: int = 0) -> list[str]:
    """``count`` photo-like JPEGs in ``folder``: a bilinearly upsampled 8x6 colour field plus grain."""
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    paths = []
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
        pixels = field + rng.integers(-GRAIN, GRAIN + 1, (height, width, 3), dtype=np.int16)
        path = os.path.join(folder, f"photo{index:03d}.jpg")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


class MultiCropFiles(Dataset):
    """``length`` samples cycling over ``paths``: each one decoded from disk and multi-cropped."""

    def __init__(self, paths: list[str], length: int, transform: MultiCrop) -> None:
        self.paths, self.length, self.transform = paths, length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        with Image.open(self.paths[index % len(self.paths)]) as image:
            # As the training data set: a transform that decodes lazily gets the file undecoded.
            return self.transform(image if getattr(self.transform, "decodes_lazily", False) else image.convert("RGB"))


def _timed_passes(loader: DataLoader, passes: int) -> float:
    """Seconds for ``passes`` full passes over ``loader`` after one untimed warm-up pass."""
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(passes):
        for _ in loader:
            pass
    return time.perf_counter() - start


def bench_loader(transform: str, workers: int, images: int, local_crops: int, global_size: int, local_size: int,
                 passes: int = 3) -> list[dict[str, Any]]:
    """One row: images/s of the multi-worker loader over ``passes`` passes of ``images`` images each."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dino_sparo_loader_") as folder:
        paths = write_jpegs(folder, min(images, DISTINCT_FILES))
        multicrop = TRANSFORMS[transform](local_crops_number=local_crops, global_crop_size=global_size,
                                          local_crop_size=local_size)
        dataset = MultiCropFiles(paths, images, multicrop)
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers, persistent_workers=workers > 0)
        seconds = _timed_passes(loader, passes)
        del loader  # stops the persistent workers before their files are removed
    width, height = IMAGE_SIZE
    config = (f"2x{global_size}+{local_crops}x{local_size}, {width}x{height} JPEG q{JPEG_QUALITY}, "
              f"batch {BATCH_SIZE}, {passes} passes of {images}")
    return [{"bench": "loader", "config": config, "mode": transform, "workers": workers,
             "images_per_s": passes * images / seconds, "seconds": seconds / (passes * images)}]
