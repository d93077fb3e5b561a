"""The reference DINO multi-crop chain (per-crop PIL transforms, ToTensor, Normalize), kept only as the
benchmark baseline for :class:`dino_sparo.data.augment.DataAugmentationDINO`: same ops, probabilities and
random draws, so speed-ups are ratios measured in the same run and outputs can be compared pixel by pixel.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from dino_sparo.eval.features import IMAGENET_MEAN, IMAGENET_STD


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius uniform in [radius_min, radius_max], as DINO.

    Draws from torch's generator so that seeding torch (and DataLoader worker seeding) governs it.
    """

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class ReferenceAugmentationDINO:
    """Returns ``[global_1, global_2, local_1, ..., local_N]`` normalised tensors for one PIL image.

    Crop sizes are parameters (224 / 96 in DINO) so small images can be trained at their own scale; the
    blur radius is scaled with the global crop size so that small crops are not blurred beyond recognition.
    """

    def __init__(self, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                   p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        radius_max = 2.0 * min(1.0, global_crop_size / 224)
        radius_min = 0.1 * min(1.0, global_crop_size / 224)

        def blur(p: float) -> RandomGaussianBlur:
            return RandomGaussianBlur(p, radius_min, radius_max)

        self.global_transform1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, blur(1.0), normalize,
        ])
        self.global_transform2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, blur(0.1), transforms.RandomSolarize(threshold=128, p=0.2), normalize,
        ])
        self.local_crops_number = local_crops_number
        self.local_transform = transforms.Compose([
            transforms.RandomResizedCrop(local_crop_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, blur(0.5), normalize,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transform1(image), self.global_transform2(image)]
        crops.extend(self.local_transform(image) for _ in range(self.local_crops_number))
        return crops
