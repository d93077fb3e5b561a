"""Shared test helpers: tiny models, generated image folders and checkpoints, and running the real scripts as
subprocesses that can neither hang a test nor outlive it (each in its own process group, killed as a group when
the test is done with it, so torchrun and DataLoader workers go too; every wait has a deadline)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.processes import free_port as free_port  # process control, re-exported for the tests
from benchmarks.processes import kill_tree, run_with_timeout
from benchmarks.processes import wait_until as wait_until
from dino_sparo.errors import run_cli
from dino_sparo.models import MODEL_DEFAULTS, DINOHead, MultiCropWrapper, build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# main_dino.py flags of a tiny, fast run on 32 px crops.
TINY = ["--arch", "vit_tiny", "--depth", "3", "--patch_size", "16", "--sparo_slots", "4", "--sparo_slot_dim", "8",
        "--out_dim", "256", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--global_crop_size", "32",
        "--local_crop_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "4", "--num_workers", "0",
        "--warmup_epochs", "1", "--device", "cpu", "--log_freq", "2"]


def make_images(folder, count: int = 12, size: int = 40) -> str:
    """``count`` random-noise PNGs directly in ``folder`` (an unlabelled, flat folder)."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:03d}.png"))
    return str(folder)


def tiny_args(data, out, *extra):
    """main_dino.py's parsed arguments for a tiny run on ``data`` writing to ``out``."""
    from main_dino import parse_args

    return parse_args(TINY + ["--data_path", str(data), "--output_dir", str(out), *map(str, extra)])


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
    backbone = build_backbone(config)
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




def script(name: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name)]


FAULTS = os.path.join(ROOT, "tests", "faults")


def environment(fault: str | None = None, fault_rank: int | None = None, fault_once: str | None = None,
                **extra: str) -> dict[str, str]:
    """The environment of a script run by a test: the repository importable, no launcher variables of the
    test's own process, and with ``fault`` the injection of ``tests/faults/sitecustomize.py`` armed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DINO_SPARO_FAULT",
                 "DINO_SPARO_FAULT_RANK", "DINO_SPARO_FAULT_ONCE"):
        if name not in extra:
            env.pop(name, None)
    if fault:
        env.update(PYTHONPATH=os.pathsep.join([FAULTS, ROOT]), DINO_SPARO_FAULT=fault)
        if fault_rank is not None:
            env["DINO_SPARO_FAULT_RANK"] = str(fault_rank)
        if fault_once:
            env["DINO_SPARO_FAULT_ONCE"] = fault_once
    return env


# The fault tests' name for it: kill_tree of a process leading its own group also kills the group.
kill_group = kill_tree


def run(command: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(capture_output=True, text=True)`` from the repository root, but in its own process
    group, everything it started killed on timeout (the ``TimeoutExpired`` then fails the test) and on return."""
    return run_with_timeout(command, timeout, cwd=ROOT, env=env or environment())


def read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def temporaries(out) -> list[str]:
    return glob.glob(os.path.join(out, ".checkpoint*.tmp-*"))


def assert_every_checkpoint_loads(out) -> list[dict]:
    """Every checkpoint file on disk is complete: it loads with weights_only=True and holds a full state."""
    loaded = []
    for path in sorted(glob.glob(os.path.join(out, "checkpoint*.pth"))):
        checkpoint = torch.load(path, weights_only=True)
        assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(checkpoint), path
        loaded.append(checkpoint)
    return loaded


def one_line_error(main: Callable[[list[str]], Any], argv: list[str], capsys: Any) -> str:
    """Runs ``main`` as its script does; returns the single error line after checking status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    return errors[0]
