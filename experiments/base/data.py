"""The studies' data sets, each written once under a data folder as class folders: ``train/`` (what training
sees), ``holdout/`` (20 % of every class of the training images, held out: what a study chooses on) and ``val/``
(only reported), plus the k-NN roots ``knn_holdout/`` and ``knn_val/`` (``train/`` = the training part, ``val/`` =
the evaluated split). A set is built in a temporary folder and renamed, so an interrupted study leaves no half set;
a complete one is never rewritten, so the runs cached on it stay valid.

- ``demo``: the built-in generated shapes (2000 train + 500 val, 64 px, colour classes), generated into
  ``DATA/demo_generated`` so the shared cache is never touched;
- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 grey scans, 10 classes), upscaled bicubically
  to 32 px RGB, 30 % of every class as val;
- ``photos``: random square crops of the photos bundled with scikit-image, class = photo, split as the digits;
- ``scenes``: random square crops of the regions of the two photos bundled with scikit-learn (a Chinese temple, a
  flower), class = region (3 x 4 per photo): a third real set, of other photos and a finer task than ``photos``;
- any image folder of one's own (:func:`prepare_image_folder`; class folders, with or without train/ and val/).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from dino_sparo.data.demo import ensure_demo_dataset
from dino_sparo.data.images import images_under

SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.2
VAL_FRACTION = 0.3  # of a set that comes without its own val split
SPLITS = ("train", "holdout", "val")
COMPLETE_MARKER = "complete.json"
DIGITS_IMAGE_SIZE = 32
# Photos bundled with scikit-image (no download), each at least 300 px on its shorter side; motorcycle is the left
# view of its stereo pair. Classes are the photos; images are random square crops of them.
PHOTO_NAMES = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
               "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket")
PHOTO_CROPS_PER_PHOTO = 120
PHOTO_CROP_SIDE = (0.15, 0.4)  # of the photo's shorter side, uniform
PHOTO_IMAGE_SIZE = 64

# scikit-learn's two bundled photos (427 x 640), each cut into a grid of regions; a class is one region, an image a
# random square crop inside it.
SCENE_PHOTOS = ("china.jpg", "flower.jpg")
SCENE_GRID = (3, 4)  # rows, columns
SCENE_CROPS_PER_REGION = 50
SCENE_CROP_SIDE = (0.5, 1.0)  # of the region's shorter side, uniform

# What write_data_set writes: split -> (class, file name, write(path)) per image.
Splits = dict[str, list[tuple[str, str, Callable[[Path], None]]]]


@dataclass(frozen=True)
class DataSet:
    """A prepared data set (see the module's docstring for its folders); ``source``: the folder it was copied from,
    when it was (the demo's generator output, with its ``attributes.csv``)."""
    name: str
    root: Path
    description: str
    source: Path | None = None

    def size(self, split: str) -> int:
        return len(images_under(str(self.root / split)))


def stratified_holdout(items: Sequence[Any], labels: Sequence[str], fraction: float) -> tuple[list[Any], list[Any]]:
    """``(kept, held_out)``: ``fraction`` of every class held out, fixed by :data:`SPLIT_SEED`."""
    kept, held = train_test_split(list(items), test_size=fraction, stratify=list(labels), random_state=SPLIT_SEED)
    return kept, held


def write_data_set(root: Path, splits: Splits, info: dict[str, Any]) -> None:
    """Writes ``splits`` as class folders under ``root``, plus the k-NN roots and the marker holding ``info``."""
    temporary = root.with_name(root.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    for split, items in splits.items():
        for class_name, file_name, write in items:
            folder = temporary / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / file_name)
    for evaluated in ("holdout", "val"):
        knn_root = temporary / f"knn_{evaluated}"
        knn_root.mkdir()
        (knn_root / "train").symlink_to(Path("..") / "train")
        (knn_root / "val").symlink_to(Path("..") / evaluated)
    (temporary / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    temporary.rename(root)


def is_complete(root: Path) -> bool:
    return (root / COMPLETE_MARKER).is_file()


def split_three_ways(indices: list[int], labels: list[str]) -> dict[str, list[int]]:
    """:data:`VAL_FRACTION` of every class as val, then :data:`HOLDOUT_FRACTION` of the rest held out."""
    rest, val = stratified_holdout(indices, labels, VAL_FRACTION)
    train, holdout = stratified_holdout(rest, [labels[i] for i in rest], HOLDOUT_FRACTION)
    return {"train": train, "holdout": holdout, "val": val}


def prepare_image_folder(name: str, source: Path, data_dir: Path, description: str) -> DataSet:
    """An image folder as a data set ``data_dir/name``: class folders (the first folder under a split is the class),
    either with train/ and val/ (val kept, train split into training and held-out parts) or without (split three
    ways, as the digits). The images are copied, so ``source`` may change or go afterwards."""
    root = data_dir / name
    if not is_complete(root):
        def labelled(folder: Path) -> list[tuple[str, str]]:
            paths = [Path(path) for path in images_under(str(folder))]
            return [(str(path), path.relative_to(folder).parts[0]) for path in paths]

        if (source / "train").is_dir() and (source / "val").is_dir():
            rest, val = labelled(source / "train"), labelled(source / "val")
            train, holdout = stratified_holdout(rest, [label for _, label in rest], HOLDOUT_FRACTION)
            chosen = {"train": train, "holdout": holdout, "val": val}
        else:
            everything = labelled(source)
            indices = split_three_ways(list(range(len(everything))), [label for _, label in everything])
            chosen = {split: [everything[i] for i in picked] for split, picked in indices.items()}

        def copies(items: list[tuple[str, str]]) -> list[tuple[str, str, Callable[[Path], None]]]:
            return [(label, Path(path).name, lambda target, path=path: shutil.copyfile(path, target))
                    for path, label in items]

        write_data_set(root, {split: copies(items) for split, items in chosen.items()},
                       {"source": str(source), "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED})
    return DataSet(name, root, description, source)


def prepare_demo(data_dir: Path) -> DataSet:
    """The demo set (generated here, as ``--demo`` would), its train/ split into training and held-out parts."""
    generated = data_dir / "demo_generated"
    if not is_complete(data_dir / "demo"):
        ensure_demo_dataset(str(generated))
    return prepare_image_folder("demo", generated, data_dir, "generated shapes, 64 px, 8 colour classes")


def pngs(chosen: dict[str, list[int]], labels: list[str], image: Callable[[int], Image.Image]) -> Splits:
    """The writers of split -> indices: ``image(i)`` saved as ``NNNN.png`` in its class's folder."""
    return {split: [(labels[i], f"{i:04d}.png", lambda target, i=i: image(i).save(target)) for i in indices]
            for split, indices in chosen.items()}


def prepare_digits(data_dir: Path) -> DataSet:
    """scikit-learn's digits (bundled with the package, no download) as PNG class folders."""
    from sklearn.datasets import load_digits

    root = data_dir / "digits"
    if not is_complete(root):
        digits = load_digits()
        labels = [str(label) for label in digits.target]

        def image(index: int) -> Image.Image:
            grey = Image.fromarray(np.round(digits.images[index] * 255 / 16).astype(np.uint8), mode="L")
            return grey.resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.BICUBIC).convert("RGB")

        write_data_set(root, pngs(split_three_ways(list(range(len(labels))), labels), labels, image),
                       {"source": "sklearn.datasets.load_digits", "val_fraction": VAL_FRACTION,
                        "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED, "image_size": DIGITS_IMAGE_SIZE})
    return DataSet("digits", root, f"scikit-learn handwritten digits, real 8x8 scans upscaled to {DIGITS_IMAGE_SIZE} "
                   f"px, 10 classes")


def photo(name: str) -> Image.Image:
    """One of :data:`PHOTO_NAMES` as an RGB image."""
    from skimage import data  # only this set needs scikit-image

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(pixels).convert("RGB")


def prepare_photos(data_dir: Path) -> DataSet:
    """Random crops of the photos bundled with scikit-image, :data:`PHOTO_CROPS_PER_PHOTO` per photo, class =
    photo. Crops of one photo may overlap across splits, as crops of one scene do."""
    root = data_dir / "photos"
    if not is_complete(root):
        generator = np.random.default_rng(SPLIT_SEED)
        boxes = []  # (photo, left, top, side)
        for name in PHOTO_NAMES:
            width, height = photo(name).size
            for _ in range(PHOTO_CROPS_PER_PHOTO):
                side = int(generator.uniform(*PHOTO_CROP_SIDE) * min(width, height))
                boxes.append((name, int(generator.integers(0, width - side + 1)),
                              int(generator.integers(0, height - side + 1)), side))
        labels = [box[0] for box in boxes]
        photos = {name: photo(name) for name in PHOTO_NAMES}

        def crop(index: int) -> Image.Image:
            name, left, top, side = boxes[index]
            return photos[name].crop((left, top, left + side, top + side)).resize(
                (PHOTO_IMAGE_SIZE, PHOTO_IMAGE_SIZE), Image.BICUBIC)

        write_data_set(root, pngs(split_three_ways(list(range(len(boxes))), labels), labels, crop),
                       {"source": "skimage.data", "photos": list(PHOTO_NAMES), "crops_per_photo":
                        PHOTO_CROPS_PER_PHOTO, "crop_side": list(PHOTO_CROP_SIDE), "val_fraction": VAL_FRACTION,
                        "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED, "image_size": PHOTO_IMAGE_SIZE})
    return DataSet("photos", root, f"random crops ({PHOTO_CROP_SIDE[0]:g}-{PHOTO_CROP_SIDE[1]:g} of the shorter side, "
                   f"resized to {PHOTO_IMAGE_SIZE} px) of {len(PHOTO_NAMES)} photos bundled with scikit-image, "
                   f"class = photo")


def prepare_scenes(data_dir: Path) -> DataSet:
    """Random square crops of the regions of scikit-learn's two bundled photos, class = region, split as the
    digits; written under ``data_dir`` like every set (the images stay out of the repository)."""
    from sklearn.datasets import load_sample_image

    root = data_dir / "scenes"
    rows, columns = SCENE_GRID
    if not is_complete(root):
        generator = np.random.default_rng(SPLIT_SEED)
        photos = {name: Image.fromarray(load_sample_image(name)).convert("RGB") for name in SCENE_PHOTOS}
        boxes, labels = [], []  # (photo, left, top, side), region name
        for name, picture in photos.items():
            width, height = picture.size
            region_width, region_height = width / columns, height / rows
            for row in range(rows):
                for column in range(columns):
                    for _ in range(SCENE_CROPS_PER_REGION):
                        side = int(generator.uniform(*SCENE_CROP_SIDE) * min(region_width, region_height))
                        centre_x = (column + generator.uniform()) * region_width
                        centre_y = (row + generator.uniform()) * region_height
                        left = int(np.clip(centre_x - side / 2, 0, width - side))
                        top = int(np.clip(centre_y - side / 2, 0, height - side))
                        boxes.append((name, left, top, side))
                        labels.append(f"{name.split('.')[0]}_r{row}c{column}")

        def crop(index: int) -> Image.Image:
            name, left, top, side = boxes[index]
            return photos[name].crop((left, top, left + side, top + side)).resize(
                (PHOTO_IMAGE_SIZE, PHOTO_IMAGE_SIZE), Image.BICUBIC)

        write_data_set(root, pngs(split_three_ways(list(range(len(boxes))), labels), labels, crop),
                       {"source": "sklearn.datasets.load_sample_image", "photos": list(SCENE_PHOTOS),
                        "grid": list(SCENE_GRID), "crops_per_region": SCENE_CROPS_PER_REGION,
                        "crop_side": list(SCENE_CROP_SIDE), "val_fraction": VAL_FRACTION,
                        "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED, "image_size": PHOTO_IMAGE_SIZE})
    return DataSet("scenes", root, f"random crops ({SCENE_CROP_SIDE[0]:g}-{SCENE_CROP_SIDE[1]:g} of a region's shorter "
                   f"side, resized to {PHOTO_IMAGE_SIZE} px) of the {rows} x {columns} regions of scikit-learn's two "
                   f"bundled photos, class = region ({rows * columns * len(SCENE_PHOTOS)} classes)")


# The bundled sets by name, each prepared under a data folder.
DATA_SETS: dict[str, Callable[[Path], DataSet]] = {"demo": prepare_demo, "digits": prepare_digits,
                                                   "photos": prepare_photos, "scenes": prepare_scenes}
