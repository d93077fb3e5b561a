"""Multi-crop pipeline throughput per data-loading worker: decode + augment of real photos, the fast
``DataAugmentationDINO`` against the reference-style PIL chain, interleaved in the same run."""
from __future__ import annotations

import glob
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from dino_sparo.cli import UserError
from dino_sparo.data.augment import DataAugmentationDINO
from dino_sparo.imagefiles import load_rgb

from .reference_augment import ReferenceAugmentationDINO

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


def bench_data(paths: list[str], local_crops: int, global_size: int, local_size: int, images: int,
               rounds: int, modes: Sequence[str] = ("baseline", "fast")) -> list[dict[str, Any]]:
    """Images/s of load + multi-crop augmentation on one thread (as in one DataLoader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipelines = {name: pipeline(local_crops_number=local_crops, global_crop_size=global_size,
                                    local_crop_size=local_size)
                     for name, pipeline in (("baseline", ReferenceAugmentationDINO), ("fast", DataAugmentationDINO))
                     if name in modes}
        best = {name: float("inf") for name in pipelines}
        for _ in range(rounds):
            for name, augment in pipelines.items():
                torch.manual_seed(0)
                augment(load_rgb(paths[0]))  # warm-up
                start = time.perf_counter()
                for index in range(images):
                    augment(load_rgb(paths[index % len(paths)]))
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    config = f"2x{global_size}+{local_crops}x{local_size}, {len(paths)} photo(s)"
    rows = [{"bench": "data", "config": config, "mode": name, "seconds": seconds / images,
             "images_per_s": images / seconds} for name, seconds in best.items()]
    if len(rows) == 2:
        rows[1]["speedup"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return rows
