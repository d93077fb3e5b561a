"""Labelled image folders for the evaluations: ``data_path/train`` and ``data_path/val`` in ImageFolder layout."""
from __future__ import annotations

import os
from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from ..cli import UserError
from .distributed import shard_bounds


def labelled_splits(data_path: str, train_transform: Callable, val_transform: Callable
                    ) -> tuple[ImageFolder, ImageFolder]:
    """``train/`` and ``val/`` of ``data_path`` as ImageFolders sharing train's class indices.

    A class folder may be missing from ``val/`` (its labels stay those of train); a ``val/`` class unknown
    to train, a missing split or an empty one is a :class:`UserError`.
    """
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path} is not a directory")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_path, split)):
            raise UserError(f"{os.path.join(data_path, split)} not found: --data_path must contain train/ and val/, "
                            f"each with one sub-folder of images per class")
    train = _image_folder(os.path.join(data_path, "train"), train_transform)
    val = _image_folder(os.path.join(data_path, "val"), val_transform)
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise UserError(f"{os.path.join(data_path, 'val')} has classes absent from train/: {', '.join(unknown[:5])}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if val.classes != train.classes:
        val.samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
        val.imgs = val.samples
        val.targets = [label for _, label in val.samples]
        val.classes, val.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return train, val


def _image_folder(root: str, transform: Callable) -> ImageFolder:
    try:
        return ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"{root}: {str(error).splitlines()[0]} (expected one sub-folder of images per class)") \
            from None


def shard(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """This rank's contiguous part of ``dataset``: each sample is in exactly one rank's shard, none padded."""
    start, end = shard_bounds(len(dataset), rank, world_size)
    return Subset(dataset, range(start, end))


def ordered_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Unshuffled loader that keeps every sample (no drop_last): for feature extraction and validation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False)

