"""Reading image files for the datasets: an unreadable file (corrupt, truncated, empty, not an image) is
reported, counted and replaced by the next readable one instead of stopping a run."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from PIL import Image
from torchvision.datasets import ImageFolder

from dino_sparo.cli import UserError

_LOAD_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as handle:
        image = Image.open(handle)
        return image.convert("RGB")


class SkipUnreadable:
    """Loading that passes over unreadable files (corrupt, truncated, empty, not an image): each is reported
    once per process on stderr and replaced by the next readable file of ``self.samples``."""

    root: str
    samples: list[tuple[str, int]]
    _reported: set[str]

    def _try_load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except _LOAD_ERRORS as error:
            if path not in self._reported:
                self._reported.add(path)
                print(f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})",
                      file=sys.stderr, flush=True)
            return None

    def _find_readable(self) -> int:
        """Index of the first readable file; a folder where none is readable is a :class:`UserError`."""
        for index in range(len(self.samples)):
            if self._try_load(index) is not None:
                return index
        raise UserError(f"none of the {len(self.samples)} image files in {self.root} could be read")

    def _load_readable(self, index: int) -> tuple[Image.Image, int, int]:
        """``(image, position, skipped)``: the first readable file from ``index`` on (wrapping around)."""
        for skipped in range(len(self.samples)):
            position = (index + skipped) % len(self.samples)
            image = self._try_load(position)
            if image is not None:
                return image, position, skipped
        raise RuntimeError(f"no readable image left in {self.root}")  # files went bad after the start


class SkippingImageFolder(SkipUnreadable, ImageFolder):
    """torchvision's ImageFolder (same classes and indices) whose unreadable files are reported and replaced
    by the next readable one instead of stopping an evaluation; a folder with none readable is a
    :class:`UserError` when it is built."""

    def __init__(self, root: str, transform: Callable[[Image.Image], Any] | None = None) -> None:
        super().__init__(root, transform=transform)
        self._reported = set()
        self._find_readable()

    def __getitem__(self, index: int):
        image, position, _ = self._load_readable(index)
        sample = self.transform(image) if self.transform is not None else image
        return sample, self.samples[position][1]
