"""Finding, reading and sizing the images to visualise."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..cli import UserError
from ..data.datasets import images_under
from ..eval.features import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class PreparedImage:
    """An image as the model sees it: ``pixels`` (the RGB crop, for display) and ``tensor`` (normalised, C×H×W)."""
    path: Path
    pixels: Image.Image
    tensor: torch.Tensor


def find_images(paths: Sequence[str | os.PathLike], max_images: int | None = None) -> list[Path]:
    """Image files among ``paths``: files as given, folders searched recursively (sorted), common extensions."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.extend(Path(file) for file in images_under(str(path)))
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"no such image file or folder: {path}")
    if not found:
        raise UserError(f"no images found in {', '.join(map(str, paths))} (extensions: {' '.join(IMG_EXTENSIONS)})")
    return found[:max_images] if max_images else found


def resize_to_patch_multiple(image: Image.Image, image_size: Sequence[int], patch_size: int) -> Image.Image:
    """Resizes like DINO's visualisation, then centre-crops each side down to a multiple of ``patch_size``.

    One size resizes the shorter side to it (aspect ratio kept); two sizes (height, width) resize to exactly that.
    """
    size = list(image_size) if len(image_size) == 2 else [int(image_size[0])]
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    height = image.height - image.height % patch_size
    width = image.width - image.width % patch_size
    if height == 0 or width == 0:
        raise UserError(f"--image_size {' '.join(map(str, image_size))} makes a {image.height}x{image.width} image, "
                        f"smaller than one {patch_size} px patch")
    return TF.center_crop(image, [height, width])


def prepare_images(paths: Sequence[Path], image_size: Sequence[int], patch_size: int) -> list[PreparedImage]:
    """Reads, resizes and normalises each image; unreadable files are skipped with a warning."""
    prepared = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as error:
            print(f"warning: skipping {path}: not a readable image ({error.__class__.__name__})", file=sys.stderr)
            continue
        pixels = resize_to_patch_multiple(image, image_size, patch_size)
        tensor = TF.normalize(TF.to_tensor(pixels), IMAGENET_MEAN, IMAGENET_STD)
        prepared.append(PreparedImage(path, pixels, tensor))
    if not prepared:
        raise UserError(f"none of the {len(paths)} image file(s) could be read")
    return prepared
