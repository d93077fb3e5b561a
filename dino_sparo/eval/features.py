"""Frozen-backbone feature extraction for the evaluations."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import read_checkpoint, save_atomic
from ..data.datasets import labelled_splits, ordered_loader, shard
from ..data.transforms import eval_transform
from ..distributed import DistributedContext
from ..errors import UserError

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``model`` features and labels of every ``(images, labels)`` batch, in loader order,
    on the CPU. The model is put in eval mode for the pass and restored afterwards."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for images, batch_labels in loader:
            features.append(F.normalize(model(images.to(device, non_blocking=True)).float(), dim=1).cpu())
            labels.append(torch.as_tensor(batch_labels))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), torch.cat(labels)


def folder_features(model: nn.Module, data_path: str, resize_size: int, crop_size: int, batch_size: int,
                    num_workers: int, context: DistributedContext
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """This rank's shards of the L2-normalised features and labels of ``data_path/train`` and ``data_path/val``
    (DINO's evaluation view), on the CPU, and the number of classes; every rank extracts its own contiguous shard."""
    transform = eval_transform(resize_size, crop_size)
    train_set, val_set = labelled_splits(data_path, transform, transform)
    num_classes = len(train_set.classes)
    logger.info(f"data: {len(train_set)} train and {len(val_set)} val images, {num_classes} classes; "
                f"{context.world_size} process(es), each extracting its own shard of both")

    def extract(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_dataset_features(model, shard(dataset, context.rank, context.world_size),
                                        model.feature_dim, batch_size, num_workers, context.device)

    return (*extract(train_set), *extract(val_set), num_classes)


def extract_dataset_features(model: nn.Module, dataset: Dataset, feature_dim: int, batch_size: int,
                             num_workers: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` over ``dataset`` in order; an empty dataset (a rank's shard of a set smaller
    than the world) gives empty tensors instead of an error."""
    if len(dataset) == 0:
        return torch.empty(0, feature_dim), torch.empty(0, dtype=torch.long)
    loader = ordered_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    features, labels = extract_features(model, loader, device)
    return features, labels.long()


FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def dump_features(directory: str, train_features: torch.Tensor, test_features: torch.Tensor,
                  train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
    """Saves the four tensors under DINO's file names (each written atomically)."""
    os.makedirs(directory, exist_ok=True)
    for name, tensor in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
        save_atomic(tensor.cpu(), os.path.join(directory, name))


def load_features(directory: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, test features, train labels, test labels) written by :func:`dump_features` or by
    DINO's eval_knn.py; features are L2-normalised again in case they were not."""
    if not os.path.isdir(directory):
        raise UserError(f"--load_features {directory} is not a directory")
    tensors = []
    for name in FEATURE_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise UserError(f"--load_features {directory} lacks {name} (expected {', '.join(FEATURE_FILES)})")
        tensor = read_checkpoint(path)
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path} does not hold a tensor")
        tensors.append(tensor)
    train_features, test_features, train_labels, test_labels = tensors
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise UserError(f"{directory}: features must be two matrices of equal width, got "
                        f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]:
        raise UserError(f"{directory}: label counts ({len(train_labels)}, {len(test_labels)}) do not match the "
                        f"feature counts ({len(train_features)}, {len(test_features)})")
    return (F.normalize(train_features.float(), dim=1), F.normalize(test_features.float(), dim=1),
            train_labels.long(), test_labels.long())
