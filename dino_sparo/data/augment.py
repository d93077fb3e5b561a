"""DINO's multi-crop augmentation: 2 global views and N local views of each image (design.md §3).

The ops, probabilities, sizes and random draws are DINO's (torchvision's ``RandomResizedCrop``, ``ColorJitter``
and friends, PIL Gaussian blur and solarisation). What differs from the reference's per-crop PIL chain is
where the time goes: the image is turned into one uint8 tensor once, every crop is cut and resampled with
torch's antialiased bicubic kernel (PIL's filter, vectorised; within 1 grey level of PIL), the colour ops run
on the small resampled crop, and ToTensor + Normalize is one fused step. ``benchmarks/reference_augment.py``
keeps the reference-style chain as the benchmark baseline.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from dino_sparo.eval.features import IMAGENET_MEAN, IMAGENET_STD

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JITTER = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


class _View:
    """One kind of crop: RandomResizedCrop (bicubic), flip 0.5, colour jitter 0.8, grayscale 0.2, Gaussian
    blur with probability ``blur_p`` and solarisation with probability ``solarize_p``.

    Random numbers are drawn from torch's generator in the reference's order, so a seed gives the same crop
    boxes and colour parameters as the reference chain.
    """

    def __init__(self, size: int, scale: tuple[float, float], blur_p: float, radius: tuple[float, float],
                 solarize_p: float = 0.0) -> None:
        self.size = size
        self.scale = scale
        self.blur_p = blur_p
        self.radius_min, self.radius_max = radius
        self.solarize_p = solarize_p
        self.pixel_scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)
        self.pixel_shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: (1, 3, H, W) uint8 in channels-last memory -> normalised (3, size, size) float."""
        top, left, height, width = transforms.RandomResizedCrop.get_params(pixels, list(self.scale), list(_RATIO))
        crop = F.interpolate(pixels[..., top:top + height, left:left + width], size=(self.size, self.size),
                             mode="bicubic", antialias=True, align_corners=False)
        # Channels-last memory makes this HWC view contiguous: no copy to hand the crop to PIL.
        image = Image.fromarray(crop[0].permute(1, 2, 0).numpy())
        if torch.rand(1) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if torch.rand(1) <= 0.8:  # RandomApply's draw
            order, *factors = transforms.ColorJitter.get_params(
                _JITTER.brightness, _JITTER.contrast, _JITTER.saturation, _JITTER.hue)
            for index in order.tolist():
                image = _ADJUST[index](image, factors[index])
        if torch.rand(1) < 0.2:
            image = image.convert("L").convert("RGB")
        if self.blur_p > 0 and torch.rand(()).item() < self.blur_p:
            radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
            image = image.filter(ImageFilter.GaussianBlur(radius=radius))
        if self.solarize_p > 0 and torch.rand(1).item() < self.solarize_p:
            image = ImageOps.solarize(image, 128)
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        # ToTensor + Normalize in one pass: (x / 255 - mean) / std = x * scale - shift.
        return torch.addcmul(-self.pixel_shift, chw.to(torch.float32, memory_format=torch.contiguous_format),
                             self.pixel_scale)


class DataAugmentationDINO:
    """Returns ``[global_1, global_2, local_1, ..., local_N]`` normalised tensors for one PIL image.

    Crop sizes are parameters (224 / 96 in DINO) so small images can be trained at their own scale; the
    blur radius is scaled with the global crop size so that small crops are not blurred beyond recognition.
    """

    def __init__(self, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96) -> None:
        shrink = min(1.0, global_crop_size / 224)
        radius = (0.1 * shrink, 2.0 * shrink)
        global_scale, local_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.global_view1 = _View(global_crop_size, global_scale, blur_p=1.0, radius=radius)
        self.global_view2 = _View(global_crop_size, global_scale, blur_p=0.1, radius=radius, solarize_p=0.2)
        self.local_view = _View(local_crop_size, local_scale, blur_p=0.5, radius=radius)
        self.local_crops_number = local_crops_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
        crops = [self.global_view1(pixels), self.global_view2(pixels)]
        crops.extend(self.local_view(pixels) for _ in range(self.local_crops_number))
        return crops
