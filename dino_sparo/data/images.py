"""Finding and reading image files: the one reader every dataset and the visualisation use, and the one list of
errors that mark a file as unreadable (corrupt, truncated, empty, not an image)."""
from __future__ import annotations

import os

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def images_under(directory: str) -> list[str]:
    """Image files below ``directory``, recursively, in a stable sorted walk order."""
    found = []
    for current, subdirs, files in os.walk(directory, followlinks=True):
        subdirs.sort()
        found.extend(os.path.join(current, name) for name in sorted(files) if is_image_file(name))
    return found


def load_rgb(path: str) -> Image.Image:
    """The decoded RGB image at ``path``; raises one of :data:`READ_ERRORS` for an unreadable file."""
    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")
