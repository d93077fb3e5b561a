"""Data: image reading, the image-folder dataset, multi-crop augmentation (in workers and on the device), the
evaluation views and the built-in demo data."""
from .augment import DataAugmentationDINO, MultiCropUint8
from .datasets import ImageDataset, labelled_splits, scan_image_folder
from .demo import ensure_demo_dataset
from .device_augment import DeviceAugmentation

__all__ = ["DataAugmentationDINO", "DeviceAugmentation", "ImageDataset", "MultiCropUint8", "ensure_demo_dataset",
           "labelled_splits", "scan_image_folder"]
