"""main_dino.py's configuration, decided once: the flags are parsed over a recipe file (``--config``), then every
default that depends on other flags or on the machine is resolved and every value checked, into one frozen
:class:`TrainConfig`. Nothing downstream changes it; what a checkpoint saves as ``args`` is :meth:`TrainConfig.to_dict`.
"""
from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.demo import default_cache_dir
from ..errors import UserError
from ..models.config import ModelConfig
from .flags import get_args_parser

# Recipes ship with the repository: ``--config NAME`` finds configs/NAME.yaml.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs"
DEMO_RECIPE = "demo"
# Flags a recipe cannot set: which recipe to read, and the switch that picks the demo's.
_NOT_IN_RECIPES = ("config_file", "demo")
DINO_LOCAL_CROP_SIZE = 96
# The DINO head's shape; with the model's tensor flags, what a checkpoint's tensors depend on.
HEAD_FLAGS = ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is, every value decided (see :func:`resolve_config`). Field names are the flags'."""
    model: ModelConfig
    # DINO head and loss
    out_dim: int
    norm_last_layer: bool
    momentum_teacher: float
    use_bn_in_head: bool
    head_hidden_dim: int
    head_bottleneck_dim: int
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_epochs: int
    # optimisation
    precision: str  # fp32, fp16 (with a GradScaler) or bf16
    weight_decay: float
    weight_decay_end: float
    clip_grad: float
    batch_size_per_gpu: int
    accum_steps: int
    epochs: int
    freeze_last_layer: int
    lr: float
    warmup_epochs: int
    min_lr: float
    optimizer: str
    drop_path_rate: float
    compile: bool
    # multi-crop
    global_crops_scale: tuple[float, float]
    local_crops_number: int
    local_crops_scale: tuple[float, float]
    global_crop_size: int
    local_crop_size: int
    augment_device: str  # pil, cpu or cuda
    # data, output and start
    data_path: str
    output_dir: str
    saveckp_freq: int
    init_from: str | None
    init_from_key: str
    freeze_blocks: int | None  # blocks frozen (a retrofit); None: nothing frozen
    unfreeze_at: int | None  # the epoch that ends the freeze (continued training's second stage)
    backbone_lr: float
    unfreeze_warmup: int
    layerwise_decay: float
    seed: int
    num_workers: int
    log_freq: int
    viz_freq: int
    device: str  # cpu, cuda or cuda:N
    dist_url: str
    dist_timeout: float | None
    local_rank: int
    # end-of-training k-NN and the demo
    knn_data_path: str | None
    demo: bool
    demo_data_dir: str | None  # the demo set's folder (generated on first use); None unless the demo trains on it
    demo_num_images: int
    config_file: str | None
    # defaults decided for this run that the log announces (e.g. a retrofit's); not part of the saved args
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    @property
    def knn_view(self) -> tuple[int, int]:
        """(resize, crop) sides of the end-of-training k-NN: DINO's evaluation view (256/224) of the global crops."""
        return round(self.global_crop_size * 256 / 224), self.global_crop_size

    def images_per_step(self, world_size: int) -> int:
        """The effective batch: images of one optimizer step over all processes."""
        return self.batch_size_per_gpu * self.accum_steps * world_size

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, model flags flattened in: a checkpoint's ``args``, from which the
        evaluations rebuild the model (``torch.load(weights_only=True)`` reads it)."""
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in ("model", "notes")}
        return {**self.model.flags(), **{name: list(value) if isinstance(value, tuple) else value
                                         for name, value in values.items()}}

    def architecture(self) -> dict[str, Any]:
        """The flags this run's tensors depend on (model and head): resuming compares them with
        :func:`saved_architecture` of the checkpoint's."""
        return {**self.model.tensor_flags(), **{name: getattr(self, name) for name in HEAD_FLAGS}}


def saved_architecture(saved_args: Mapping[str, Any]) -> dict[str, Any]:
    """The tensor flags a checkpoint's saved args describe, with what they left to defaults decided as for a run."""
    return {**ModelConfig.resolve({}, saved=saved_args).tensor_flags(),
            **{name: saved_args[name] for name in HEAD_FLAGS if name in saved_args}}


def recipe_path(name: str) -> Path:
    """The recipe ``--config`` names: a path, or the name of a file in configs/ (``vits16_1gpu``)."""
    path = Path(name)
    if not path.suffix and len(path.parts) == 1:
        path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(recipe.stem for recipe in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"--config {name}: no such recipe file (the recipes in {RECIPES_DIR}: {known})")
    return path


def read_recipe(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flag values of a recipe file, each converted and checked as argparse checks it on the command line."""
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable YAML recipe ({reason})") from None
    if not isinstance(recipe, Mapping):
        raise UserError(f"{path} must map flag names to values, got a {type(recipe).__name__}")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", *_NOT_IN_RECIPES)}
    values = {}
    for key, value in recipe.items():
        action = actions.get(str(key))
        if action is None:
            close = difflib.get_close_matches(str(key), actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}: unknown key {key!r}{hint}; a recipe's keys are main_dino.py's flags without "
                            f"the dashes")
        values[action.dest] = _convert(action, value, f"{path}: {key}")
    return values


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A recipe's ``value`` as argparse would have turned the same words on the command line."""
    def one(item: Any) -> Any:
        if item is None:
            raise UserError(f"{where}: null is not a value (leave the key out for the default)")
        try:
            converted = action.type(str(item)) if action.type is not None else item
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            raise UserError(f"{where}: {error or f'invalid value {item!r}'}") from None
        if action.choices is not None and converted not in action.choices:
            raise UserError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        return converted

    if isinstance(action.nargs, int) or action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise UserError(f"{where}: expected {action.nargs} values, got {len(items)}")
        return [one(item) for item in items]
    if isinstance(value, list):
        raise UserError(f"{where}: expected one value, got a list")
    return one(value)


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
               ) -> argparse.Namespace:
    """The flags of ``argv`` over the recipe they name (``--config``; ``--demo`` without one: configs/demo.yaml):
    the recipe replaces the defaults and explicit flags still win."""
    parser = parser or get_args_parser()
    args = parser.parse_args(argv)
    recipe = args.config_file or (DEMO_RECIPE if args.demo else None)
    if recipe is None:
        return args
    path = recipe_path(recipe)
    parser.set_defaults(**read_recipe(path, parser))
    args = parser.parse_args(argv)
    args.config_file = str(path)
    return args


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """main_dino.py's command line to its config."""
    return resolve_config(parse_args(argv))


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags (other attributes of ``args``, such as the Slurm launcher's, are
    ignored): every default decided and every value checked, a bad one as a one-line :class:`UserError`."""
    notes: list[str] = []
    model = ModelConfig.resolve(vars(args), retrofit=args.freeze_blocks is not None, notes=notes)
    device = _device(args.device)
    values = {item.name: getattr(args, item.name) for item in fields(TrainConfig)
              if item.name not in ("model", "notes") and hasattr(args, item.name)}
    patch = model.patch_size
    # --demo trains on the generated demo set unless --data_path names other images
    demo_root = (os.path.abspath(args.demo_data_dir or os.path.join(default_cache_dir(), "demo"))
                 if args.demo and not args.data_path else None)
    values.update(
        precision=resolve_precision(args.precision, args.use_fp16, device),
        augment_device=device.split(":")[0] if args.augment_device == "auto" else args.augment_device,
        device=device,
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_scale=tuple(args.local_crops_scale),
        local_crop_size=args.local_crop_size or max(patch, round(DINO_LOCAL_CROP_SIZE / patch) * patch),
        freeze_blocks=model.encoder_blocks if args.freeze_blocks == "all" else args.freeze_blocks,
        demo_data_dir=demo_root,
        data_path=args.data_path or (os.path.join(demo_root, "train") if demo_root else None),
        knn_data_path=args.knn_data_path or demo_root,
    )
    config = TrainConfig(model=model, notes=tuple(notes), **values)
    _check(config)
    return config


def _device(requested: str) -> str:
    """``--device`` with auto decided: cuda where a GPU is visible, else cpu."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was asked for but CUDA is not available")
    return requested


def resolve_precision(precision: str, use_fp16: bool | None, device: str | torch.device) -> str:
    """``fp32``, ``fp16`` or ``bf16`` from ``--precision`` (and the reference's ``--use_fp16``) on ``device``.

    ``auto`` takes bf16 only where it is native: CUDA GPUs that compute in bf16 (Ampere and later; V100 and T4
    only emulate it, so they get fp16 + GradScaler as in the reference) and CPUs with AVX512-BF16 or AMX
    (elsewhere emulated bf16 matmuls are several times slower than fp32).
    """
    device = str(device)
    cuda = device.startswith("cuda")
    if precision == "auto" and use_fp16 is not None:
        precision = "fp16" if use_fp16 else "fp32"
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else ("fp16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 (or --use_fp16 true) needs a CUDA GPU; on CPU use --precision bf16 or fp32")
    return precision


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 natively rather than emulating it."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _check(config: TrainConfig) -> None:
    """Values that cannot work, as one-line errors before anything starts."""
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    check(0 <= config.momentum_teacher <= 1, f"--momentum_teacher must be in [0, 1], got {config.momentum_teacher}")
    check(config.teacher_temp > 0 and config.warmup_teacher_temp > 0, "teacher temperatures must be > 0")
    check(config.lr > 0, f"--lr must be > 0, got {config.lr}")
    check(config.min_lr >= 0, f"--min_lr must be >= 0, got {config.min_lr}")
    check(config.clip_grad >= 0, f"--clip_grad must be >= 0, got {config.clip_grad}")
    check(0 <= config.drop_path_rate < 1, f"--drop_path_rate must be in [0, 1), got {config.drop_path_rate}")
    check(config.dist_timeout is None or config.dist_timeout > 0,
          f"--dist_timeout must be > 0, got {config.dist_timeout}")
    check(bool(config.data_path), "no data given: pass --data_path FOLDER (or --demo for the built-in demo data)")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(config, name)
        check(0 < low <= high <= 1, f"--{name} must satisfy 0 < min <= max <= 1, got {low} {high}")
    for name in ("global_crop_size", "local_crop_size"):
        check(getattr(config, name) % config.model.patch_size == 0,
              f"--{name} {getattr(config, name)} is not a multiple of --patch_size {config.model.patch_size}")
    check(config.model.readout_replace_blocks < config.model.depth,
          f"--readout_replace_blocks {config.model.readout_replace_blocks} leaves no block of --depth "
          f"{config.model.depth}")
    blocks = config.model.encoder_blocks
    check(config.freeze_blocks is None or 0 <= config.freeze_blocks <= blocks,
          f"--freeze_blocks {config.freeze_blocks} is out of range: this model keeps {blocks} blocks before its "
          f"read-out (0 to {blocks}, or all)")
    if config.unfreeze_at is not None:
        check(config.freeze_blocks is not None, "--unfreeze_at ends a freeze: it needs --freeze_blocks")
        check(config.unfreeze_at < config.epochs, f"--unfreeze_at {config.unfreeze_at} is not before the end of "
              f"training (--epochs {config.epochs}): the backbone would never train")
    check(config.backbone_lr > 0, f"--backbone_lr must be > 0, got {config.backbone_lr}")
    check(0 < config.layerwise_decay <= 1, f"--layerwise_decay must be in (0, 1], got {config.layerwise_decay}")
    if config.knn_data_path and config.knn_data_path != config.demo_data_dir:  # the demo's is generated later
        for split in ("train", "val"):  # checked now, not after hours of training
            check(os.path.isdir(os.path.join(config.knn_data_path, split)),
                  f"--knn_data_path {config.knn_data_path} has no {split}/ folder")
