"""The slot x attribute heat map (PIL only): one row per slot, one column per attribute, each cell its k-NN
top-1, coloured by how far above chance it is, so the attribute a slot knows best stands out whatever the
number of labels."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..eval.slot_matrix import SlotAttributeMatrix
from .render import colormap, label_font

CELL_WIDTH, CELL_HEIGHT = 64, 16
LABEL_WIDTH = 72
HEADER_HEIGHT = 30
FOOTER_HEIGHT = 42


def _text_colour(rgb: np.ndarray) -> str:
    return "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "white"


def draw_slot_heatmap(matrix: SlotAttributeMatrix, title: str = "") -> Image.Image:
    """Rows: the slots in :meth:`SlotAttributeMatrix.slot_order` (grouped by best attribute), then the
    whole-encoding rows, then a ``chance`` row. Colour: (top-1 - chance) / (100 - chance), dark = at or below
    chance, bright = perfect; each cell is labelled with its top-1 and each column header with its chance."""
    font = label_font()
    slot_rows = [(f"slot {slot}", matrix.slots[slot]) for slot in matrix.slot_order()]
    whole_rows = list(matrix.rows.items())
    columns = matrix.attributes
    separator = 4 if whole_rows else 0
    height = HEADER_HEIGHT + CELL_HEIGHT * (len(slot_rows) + len(whole_rows) + 1) + separator + FOOTER_HEIGHT
    canvas = Image.new("RGB", (max(LABEL_WIDTH + CELL_WIDTH * len(columns) + 4, 300), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), title, fill="black", font=font)
    for index, name in enumerate(columns):
        left = LABEL_WIDTH + index * CELL_WIDTH
        draw.text((left + 2, 14), f"{name[:10]}", fill="black", font=font)

    def draw_row(top: int, label: str, values: dict[str, float], chance_row: bool = False) -> None:
        draw.text((2, top + 3), label[:12], fill="black", font=font)
        for index, name in enumerate(columns):
            left = LABEL_WIDTH + index * CELL_WIDTH
            chance = matrix.chance[name]
            gain = 0.0 if chance_row else (values[name] - chance) / max(100.0 - chance, 1e-9)
            rgb = colormap(np.array(max(gain, 0.0)))
            fill = (255, 255, 255) if chance_row else tuple(int(c) for c in rgb)
            draw.rectangle([left, top, left + CELL_WIDTH - 2, top + CELL_HEIGHT - 2], fill=fill,
                           outline="black" if chance_row else None)
            draw.text((left + 4, top + 2), f"{values[name]:.1f}", font=font,
                      fill="black" if chance_row else _text_colour(rgb))

    top = HEADER_HEIGHT
    for label, values in slot_rows:
        draw_row(top, label, values)
        top += CELL_HEIGHT
    top += separator
    for label, values in whole_rows:
        draw_row(top, label, values)
        top += CELL_HEIGHT
    draw_row(top, "chance", matrix.chance, chance_row=True)
    top += CELL_HEIGHT
    footer = (f"val top-1 %, {matrix.k}-NN, n = {matrix.val_images}", "colour: (top-1 - chance) / (100 - chance)",
              "dark = chance (most frequent val label), bright = 100 %")
    for line, text in enumerate(footer):
        draw.text((2, top + 4 + 12 * line), text, fill="black", font=font)
    return canvas
