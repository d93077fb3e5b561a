"""The built-in demo data set: procedurally generated compositional images (a shape on a background) with every
attribute recorded, generated once into a cache folder."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

logger = logging.getLogger(__name__)

DEMO_VERSION = 5
DEMO_SHAPES = ("circle", "square", "triangle", "cross")
DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
                "magenta": (210, 60, 200), "cyan": (40, 200, 210), "orange": (250, 140, 30),
                "white": (245, 245, 245)}
DEMO_SIZES = {"small": 0.18, "medium": 0.26, "large": 0.34}  # half-extent as a fraction of the image side
DEMO_BACKGROUNDS = ("plain", "gradient", "noise", "stripes")
# Class folders are named after the object's colour: with textured, coloured backgrounds a randomly
# initialised ViT tells object colours apart poorly, and DINO's crops teach it to (see the README demo notes).
DEMO_CLASS_LABEL = "colour"


def default_cache_dir() -> str:
    """``$DINO_SPARO_CACHE``, else ``~/.cache/dino_sparo``."""
    return os.environ.get("DINO_SPARO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dino_sparo")


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = rng.uniform(0, 255, 3)
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "gradient":
        other = rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * xs + np.sin(angle) * ys)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        return base * (1 - t[..., None]) + other * t[..., None]
    if kind == "noise":
        coarse = rng.normal(0, 40, (size // 8, size // 8, 3))
        noise = np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 12, (size, size, 3))
        return base + noise
    other = rng.uniform(0, 255, 3)  # stripes
    period = rng.integers(6, 14)
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:size, 0:size]
    phase = ((np.cos(angle) * xs + np.sin(angle) * ys) // (period / 2)) % 2
    return np.where(phase[..., None] == 0, base, other)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    if shape == "square":
        corners = [(r, r), (-r, r), (-r, -r), (r, -r)]
    elif shape == "triangle":
        corners = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        corners = [(x * 1.25, y * 1.25 + 0.2 * r) for x, y in corners]
    else:  # cross: a plus sign of arm width 0.6 r
        w = 0.3 * r
        corners = [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w),
                   (r, -w), (r, w), (w, w)]
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners], fill=fill)


def _demo_image(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, dict[str, Any]]:
    supersample = 4
    shape = DEMO_SHAPES[rng.integers(len(DEMO_SHAPES))]
    colour = list(DEMO_COLOURS)[rng.integers(len(DEMO_COLOURS))]
    size = list(DEMO_SIZES)[rng.integers(len(DEMO_SIZES))]
    background = DEMO_BACKGROUNDS[rng.integers(len(DEMO_BACKGROUNDS))]
    half = DEMO_SIZES[size] * image_size
    cx, cy = (rng.uniform(half + 1, image_size - half - 1) for _ in range(2))
    angle = rng.uniform(-0.35, 0.35)  # small tilt: a square stays a square, not a diamond
    pixels = np.clip(_background(rng, background, image_size), 0, 255).astype(np.uint8)
    big = Image.fromarray(pixels).resize((image_size * supersample,) * 2, Image.NEAREST)
    _draw_shape(ImageDraw.Draw(big), shape, cx * supersample, cy * supersample, half * supersample, angle,
                DEMO_COLOURS[colour])
    image = big.resize((image_size, image_size), Image.BOX)
    attributes = {"shape": shape, "colour": colour, "size": size, "x": round(cx / image_size, 4),
                  "y": round(cy / image_size, 4), "rotation": round(angle, 4), "background": background}
    return image, attributes


def _write_demo(root: str, info: dict[str, Any]) -> None:
    rng = np.random.default_rng(info["seed"])
    rows = []
    for split in ("train", "val"):
        for index in range(info[f"num_{split}"]):
            image, attributes = _demo_image(rng, info["image_size"])
            relative = os.path.join(split, attributes[DEMO_CLASS_LABEL], f"{split}_{index:05d}.png")
            os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
            image.save(os.path.join(root, relative))
            rows.append({"split": split, "path": relative, **attributes})
    with open(os.path.join(root, "attributes.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(root, "info.json"), "w") as handle:
        json.dump(info, handle, indent=1)


def ensure_demo_dataset(root: str | None = None, num_train: int = 2000, num_val: int = 500, image_size: int = 64,
                        seed: int = 0, verbose: bool = True) -> str:
    """Generates the demo set once into ``root`` (default ``<cache>/demo``) and returns ``root``.

    Layout: ``train/<colour>/*.png``, ``val/<colour>/*.png`` (class folders are :data:`DEMO_CLASS_LABEL`, the
    object's colour, one of :data:`DEMO_COLOURS`), ``attributes.csv`` (split, path, shape, colour, size, x, y,
    rotation, background of every image) and ``info.json`` (the generation parameters). The same parameters give
    the same images; different ones regenerate. Written to a temporary folder and renamed, so a crash leaves no
    half set.
    """
    root = os.path.abspath(root or os.path.join(default_cache_dir(), "demo"))
    info = {"version": DEMO_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "class_label": DEMO_CLASS_LABEL}
    info_path = os.path.join(root, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as handle:
            if json.load(handle) == info:
                return root
    elif os.path.exists(root) and os.listdir(root):
        raise UserError(f"{root} exists and is not a demo data folder; choose another --demo_data_dir")
    if verbose:
        logger.info(f"generating the demo data set ({num_train} train + {num_val} val images, {image_size} px) "
                    f"in {root}")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    temporary = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        _write_demo(temporary, info)
        if os.path.isfile(info_path):  # an older generation: replace it
            shutil.rmtree(root)
        elif os.path.isdir(root):
            os.rmdir(root)
        try:
            os.rename(temporary, root)
        except OSError:  # another process finished first
            if not os.path.isfile(info_path):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return root
