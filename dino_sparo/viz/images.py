"""Finding, reading and sizing the images to visualise."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..data.images import READ_ERRORS, images_under, load_rgb
from ..data.transforms import normalize
from ..errors import UserError

logger = logging.getLogger(__name__)


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
            image = load_rgb(str(path))
        except READ_ERRORS as error:
            logger.warning(f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})")
            continue
        pixels = resize_to_patch_multiple(image, image_size, patch_size)
        tensor = normalize()(pixels)
        prepared.append(PreparedImage(path, pixels, tensor))
    if not prepared:
        raise UserError(f"none of the {len(paths)} image file(s) could be read")
    return prepared
