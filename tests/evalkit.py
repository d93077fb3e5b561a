"""Small data sets and checkpoints for the evaluation tests, built on the fly."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from dino_sparo.cli import MODEL_DEFAULTS, build_model_from_config
from dino_sparo.models import DINOHead, MultiCropWrapper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = dict(MODEL_DEFAULTS, arch="vit_tiny", patch_size=8, depth=3, readout="sparo", sparo_slots=6,
                  sparo_slot_dim=16)


def make_image_folder(root: str, counts: dict[str, dict[int, int]], size: int = 32, seed: int = 0,
                      contrast: float = 100.0) -> str:
    """``root/<split>/class_XX/*.png``: each class a distinct hue with noise, so colour separates the classes.

    ``counts`` maps a split to {class index: number of images}; a low ``contrast`` between the class colours
    (against pixel noise of std 25) makes the task harder.
    """
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for label, count in per_class.items():
            folder = os.path.join(root, split, f"class_{label:02d}")
            os.makedirs(folder, exist_ok=True)
            hue = label / 10.0
            base = np.array([np.sin(2 * np.pi * (hue + shift)) for shift in (0.0, 1 / 3, 2 / 3)]) * contrast + 128
            for index in range(count):
                pixels = base + rng.normal(0, 25, size=(size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{index}.png"))
    return root


def balanced(classes: int, per_class: int) -> dict[int, int]:
    return {label: per_class for label in range(classes)}


def spread(classes: int, total: int) -> dict[int, int]:
    """``total`` images over ``classes`` classes as evenly as possible."""
    return {label: total // classes + (1 if label < total % classes else 0) for label in range(classes)
            if total // classes + (1 if label < total % classes else 0)}


def write_main_dino_checkpoint(path: str, seed: int = 0, **model_overrides: Any) -> dict[str, Any]:
    """A checkpoint in main_dino.py's format (student/teacher MultiCropWrapper state dicts, plain-dict args)."""
    config = dict(TINY_MODEL, **model_overrides)
    torch.manual_seed(seed)
    backbone = build_model_from_config(config)
    teacher = MultiCropWrapper(backbone, DINOHead(backbone.feature_dim, 256, hidden_dim=64, bottleneck_dim=32))
    student_state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in teacher.state_dict().items()}
    args = dict(config, out_dim=256, lr=0.0005, epochs=1, data_path="/nowhere", output_dir=os.path.dirname(path),
                global_crops_scale=[0.4, 1.0])
    checkpoint = {"student": student_state, "teacher": teacher.state_dict(),
                  "optimizer": {"state": {}, "param_groups": []}, "epoch": 1, "args": args,
                  "dino_loss": {"center": torch.zeros(1, 256)}}
    torch.save(checkpoint, path)
    return config
