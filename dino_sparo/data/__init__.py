"""Data: DINO's multi-crop augmentation, image-folder datasets and the built-in demo data."""
from dino_sparo.data.augment import DataAugmentationDINO
from dino_sparo.data.datasets import ImageDataset, ensure_demo_dataset, scan_image_folder

__all__ = ["DataAugmentationDINO", "ImageDataset", "ensure_demo_dataset", "scan_image_folder"]
