"""Shared test helpers: tiny models, generated image folders and checkpoints, and running the real scripts as
subprocesses that can neither hang a test nor outlive it (each in its own process group, killed as a group when
the test is done with it, so torchrun and DataLoader workers go too; every wait has a deadline)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.processes import free_port as free_port  # process control, re-exported for the tests
from benchmarks.processes import kill_tree as kill_tree
from benchmarks.processes import run_with_timeout
from benchmarks.processes import wait_until as wait_until
from dino_sparo.errors import run_cli
from dino_sparo.models import DINOHead, ModelConfig, MultiCropWrapper, build_backbone
from dino_sparo.train.config import TrainConfig, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# main_dino.py's flags of a tiny, fast run on 32 px crops: the tests' recipe file.
TINY = ["--config", os.path.join(ROOT, "tests", "fixtures", "tiny.yaml")]


def make_images(folder, count: int = 12, size: int = 40) -> str:
    """``count`` random-noise PNGs directly in ``folder`` (an unlabelled, flat folder)."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:03d}.png"))
    return str(folder)


def tiny_config(data, out, *extra) -> TrainConfig:
    """main_dino.py's config for a tiny run on ``data`` writing to ``out``."""
    return parse_config(TINY + ["--data_path", str(data), "--output_dir", str(out), *map(str, extra)])


# Model flags of a tiny SPARO model (the rest take their defaults).
TINY_MODEL = dict(arch="vit_tiny", patch_size=8, depth=3, readout="sparo", sparo_slots=6, sparo_slot_dim=16)


def backbone_of(**flags: Any):
    """A freshly initialised backbone of these model flags (the rest take their defaults)."""
    return build_backbone(ModelConfig.resolve(flags))


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
    config = ModelConfig.resolve({**TINY_MODEL, **model_overrides}).flags()
    torch.manual_seed(seed)
    backbone = build_backbone(ModelConfig.resolve(config))
    teacher = MultiCropWrapper(backbone, DINOHead(backbone.feature_dim, 256, hidden_dim=64, bottleneck_dim=32))
    student_state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in teacher.state_dict().items()}
    args = dict(config, out_dim=256, lr=0.0005, epochs=1, data_path="/nowhere", output_dir=os.path.dirname(path),
                global_crops_scale=[0.4, 1.0])
    checkpoint = {"student": student_state, "teacher": teacher.state_dict(),
                  "optimizer": {"state": {}, "param_groups": []}, "epoch": 1, "args": args, "world_size": 1,
                  "dino_loss": {"center": torch.zeros(1, 256)}}
    torch.save(checkpoint, path)
    return config




def script(name: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name)]


FAULTS = os.path.join(ROOT, "tests", "faults")


def environment(fault: str | None = None, fault_rank: int | None = None, fault_once: str | None = None,
                compile_backend: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a script run by a test: the repository importable, no launcher variables of the
    test's own process, and with ``fault`` (or ``compile_backend``) the hooks of ``tests/faults/sitecustomize.py``
    armed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DINO_SPARO_FAULT",
                 "DINO_SPARO_FAULT_RANK", "DINO_SPARO_FAULT_ONCE", "DINO_SPARO_COMPILE_BACKEND"):
        if name not in extra:
            env.pop(name, None)
    if compile_backend:
        env.update(PYTHONPATH=os.pathsep.join([FAULTS, ROOT]), DINO_SPARO_COMPILE_BACKEND=compile_backend)
    if fault:
        env.update(PYTHONPATH=os.pathsep.join([FAULTS, ROOT]), DINO_SPARO_FAULT=fault)
        if fault_rank is not None:
            env["DINO_SPARO_FAULT_RANK"] = str(fault_rank)
        if fault_once:
            env["DINO_SPARO_FAULT_ONCE"] = fault_once
    return env


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


class GlooPair:
    """Two long-lived processes (spawned once per test session) that run a function as ranks 0 and 1 of a fresh
    gloo process group at each :meth:`run`: the multi-process tests share them instead of each paying for two new
    interpreters that import torch."""

    def __init__(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.executor = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))

    def run(self, function: Callable[..., Any], *args: Any, timeout: float = 180) -> list[Any]:
        """``[function(0, 2, *args), function(1, 2, *args)]``, each called inside its rank's process group."""
        port = free_port()
        futures = [self.executor.submit(_run_rank, function, rank, port, args) for rank in range(2)]
        return [future.result(timeout=timeout) for future in futures]  # a hang fails the test, not CI

    def close(self) -> None:
        for process in list(getattr(self.executor, "_processes", {}).values()):
            process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _run_rank(function: Callable[..., Any], rank: int, port: int, args: tuple) -> Any:
    import torch.distributed as dist

    # the variables torchrun sets, for code that joins the group through dino_sparo.distributed (it reuses this one)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        return function(rank, 2, *args)
    finally:
        if dist.is_initialized():  # the entry points destroy the group they used on their way out
            dist.destroy_process_group()


# ---------------------------------------------------------------- released weights, written with random values

def timm_model(name: str, depth: int) -> torch.nn.Module:
    """A timm DINOv2 or DINOv3 model with random weights everywhere (LayerScale and norms far from their initial
    values, so that no part can be skipped unnoticed)."""
    torch.manual_seed(0)
    import timm

    model = timm.create_model(name, pretrained=False, depth=depth, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("gamma") or ("norm" in key and key.endswith("weight")):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.5 if key.endswith(("cls_token", "pos_embed", "reg_token")) else 0.05)
    return model


def official_layout(timm_state: dict[str, torch.Tensor], chunks: int = 1) -> dict[str, torch.Tensor]:
    """The state dict as facebookresearch/dinov2 saves it, written out from timm's documented conversion run
    backwards: ``register_tokens``, a CLS position embedding (timm folds it into ``cls_token`` for register models),
    ``mask_token`` and training checkpoints' chunked blocks."""
    state = {}
    depth = 1 + max(int(m.group(1)) for key in timm_state if (m := re.match(r"blocks\.(\d+)\.", key)))
    per_chunk = -(-depth // chunks)
    for key, value in timm_state.items():
        if (match := re.match(r"blocks\.(\d+)\.(.*)", key)) is not None:
            index, rest = int(match.group(1)), match.group(2)
            key = f"blocks.{index // per_chunk}.{index}.{rest}" if chunks > 1 else f"blocks.{index}.{rest}"
        state[key] = value.clone()
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        cls_position = torch.randn(1, 1, state["pos_embed"].shape[-1])
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def official_dinov3_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as facebookresearch/dinov3 saves it, from timm's conversion run backwards: ``storage_tokens``,
    ``ls1.gamma``, one ``attn.qkv.bias`` with its ``bias_mask`` (the key part masked out), RoPE ``periods``."""
    state = {}
    for key, value in timm_state.items():
        if key.endswith(".attn.q_bias"):
            prefix = key[: -len("q_bias")]
            width = value.shape[0]
            # DINOv3 stores a key bias too, and masks it out: a non-zero one here shows the mask is applied
            state[prefix + "qkv.bias"] = torch.cat([value, torch.randn(width), timm_state[prefix + "v_bias"]])
            state[prefix + "qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
        elif not key.endswith(".attn.v_bias"):
            key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
            state["storage_tokens" if key == "reg_token" else key] = value.clone()
    state["rope_embed.periods"] = torch.rand(16)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state
