import csv
import hashlib
import os

import pytest
import torch
from PIL import Image

from dino_sparo.data import DataAugmentationDINO, ImageDataset, ensure_demo_dataset, scan_image_folder
from dino_sparo.data.demo import DEMO_CLASS_LABEL, DEMO_COLOURS, DEMO_SHAPES
from dino_sparo.errors import UserError


def write_images(folder, count, size=20, start=0):
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (size, size), (10 * index, 0, 0)).save(os.path.join(folder, f"img{start + index}.png"))


def test_multicrop_shapes_and_order():
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), local_crops_number=3, global_crop_size=32,
                                     local_crop_size=16)
    crops = transform(Image.new("RGB", (50, 40), (200, 100, 50)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


def test_class_folders_and_flat_folder(tmp_path):
    write_images(tmp_path / "classes" / "b", 2)
    write_images(tmp_path / "classes" / "a" / "nested", 3)
    write_images(tmp_path / "classes", 1, start=9)  # loose file next to class folders: ignored and counted
    samples, classes, ignored = scan_image_folder(str(tmp_path / "classes"))
    assert classes == ["a", "b"] and ignored == 1
    assert sorted(label for _, label in samples) == [0, 0, 0, 1, 1]

    write_images(tmp_path / "flat", 4)
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    dataset = ImageDataset(str(tmp_path / "flat"))
    assert len(dataset) == 4 and dataset.classes == [] and set(dataset.targets) == {0}
    image, label = dataset[0]
    assert image.size == (20, 20) and label == 0


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    write_images(tmp_path, 3)
    (tmp_path / "img1.png").write_bytes(b"this is not a png")
    dataset = ImageDataset(str(tmp_path), transform=lambda image: image.size, count_skipped=True)
    results = [dataset[index] for index in range(len(dataset))]
    assert results[1] == ((20, 20), 0, 1)  # replaced by the next readable file, one file skipped
    assert results[0][2] == 0 and results[2][2] == 0
    assert "skipping unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "all_bad", "not_a_folder"])
def test_bad_data_paths_are_one_line_errors(tmp_path, case):
    path = tmp_path / "data"
    if case == "empty":
        path.mkdir()
    elif case == "all_bad":
        path.mkdir()
        for name in ("a.jpg", "b.png"):
            (path / name).write_bytes(b"garbage")
    elif case == "not_a_folder":
        path.write_text("x")
    with pytest.raises(UserError) as error:
        ImageDataset(str(path))
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_demo_dataset_layout_and_determinism(tmp_path):
    first = ensure_demo_dataset(str(tmp_path / "one"), num_train=12, num_val=4, image_size=32, seed=3, verbose=False)
    second = ensure_demo_dataset(str(tmp_path / "two"), num_train=12, num_val=4, image_size=32, seed=3, verbose=False)
    with open(os.path.join(first, "attributes.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16
    assert set(rows[0]) >= {"split", "path", "shape", "colour", "size", "x", "y", "background"}
    for row in rows:
        # the class folder is the recorded label; every image exists, at the requested size
        assert row["path"].split(os.sep)[:2] == [row["split"], row[DEMO_CLASS_LABEL]]
        assert row["shape"] in DEMO_SHAPES and row["colour"] in DEMO_COLOURS
        with Image.open(os.path.join(first, row["path"])) as image:
            assert image.size == (32, 32)

    def digest(root):
        return [hashlib.md5(open(os.path.join(root, r["path"]), "rb").read()).hexdigest() for r in rows]

    assert digest(first) == digest(second)
    train = ImageDataset(os.path.join(first, "train"))
    assert len(train) == 12 and set(train.classes) <= set(DEMO_COLOURS)
    # generated once: a second call with the same parameters reuses the folder untouched
    stamp = os.path.getmtime(os.path.join(first, "info.json"))
    assert ensure_demo_dataset(first, num_train=12, num_val=4, image_size=32, seed=3, verbose=False) == first
    assert os.path.getmtime(os.path.join(first, "info.json")) == stamp
