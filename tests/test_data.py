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


def test_persistent_workers_follow_each_epochs_order_and_a_resumed_epoch(tmp_path):
    """The training loader keeps its workers for the whole run; the sampler, which deals indices and seeds from
    the main process, still decides each epoch: the batches of epoch 1, and of epoch 1 resumed after 2 batches,
    are exactly those a fresh loader without workers draws."""
    from helpers import make_images, tiny_config

    from dino_sparo.distributed import DistributedContext
    from dino_sparo.train.data import build_training_data

    images = make_images(tmp_path / "data", count=16, size=32)

    def epoch(data, number: int, samples_done: int = 0) -> list[torch.Tensor]:
        data.sampler.set_epoch(number)
        data.sampler.samples_done = samples_done
        return [torch.cat([crop.flatten(1) for crop in crops], 1) for crops, _, _ in data.loader]

    context = DistributedContext()
    persistent = build_training_data(tiny_config(images, tmp_path / "out", "--num_workers", "1"), context)
    fresh = build_training_data(tiny_config(images, tmp_path / "out"), context)  # TINY: no workers
    assert persistent.loader.persistent_workers and not fresh.loader.persistent_workers
    first = epoch(persistent, 0)
    second = epoch(persistent, 1)
    assert len(second) == 4 and not all(torch.equal(a, b) for a, b in zip(first, second))
    for got, expected in zip(second, epoch(fresh, 1)):
        assert torch.equal(got, expected)
    resumed = epoch(persistent, 1, samples_done=8)
    assert len(resumed) == 2 and all(torch.equal(got, expected) for got, expected in zip(resumed, second[2:]))
