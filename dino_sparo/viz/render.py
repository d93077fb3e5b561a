"""Heat-map overlays and labelled grids, drawn with PIL only (headless, no display or matplotlib needed)."""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 14  # pixels of the white band above each tile that holds its label
GAP = 2  # pixels of white between tiles and around the grid

# matplotlib's "inferno" sampled at 9 evenly spaced points; its luminance rises monotonically from 0 to 1,
# so "brighter" always means "more attention", in colour or in greyscale print.
_INFERNO = np.array([
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
    (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)), linearly interpolated inferno."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_INFERNO))
    rgb = np.stack([np.interp(values, positions, _INFERNO[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def tile_width(height: int, width: int, tile_height: int) -> int:
    """Width of a tile ``tile_height`` tall showing a ``height`` x ``width`` image (aspect ratio kept)."""
    return max(1, round(tile_height * width / height))


def overlay(pixels: Image.Image, patch_map: torch.Tensor, tile_height: int, alpha: float = 0.5) -> Image.Image:
    """The image resized to ``tile_height`` with ``patch_map`` (rows, cols) over it as a heat map.

    The map is min-max scaled per tile (a constant map is drawn at the cold end) and upsampled with nearest
    neighbours, so every patch stays a visible block, as in DINO's own attention figures.
    """
    width = tile_width(pixels.height, pixels.width, tile_height)
    base = np.asarray(pixels.convert("RGB").resize((width, tile_height), Image.Resampling.BICUBIC), np.float32)
    patch_map = patch_map.detach().float().cpu()
    low, high = patch_map.min(), patch_map.max()
    scaled = (patch_map - low) / (high - low) if high > low else torch.zeros_like(patch_map)
    upsampled = F.interpolate(scaled[None, None], size=(tile_height, width), mode="nearest")[0, 0]
    heat = colormap(upsampled.numpy()).astype(np.float32)
    return Image.fromarray(((1.0 - alpha) * base + alpha * heat).round().astype(np.uint8))


@lru_cache(maxsize=1)
def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def labelled(tile: Image.Image, label: str) -> Image.Image:
    """``tile`` under a white band of :data:`LABEL_HEIGHT` pixels holding ``label`` (clipped to the tile width)."""
    canvas = Image.new("RGB", (tile.width, LABEL_HEIGHT + tile.height), "white")
    ImageDraw.Draw(canvas).text((2, 1), label, fill="black", font=label_font())
    canvas.paste(tile, (0, LABEL_HEIGHT))
    return canvas


def grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Tiles laid out row by row, :data:`GAP` pixels apart; columns as wide as their widest tile."""
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one tile")
    column_widths = [max(row[c].width for row in rows) for c in range(len(rows[0]))]
    row_heights = [max(tile.height for tile in row) for row in rows]
    canvas = Image.new("RGB", (sum(column_widths) + GAP * (len(column_widths) + 1),
                               sum(row_heights) + GAP * (len(row_heights) + 1)), "white")
    top = GAP
    for row, row_height in zip(rows, row_heights):
        left = GAP
        for tile, column_width in zip(row, column_widths):
            canvas.paste(tile, (left, top))
            left += column_width + GAP
        top += row_height + GAP
    return canvas
