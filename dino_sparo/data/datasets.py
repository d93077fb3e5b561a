"""The image-folder dataset for training and evaluation (class sub-folders or a flat folder; unreadable files
skipped and counted), train/val splits sharing one class index, and the samplers and loaders around them."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..distributed import shard_bounds
from ..errors import UserError
from .images import READ_ERRORS, images_under, is_image_file, load_rgb

logger = logging.getLogger(__name__)


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str], int]:
    """``(samples, classes, ignored)`` of an image folder.

    With sub-folders holding images, each sub-folder is a class (torchvision's ImageFolder layout: sorted names,
    images found recursively; images loose at the top are ignored and counted). Without, the images directly
    in ``root`` form one unlabelled set (label 0, no classes): unlabelled data needs no dummy class folder.
    """
    if not root:
        raise UserError("no data path given (--data_path)")
    if not os.path.exists(root):
        raise UserError(f"data path not found: {root}")
    if not os.path.isdir(root):
        raise UserError(f"data path is not a folder: {root}")
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    loose = [entry.path for entry in entries if entry.is_file() and is_image_file(entry.name)]
    class_images = {entry.name: images_under(entry.path) for entry in entries
                    if entry.is_dir() and not entry.name.startswith(".")}
    classes = [name for name, images in class_images.items() if images]
    if classes:
        samples = [(path, label) for label, name in enumerate(classes) for path in class_images[name]]
        return samples, classes, len(loose)
    if loose:
        return [(path, 0) for path in loose], [], 0
    raise UserError(f"no images found in {root} (expected {', '.join(IMG_EXTENSIONS[:4])}, ... files, directly "
                    f"in the folder or in class sub-folders)")


class ImageDataset(Dataset):
    """Images of :func:`scan_image_folder` through ``transform``, yielding ``(sample, label)`` or, with
    ``count_skipped``, ``(sample, label, skipped)``. ``labelled`` demands class sub-folders.

    An unreadable file is reported once per process on stderr and replaced by the next readable one;
    ``skipped`` is how many files were passed over for this item, so a training loop can add it up across
    DataLoader workers. A transform with ``decodes_lazily = True`` receives the image opened but not decoded
    (so it can pick a reduced JPEG decoding size) and decodes it itself. At least one readable file is checked
    for when the dataset is built.
    """

    def __init__(self, root: str, transform: Callable[[Image.Image], Any] | None = None, labelled: bool = False,
                 count_skipped: bool = False) -> None:
        self.root = root
        self.samples, self.classes, self.ignored_loose_files = scan_image_folder(root)
        if labelled and not self.classes:
            raise UserError(f"{root} has no class sub-folders: a labelled set needs one sub-folder of images per "
                            f"class")
        self.transform = transform
        self.count_skipped = count_skipped
        self._reported: set[str] = set()
        for index in range(len(self.samples)):
            if self._read(index, decode_only=True) is not None:
                break
        else:
            raise UserError(f"none of the {len(self.samples)} image files in {root} could be read")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def relabel(self, classes: Sequence[str]) -> None:
        """Re-indexes the labels by ``classes`` (another split's list, e.g. train's), so that a class missing
        here keeps its index there; a class unknown to ``classes`` is a :class:`UserError`."""
        index = {name: position for position, name in enumerate(classes)}
        unknown = [name for name in self.classes if name not in index]
        if unknown:
            raise UserError(f"{self.root} has classes absent from the training split: {', '.join(unknown[:5])}"
                            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        self.samples = [(path, index[self.classes[label]]) for path, label in self.samples]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        """``key``: an index, or ``(index, seed)`` from a sampler that seeds each sample
        (:class:`ResumableDistributedSampler`): the transform's random draws then come from ``seed`` alone."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} images")
        with seeded_cpu_draws(seed):
            return self._item(index)

    def _item(self, index: int):
        for skipped in range(len(self.samples)):
            position = (index + skipped) % len(self.samples)
            sample = self._read(position)
            if sample is not None:
                label = self.samples[position][1]
                return (sample, label, skipped) if self.count_skipped else (sample, label)
        raise RuntimeError(f"no readable image left in {self.root}")  # files went bad after the start

    def _read(self, position: int, decode_only: bool = False) -> Any:
        """The transformed image at ``position``, or None (reported once) when the file cannot be read."""
        path = self.samples[position][0]
        lazy = getattr(self.transform, "decodes_lazily", False) and not decode_only
        try:
            if lazy:
                with open(path, "rb") as handle:
                    return self.transform(Image.open(handle))
            image = load_rgb(path)
        except READ_ERRORS as error:
            if path not in self._reported:
                self._reported.add(path)
                logger.warning(f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})",
                               extra={"all_ranks": True})
            return None
        return image if decode_only or self.transform is None else self.transform(image)


def labelled_splits(data_path: str, train_transform: Callable, val_transform: Callable
                    ) -> tuple[ImageDataset, ImageDataset]:
    """``data_path/train`` and ``data_path/val`` (one sub-folder of images per class), val labelled with train's
    class indices. A class may be missing from val; one unknown to train, or a missing split, is a
    :class:`UserError`."""
    if not os.path.isdir(data_path):
        raise UserError(f"{data_path} is not a directory")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_path, split)):
            raise UserError(f"{os.path.join(data_path, split)} not found: the data folder must contain train/ and "
                            f"val/, each with one sub-folder of images per class")
    train = ImageDataset(os.path.join(data_path, "train"), train_transform, labelled=True)
    val = ImageDataset(os.path.join(data_path, "val"), val_transform, labelled=True)
    val.relabel(train.classes)
    return train, val


@contextlib.contextmanager
def seeded_cpu_draws(seed: int | None) -> Iterator[None]:
    """Torch's CPU random draws inside the block come from ``seed`` (nothing changes when it is None); the
    generator's state outside the block is left as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler over one order of the data set per epoch (its seeded permutation), of which rank r of W
    takes the positions r, r + W, r + 2W, ... without padding (the last fewer than W samples are left out, as
    ``drop_last`` leaves out an incomplete batch).

    ``samples_done`` is how many samples at the start of that order the job has consumed already, all ranks
    together; the rest are dealt out to the ranks of this run, whatever their number. So a preempted epoch
    resumes, also on another number of processes, with every remaining sample visited once and none repeated.

    With ``seed_samples`` it yields ``(index, seed)`` pairs, the seed a function of (``seed``, epoch, index) only,
    which :class:`ImageDataset` draws the sample's augmentations from: a resumed epoch, on any number of processes
    or DataLoader workers, then sees the very crops an uninterrupted run would have seen.
    """

    def __init__(self, *args: Any, seed_samples: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples_done = 0
        self.seed_samples = seed_samples

    def sample_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index) % 2**63

    def epoch_order(self) -> list[int]:
        """The epoch's order of the whole data set, the same for any number of processes."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        remaining = self.epoch_order()[self.samples_done:]
        dealt = len(remaining) // self.num_replicas * self.num_replicas
        mine = remaining[self.rank:dealt:self.num_replicas]
        return iter([(index, self.sample_seed(index)) for index in mine] if self.seed_samples else mine)

    def __len__(self) -> int:
        return max(0, len(self.dataset) - self.samples_done) // self.num_replicas


def shard(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """This rank's contiguous part of ``dataset``: each sample is in exactly one rank's shard, none padded."""
    start, end = shard_bounds(len(dataset), rank, world_size)
    return Subset(dataset, range(start, end))


def evenly_spaced(dataset: Dataset, count: int) -> Subset:
    """Up to ``count`` items of ``dataset``, evenly spaced over it (a fixed sample for measurements)."""
    return Subset(dataset, list(range(0, len(dataset), max(1, len(dataset) // count)))[:count])


def ordered_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Unshuffled loader that keeps every sample (no drop_last): for feature extraction and validation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False)
