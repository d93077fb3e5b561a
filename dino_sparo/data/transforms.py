"""Image normalisation and the evaluation views (DINO's protocol), shared by training, evaluation and drawing."""
from __future__ import annotations

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> transforms.Compose:
    """ToTensor + ImageNet mean/std normalisation."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_view(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    """DINO's evaluation view as a PIL image: bicubic Resize(resize_size), CenterCrop(crop_size)."""
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
    ])


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    """DINO's evaluation view, normalised: :func:`eval_view` then ImageNet normalisation."""
    return transforms.Compose([eval_view(resize_size, crop_size), normalize()])


def linear_train_transform(crop_size: int = 224) -> transforms.Compose:
    """DINO's linear-probe training view: RandomResizedCrop, horizontal flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        normalize(),
    ])
