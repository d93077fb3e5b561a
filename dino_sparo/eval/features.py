"""Frozen-backbone feature extraction for the evaluations."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    """DINO's evaluation view: bicubic Resize(resize_size), CenterCrop(crop_size), ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


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
