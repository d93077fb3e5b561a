"""DINO's multi-crop augmentation: 2 global and N local views of each image, in two forms.

``DataAugmentationDINO`` is the reference chain of facebookresearch/dino: per crop, torchvision's
RandomResizedCrop (bicubic) and horizontal flip, colour jitter, grayscale, PIL Gaussian blur and solarisation,
then ToTensor + Normalize, all on PIL images in the DataLoader workers. At 2x224 + 8x96 this costs one core
some 17-26 ms per image (decode included), which caps a GPU's throughput.

``MultiCropUint8`` is the worker half of the fast path. A worker does only what must happen per image: decode
(JPEGs at a reduced DCT scale when every crop allows it), cut each crop with the reference's random draws,
resize it with PIL's bicubic filter (torch's vectorised uint8 version), flip it, and hand back uint8 tensors.
Colour jitter, grayscale, blur, solarisation and normalisation then run batched on the training device, see
:class:`dino_sparo.data.device_augment.DeviceAugmentation`::

    dataset = ...(transform=MultiCropUint8(...))        # images opened with Image.open, not yet loaded
    device_side = DeviceAugmentation(local_crops_number, global_crop_size)
    for crops in loader:                                 # [global1, global2, local1..N], uint8 (B, 3, S, S)
        crops = [c.to(device, non_blocking=True) for c in crops]
        views = device_side(crops, generator)           # normalised float32, same order
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms

from dino_sparo.data.transforms import normalize

_RATIO = [3.0 / 4.0, 4.0 / 3.0]
# JPEG's DCT can decode at 1/2, 1/4 and 1/8 of full size; larger reductions first.
_JPEG_REDUCTIONS = (8, 4, 2)
_PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def blur_range(global_crop_size: int) -> tuple[float, float]:
    """DINO's blur radius (sigma) range, [0.1, 2.0] at 224 px, shrunk for smaller global crops so that small
    images are not blurred beyond recognition."""
    shrink = min(1.0, global_crop_size / 224)
    return 0.1 * shrink, 2.0 * shrink


class RandomPILGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius uniform in ``radius``, as DINO's GaussianBlur.

    Draws from torch's generator (DINO uses Python's ``random``) so that DataLoader worker seeding governs it.
    """

    def __init__(self, p: float, radius: tuple[float, float]) -> None:
        self.p = p
        self.radius = radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return image
        low, high = self.radius
        radius = low + (high - low) * float(torch.rand(()))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius={self.radius})"


class DataAugmentationDINO:
    """The reference multi-crop chain: ``[global_1, global_2, local_1, ..., local_N]`` normalised float
    tensors (3, S, S) for one PIL image.

    Global view 1 is always blurred; global view 2 is blurred with p 0.1 and solarised with p 0.2; local views
    are blurred with p 0.5. Crop sizes are parameters (224 / 96 in DINO).
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
        radius = blur_range(global_crop_size)

        def view(size: int, scale: tuple[float, float], *tail: object) -> transforms.Compose:
            crop = transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)
            return transforms.Compose([crop, flip_and_color_jitter, *tail, normalize()])

        self.global_transform1 = view(global_crop_size, global_crops_scale, RandomPILGaussianBlur(1.0, radius))
        self.global_transform2 = view(global_crop_size, global_crops_scale, RandomPILGaussianBlur(0.1, radius),
                                      transforms.RandomSolarize(threshold=128, p=0.2))
        self.local_transform = view(local_crop_size, local_crops_scale, RandomPILGaussianBlur(0.5, radius))
        self.local_crops_number = local_crops_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        crops = [self.global_transform1(image), self.global_transform2(image)]
        crops.extend(self.local_transform(image) for _ in range(self.local_crops_number))
        return crops


@dataclass(frozen=True)
class CropBox:
    """One crop in full-resolution pixel coordinates, the side ``size`` it is resized to, and its flip."""

    top: int
    left: int
    height: int
    width: int
    size: int
    flip: bool


def jpeg_reduction(boxes: list[CropBox]) -> int:
    """The largest JPEG decoding reduction (8, 4, 2, else 1) that keeps every box, scaled down, at least its
    target size in both sides, so that no crop is up-sampled because of the reduced decode."""
    for reduction in _JPEG_REDUCTIONS:
        if all(min(box.height, box.width) >= reduction * box.size for box in boxes):
            return reduction
    return 1


def decode_for_boxes(image: Image.Image, boxes: list[CropBox]) -> tuple[torch.Tensor, int]:
    """``(pixels, reduction)``: ``image`` decoded to RGB as a uint8 (1, 3, H, W) tensor (channels-last memory),
    at 1/``reduction`` of its size when it is a JPEG not loaded yet and :func:`jpeg_reduction` allows it
    (``reduction`` is 1 otherwise)."""
    reduction = jpeg_reduction(boxes)
    width, height = image.size
    if reduction > 1:
        # A no-op (and the size stays) unless the image is a JPEG whose pixels were not decoded yet.
        image.draft("RGB", (width // reduction, height // reduction))
        if image.size == (width, height):
            reduction = 1
    if image.mode != "RGB":
        image = image.convert("RGB")
    # (H, W, 3) seen as (1, 3, H, W) without a copy: torch's vectorised uint8 resampling wants channels-last.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0), reduction


def _bicubic(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def resized_crop(pixels: torch.Tensor, box: CropBox, reduction: int = 1) -> torch.Tensor:
    """``box`` of ``pixels`` (decoded at 1/``reduction``) resized to a flipped-or-not uint8 (3, S, S).

    The resize is torch's antialiased bicubic on uint8: PIL's bicubic filter (the reference's), vectorised,
    with 16-bit instead of 22-bit fixed-point weights, so each of its two passes may round one grey level
    away from PIL's. At a reduction the box is scaled to the reduced image and rounded to whole pixels,
    keeping each side at least the target size.
    """
    top, left, height, width = box.top, box.left, box.height, box.width
    if reduction > 1:
        image_height, image_width = pixels.shape[-2:]
        height, width = round(height / reduction), round(width / reduction)
        top = min(round(top / reduction), image_height - height)
        left = min(round(left / reduction), image_width - width)
    region = pixels[..., top:top + height, left:left + width]
    size = box.size
    # Both PIL and torch resize in two passes through an 8-bit intermediate, whose clamping makes the pass
    # order show at saturated edges (up to ~10 grey levels). torch goes horizontal first, as Pillow < 13
    # always does; Pillow 13 goes vertical first when the height shrinks much more than the width, which for
    # a square output means (as measured) height > size and 2 * width < height + size.
    if _PIL_VERTICAL_FIRST and height > size and 2 * width < height + size:
        region = _bicubic(region, size, width).contiguous(memory_format=torch.channels_last)
    crop = _bicubic(region, size, size)[0]
    return crop.flip(-1) if box.flip else crop


class MultiCropUint8:
    """Worker side of the fast multi-crop path: ``[global_1, global_2, local_1, ..., local_N]`` uint8 tensors
    (3, S, S), cut, resized (bicubic) and flipped as the reference chain does with the same random draws.

    Give it images opened lazily (``Image.open`` without ``load``/``convert``) so that JPEGs can be decoded at
    a reduced size; loaded images work too, decoded at full size. Nothing float leaves the worker.
    """

    # Tells ImageDataset to hand over the file opened but not decoded (and to treat decode errors here as an
    # unreadable file).
    decodes_lazily = True

    def __init__(self, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96) -> None:
        self.views = [(global_crop_size, list(global_crops_scale))] * 2
        self.views += [(local_crop_size, list(local_crops_scale))] * local_crops_number

    def draw_boxes(self, image: Image.Image) -> list[CropBox]:
        """The crops of ``image`` (only its size is read), drawn from torch's generator in the reference's
        order: RandomResizedCrop's parameters, then RandomHorizontalFlip's draw, crop after crop."""
        boxes = []
        for size, scale in self.views:
            top, left, height, width = transforms.RandomResizedCrop.get_params(image, scale, _RATIO)
            boxes.append(CropBox(top, left, height, width, size, bool(torch.rand(1) < 0.5)))
        return boxes

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        boxes = self.draw_boxes(image)
        pixels, reduction = decode_for_boxes(image, boxes)
        return [resized_crop(pixels, box, reduction) for box in boxes]
