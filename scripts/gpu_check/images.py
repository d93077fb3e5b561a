"""Synthetic image sets, written by the check as subprocesses (``python -m gpu_check.images KIND ...``):

    classes FOLDER TRAIN VAL           FOLDER/{train,val}/class_K/*.png: small images whose colour is the class
    photos FOLDER DISTINCT IMAGES      FOLDER/*.jpg: IMAGES photo-like 500x375 JPEGs, links cycling over DISTINCT
                                       generated ones (in FOLDER.distinct/), so that a large set costs no time
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PALETTE = ((200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60), (200, 60, 200), (60, 200, 200))
SIDE = 64


def write_class_images(folder: Path, train_per_class: int, val_per_class: int) -> None:
    """One class per colour of :data:`PALETTE`: noise around the colour, with a square of a random colour at a
    random place, so that colour is learnable but not the whole image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    palette = np.array(PALETTE, dtype=np.float64)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(len(PALETTE)):
            class_dir = folder / split / f"class_{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = palette[label] + rng.normal(0, 25, (SIDE, SIDE, 3))
                size = int(rng.integers(12, 28))
                top, left = rng.integers(0, SIDE - size, 2)
                pixels[top:top + size, left:left + size] = rng.integers(0, 256, 3)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(class_dir / f"{index:03d}.png")
    print(f"wrote {len(PALETTE)} classes x ({train_per_class} train + {val_per_class} val) images to {folder}")


def write_photo_folder(folder: Path, distinct: int, images: int) -> None:
    """``images`` entries directly in ``folder`` (an unlabelled training set), symbolic links cycling over
    ``distinct`` JPEGs of ImageNet-like size written beside it."""
    from benchmarks.loader import write_jpegs

    originals = folder.with_name(folder.name + ".distinct")
    originals.mkdir(parents=True)
    folder.mkdir(parents=True)
    paths = write_jpegs(str(originals), distinct)
    for index in range(images):
        os.symlink(os.path.abspath(paths[index % distinct]), folder / f"{index:06d}.jpg")
    print(f"wrote {distinct} JPEGs to {originals} and {images} links to them in {folder}")


def main(argv: list[str]) -> int:
    kinds = {"classes": write_class_images, "photos": write_photo_folder}
    if len(argv) != 4 or argv[0] not in kinds or not all(arg.isdigit() and int(arg) > 0 for arg in argv[2:]):
        print(f"usage: python -m gpu_check.images classes FOLDER TRAIN VAL | photos FOLDER DISTINCT IMAGES "
              f"(got {' '.join(argv) or 'nothing'})", file=sys.stderr)
        return 2
    kinds[argv[0]](Path(argv[1]), int(argv[2]), int(argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
