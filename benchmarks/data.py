"""Multi-crop data pipeline cost per image, the reference chain against the fast path, interleaved in one run.

Two figures, both CPU core-milliseconds per image on one thread:

* worker: what a DataLoader worker spends per image, decode included (``Image.open`` + the transform). The
  reference chain (``DataAugmentationDINO``) does every op there; the fast path's worker side
  (``MultiCropUint8``) only decodes, crops, resizes and flips, to uint8.
* main: what the training process spends per image on the fast path's device side (``DeviceAugmentation``,
  run here on CPU on a collated batch). On a GPU this work moves off the CPU; the reference has none.

``images_per_s`` and ``seconds`` in the rows are per worker core: images one worker decodes and augments per
second, and core-seconds per image.
"""
from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from dino_sparo.data.augment import DataAugmentationDINO, MultiCropUint8
from dino_sparo.data.device_augment import DeviceAugmentation
from dino_sparo.errors import UserError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def sample_photos(directory: str | None) -> list[str]:
    """Photos in ``directory``, or the sample JPEGs scikit-learn ships (two 640x427 photos)."""
    if directory:
        paths = sorted(p for p in glob.glob(os.path.join(directory, "*")) if p.lower().endswith(PHOTO_SUFFIXES))
        if not paths:
            raise UserError(f"--images {directory}: no .jpg/.jpeg/.png files in it")
        return paths
    try:
        import sklearn
    except ImportError:
        raise UserError("the data benchmark needs photos: pass --images DIR or `pip install scikit-learn` for its "
                        "sample JPEGs") from None
    return sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "*.jpg")))


def _worker_pass(transform: Callable[[Image.Image], list[torch.Tensor]], paths: list[str],
                 images: int) -> tuple[float, list[list[torch.Tensor]]]:
    """(core-seconds, outputs) for ``images`` photos opened lazily and transformed, as a worker does."""
    outputs = []
    start = time.process_time()
    for index in range(images):
        with Image.open(paths[index % len(paths)]) as image:
            outputs.append(transform(image))
    return time.process_time() - start, outputs


def summary_line(rows: list[dict[str, Any]]) -> str:
    """The one-line verdict of :func:`bench_data`'s rows."""
    worker = {row["mode"]: row["worker_core_ms"] for row in rows}
    figures = [f"{label} {worker[mode]:.2f}" for mode, label in (("baseline", "reference"), ("fast", "ours"))
               if mode in worker]
    if len(figures) == 2:
        figures.append(f"ratio {worker['baseline'] / worker['fast']:.2f}x")
    return "worker core-ms per image: " + ", ".join(figures)


def bench_data(paths: list[str], local_crops: int, global_size: int, local_size: int, images: int, rounds: int,
               modes: Sequence[str] = ("baseline", "fast"), device_batch: int = 32) -> list[dict[str, Any]]:
    """Worker and main-process core-ms per image of each mode (best of ``rounds`` interleaved passes over
    ``images`` photos); the device side runs on batches of ``device_batch`` images.

    Prints a line for the main process and, last, :func:`summary_line`.
    """
    sizes = dict(local_crops_number=local_crops, global_crop_size=global_size, local_crop_size=local_size)
    transforms = {name: transform(**sizes)
                  for name, transform in (("baseline", DataAugmentationDINO), ("fast", MultiCropUint8))
                  if name in modes}
    device_side = DeviceAugmentation(local_crops, global_size)
    generator = torch.Generator()
    worker = {name: float("inf") for name in transforms}
    main = float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker's core; DataLoader workers run one thread each too
    try:
        for _ in range(rounds):
            for name, transform in transforms.items():
                torch.manual_seed(0)
                _worker_pass(transform, paths, 1)  # warm-up
                seconds, outputs = _worker_pass(transform, paths, images)
                worker[name] = min(worker[name], seconds / images)
                if name == "fast":
                    # What the default collate hands the training process: one uint8 batch per crop.
                    batch = [outputs[index % len(outputs)] for index in range(device_batch)]
                    crops = [torch.stack(views) for views in zip(*batch)]
                    generator.manual_seed(0)
                    device_side(crops, generator)  # warm-up
                    start = time.process_time()
                    device_side(crops, generator)
                    main = min(main, (time.process_time() - start) / device_batch)
    finally:
        torch.set_num_threads(threads)
    config = f"2x{global_size}+{local_crops}x{local_size}, {len(paths)} photo(s)"
    rows = []
    for name, seconds in worker.items():
        row = {"bench": "data", "config": config, "mode": name, "worker_core_ms": 1000 * seconds,
               "seconds": seconds, "images_per_s": 1 / seconds}
        if name == "fast":
            row["main_core_ms"] = 1000 * main
        rows.append(row)
    if len(rows) == 2:
        rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    if "fast" in worker:
        print(f"main-process core-ms per image (device side on CPU, batch {device_batch}): ours {1000 * main:.2f}; "
              f"the reference has none")
    return rows
