"""Device half of DINO's multi-crop augmentation: the per-view colour, blur and solarisation ops, batched.

DataLoader workers hand over resized and flipped uint8 crops (:class:`dino_sparo.data.augment.MultiCropUint8`);
this module applies the rest of the reference chain on the training device (CPU or CUDA), with DINO's
probabilities and torchvision's definitions of the ops, in the reference order per view:

* colour jitter with p 0.8: brightness and contrast factors uniform in [0.6, 1.4], saturation in [0.8, 1.2],
  hue shift in [-0.1, 0.1], applied in a random order per sample (torchvision's ``ColorJitter``);
* grayscale with p 0.2;
* Gaussian blur with p 1.0 (global view 1), 0.1 (global view 2) and 0.5 (local views), sigma uniform in
  [0.1, 2.0] scaled by min(1, global_crop_size / 224) as DINO's blur radius;
* solarisation with p 0.2 on global view 2 only (pixels >= 128/255 inverted, as PIL's ``ImageOps.solarize``);
* ImageNet normalisation to float32.

Each crop group (global 1, global 2, all local crops together) is one batched pass with per-sample
parameters. Drawing them (:meth:`DeviceAugmentation.draw_params`) is separate from applying them
(:meth:`DeviceAugmentation.apply`); the draws come from a ``torch.Generator`` the caller owns, on the crops'
device, so the same generator state gives the same augmentations on the same device::

    augment = DeviceAugmentation(local_crops_number=8, global_crop_size=224)
    generator = torch.Generator(device)
    generator.manual_seed(seed)            # e.g. per iteration, from (seed, epoch, iteration, rank)
    views = augment([c.to(device, non_blocking=True) for c in crops], generator)

Nothing in a pass waits for the device (no ``.item()``, no data-dependent shapes) and nothing loops over
samples. The ops work on floats in [0, 1] without rounding between them, where the reference's PIL ops
round to 8 bits after each op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dino_sparo.data.augment import blur_range
from dino_sparo.data.transforms import IMAGENET_MEAN, IMAGENET_STD

GROUPS = ("global1", "global2", "local")
# Colour jitter ops, numbered as torchvision's ColorJitter numbers its ``fn_idx``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
SOLARIZE_THRESHOLD = 128 / 255
_JITTER_P, _GRAYSCALE_P = 0.8, 0.2
_BLUR_P = {"global1": 1.0, "global2": 0.1, "local": 0.5}
_SOLARIZE_P = {"global1": 0.0, "global2": 0.2, "local": 0.0}
# (low, high) of the jitter factors: ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1).
_BRIGHTNESS_RANGE, _CONTRAST_RANGE, _SATURATION_RANGE, _HUE_RANGE = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)


@dataclass(frozen=True)
class ViewParams:
    """Per-sample parameters of one crop group; every tensor has the batch as its first dimension."""

    jitter: torch.Tensor  # bool: colour jitter applied
    order: torch.Tensor  # long (B, 4): a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE
    brightness: torch.Tensor  # factor
    contrast: torch.Tensor  # factor
    saturation: torch.Tensor  # factor
    hue: torch.Tensor  # shift, in turns of the colour wheel
    grayscale: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # blur sigma in pixels
    solarize: torch.Tensor  # bool


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights."""
    red, green, blue = images.unbind(1)
    return (0.2989 * red + 0.587 * green).add_(blue, alpha=0.114).unsqueeze(1)


def _blend(images: torch.Tensor, factor: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * target`` clamped to [0, 1], per sample, where the target is black
    (``op`` BRIGHTNESS), the image's mean luma (CONTRAST) or the pixel's luma (SATURATION): torchvision's
    three blends, one pass for a batch that mixes them."""
    luma = rgb_to_grayscale(images)
    rest = 1 - factor
    contrast_weight = _per_sample(torch.where(op == CONTRAST, rest, 0))
    saturation_weight = _per_sample(torch.where(op == SATURATION, rest, 0))
    mean_term = contrast_weight * luma.mean((1, 2, 3), keepdim=True)
    target = luma.mul_(saturation_weight).add_(mean_term)
    # Broadcasting addcmul is several times slower on CPU than this multiply and add.
    return (images * _per_sample(factor)).add_(target).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` with a factor per sample, on floats in [0, 1]."""
    return _blend(images, factor, torch.full_like(factor, BRIGHTNESS, dtype=torch.long))


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_contrast`` with a factor per sample, on floats in [0, 1]."""
    return _blend(images, factor, torch.full_like(factor, CONTRAST, dtype=torch.long))


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_saturation`` with a factor per sample, on floats in [0, 1]."""
    return _blend(images, factor, torch.full_like(factor, SATURATION, dtype=torch.long))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (HSV hue rotated by ``shift`` turns, saturation and value kept) with a
    shift per sample, on floats in [0, 1].

    The hue is taken in sextants of the hexcone, the red sector winning ties, then green, as in torchvision's
    ``_rgb2hsv``. Back to RGB, channel n (5 red, 3 green, 1 blue) is ``max - chroma * clamp(min(k, 4 - k),
    0, 1)`` with ``k = (n + hue) mod 6``: the same piecewise-linear function as torchvision's ``_hsv2rgb``,
    computed from the chroma directly rather than through the saturation. Boolean masks multiply instead of
    selecting with ``torch.where``, whose per-pixel branch is several times slower on CPU.
    """
    red, green, blue = images.unbind(1)
    high, low = images.amax(1), images.amin(1)
    chroma = high - low
    is_red = high == red
    is_green = (high == green) & ~is_red
    is_blue = ~(is_red | is_green)
    is_red, is_green, is_blue = (mask.to(images.dtype) for mask in (is_red, is_green, is_blue))
    scaled_hue = is_red * (green - blue) + is_green * (blue - red + 2 * chroma) + is_blue * (red - green + 4 * chroma)
    # Grey pixels (chroma 0) have numerator 0, so any hue; their output is max - 0 = the grey itself.
    hue = scaled_hue.div_(chroma.clamp_min(1e-12)).add_(6 * shift.view(-1, 1, 1))
    hue -= 6 * torch.floor(hue / 6)  # now in [0, 6)
    # Offsets 5, 3, 1 made on the device: a host tensor would need a synchronising copy.
    offsets = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    sector = hue.unsqueeze(1) + offsets  # k before the "mod 6", in [1, 11)
    # clamp(min(k, 4 - k), 0, 1) = clamp(2 - |k - 2|, 0, 1) is a bump on (0, 4); with its copy one period
    # later it covers k in [0, 12) without a modulo. In place: large temporaries are costly on CPU.
    ramp = (sector - 2).abs_().neg_().add_(2).clamp_(0, 1)
    ramp += sector.sub_(8).abs_().neg_().add_(2).clamp_(0, 1)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(high.unsqueeze(1))


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """Odd kernel side covering +-3 sigma_max, capped by the crop (reflect padding needs a margin < side)."""
    return 2 * min(math.ceil(3 * sigma_max), (crop_size - 1) // 2) + 1


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                  enabled: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding, kernel normalised over ``kernel_size`` taps) with a
    sigma per sample; samples where ``enabled`` is False get a one-tap kernel, i.e. are left as they are.

    The 2-D Gaussian is separable, so it runs as a horizontal and a vertical pass of per-sample 1-D kernels,
    each one grouped convolution over the batch's channels.
    """
    batch, channels, height, width = images.shape
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    if enabled is not None:
        kernels = torch.where(enabled.view(-1, 1), kernels, (taps == 0).to(images.dtype))
    weight = kernels.repeat_interleave(channels, 0)
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    padded = padded.view(1, batch * channels, height + 2 * radius, width + 2 * radius)
    rows = F.conv2d(padded, weight.view(-1, 1, 1, kernel_size), groups=batch * channels)
    return F.conv2d(rows, weight.view(-1, 1, kernel_size, 1), groups=batch * channels).view(images.shape)


def solarize(images: torch.Tensor, enabled: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """torchvision's ``solarize`` (values >= threshold become 1 - value) on the samples where ``enabled``."""
    # lerp with weights 0 and 1 returns its ends exactly, without torch.where's slow per-pixel branch on CPU.
    inverted = (images >= threshold) & _per_sample(enabled)
    return torch.lerp(images, 1 - images, inverted.to(images.dtype))


def _blend_position(images: torch.Tensor, params: ViewParams, position: int, active: torch.Tensor) -> torch.Tensor:
    """The blend each sample has at ``position`` of its order, where ``active`` (factor 1 elsewhere)."""
    op = params.order[:, position]
    factors = torch.stack([params.brightness, params.contrast, params.saturation, torch.ones_like(params.hue)], 1)
    return _blend(images, torch.where(active, factors.gather(1, op.view(-1, 1)).view(-1), 1), op)


def color_jitter(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-sample factors and order, on the samples where ``params.jitter``.

    The hue, the costly op, runs once for the whole batch: first the blends each sample places before its hue
    (positions 0-2, each pass mixing brightness, contrast and saturation samples), then the hue, then the
    blends after it (positions 1-3).
    """
    hue_position = (params.order == HUE).int().argmax(1)
    for position in range(3):
        images = _blend_position(images, params, position, params.jitter & (position < hue_position))
    images = torch.where(_per_sample(params.jitter), adjust_hue(images, params.hue), images)
    for position in range(1, 4):
        images = _blend_position(images, params, position, params.jitter & (position > hue_position))
    return images


class DeviceAugmentation:
    """The per-view ops of DINO's multi-crop chain on batches of uint8 crops, on the crops' device."""

    def __init__(self, local_crops_number: int, global_crop_size: int) -> None:
        self.local_crops_number = local_crops_number
        self.sigma_range = blur_range(global_crop_size)

    def draw_params(self, group: str, batch: int, generator: torch.Generator) -> ViewParams:
        """Parameters for ``batch`` crops of ``group`` (one of :data:`GROUPS`), drawn from ``generator`` on its
        device in one call, so their number and order never depend on earlier draws."""
        if group not in GROUPS:
            raise ValueError(f"unknown crop group {group!r}; expected one of {GROUPS}")
        uniform = torch.rand(batch, 13, generator=generator, device=generator.device).unbind(1)

        def between(value: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * value

        return ViewParams(
            jitter=uniform[4] < _JITTER_P,
            # Sorting i.i.d. uniforms gives each of the 24 orders with equal probability, as randperm does.
            order=torch.stack(uniform[:4], 1).argsort(1),
            brightness=between(uniform[5], _BRIGHTNESS_RANGE),
            contrast=between(uniform[6], _CONTRAST_RANGE),
            saturation=between(uniform[7], _SATURATION_RANGE),
            hue=between(uniform[8], _HUE_RANGE),
            grayscale=uniform[9] < _GRAYSCALE_P,
            blur=uniform[10] < _BLUR_P[group],
            sigma=between(uniform[11], self.sigma_range),
            solarize=uniform[12] < _SOLARIZE_P[group],
        )

    def apply(self, group: str, crops: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """uint8 (B, 3, S, S) crops of ``group`` -> normalised float32 views, with ``params`` from
        :meth:`draw_params`."""
        images = crops.to(torch.float32).div_(255)
        images = color_jitter(images, params)
        images = torch.where(_per_sample(params.grayscale), rgb_to_grayscale(images).expand_as(images), images)
        kernel_size = blur_kernel_size(self.sigma_range[1], min(images.shape[-2:]))
        images = gaussian_blur(images, params.sigma, kernel_size, enabled=params.blur)
        if _SOLARIZE_P[group] > 0:
            images = solarize(images, params.solarize)
        for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
            images[:, channel].sub_(mean).div_(std)
        return images

    def __call__(self, crops: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """``[global1, global2, local1..N]`` uint8 (B, 3, S, S) on the generator's device -> the normalised
        float32 views in the same order. Draws global 1's, global 2's, then the locals' parameters."""
        if len(crops) != 2 + self.local_crops_number:
            raise ValueError(f"expected {2 + self.local_crops_number} crop tensors (2 global + "
                             f"{self.local_crops_number} local), got {len(crops)}")
        for crop in crops:
            if crop.dtype != torch.uint8 or crop.dim() != 4 or crop.shape[1] != 3:
                raise ValueError(f"crops must be uint8 (B, 3, S, S) tensors, got {crop.dtype} {tuple(crop.shape)}")
            # A generator made for "cuda" reports no index: it runs on the current device.
            if crop.device.type != generator.device.type or generator.device.index not in (None, crop.device.index):
                raise ValueError(f"crops on {crop.device} but the generator on {generator.device}: both must be "
                                 f"on the training device")
        batch = crops[0].shape[0]
        views = [self.apply(group, crop, self.draw_params(group, batch, generator))
                 for group, crop in zip(GROUPS[:2], crops[:2])]
        if self.local_crops_number:
            local = torch.cat(crops[2:])
            views.extend(self.apply("local", local, self.draw_params("local", local.shape[0], generator)).split(batch))
        return views


class StepViews:
    """The crops of one training step, ready on the training device.

    With ``augmentation`` (the fast path): the workers' uint8 crops go to ``augment_device`` and are augmented
    there, with a generator reseeded from (seed, iteration, rank) at every step, so a resumed run repeats the
    device-side draws of an uninterrupted one. Without (the reference PIL path): the workers' float crops are
    only moved to the training device.
    """

    def __init__(self, augmentation: DeviceAugmentation | None, augment_device: torch.device,
                 train_device: torch.device, seed: int, rank: int) -> None:
        self.augmentation = augmentation
        self.augment_device, self.train_device = augment_device, train_device
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(augment_device) if augmentation is not None else None

    def __call__(self, crops: list[torch.Tensor], iteration: int) -> list[torch.Tensor]:
        if self.augmentation is None:
            return [crop.to(self.train_device, non_blocking=True) for crop in crops]
        self.generator.manual_seed(((self.seed * 1_000_003 + iteration) * 65_537 + self.rank) % 2**63)
        crops = [crop.to(self.augment_device, non_blocking=True) for crop in crops]
        return [view.to(self.train_device, non_blocking=True) for view in self.augmentation(crops, self.generator)]
