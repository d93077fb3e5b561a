"""Flags both evaluation scripts take (the reference's names and defaults), and the checks that need the model."""
from __future__ import annotations

import argparse

from ..cli import flag_names, positive_int, slot_list
from ..errors import UserError
from ..models.config import ModelConfig
from ..models.flags import add_model_args


def add_common_eval_args(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    """Adds the flags eval_knn.py and eval_linear.py share, plus the model flags, which default to the
    checkpoint's saved args."""
    parser.add_argument("--pretrained_weights", required=True,
                        help="checkpoint to evaluate: this project's checkpoint.pth or a DINO-format one "
                        "(teacher/student dicts or a bare backbone state dict)")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help="which weights of the checkpoint to evaluate: teacher or student (default: teacher)")
    parser.add_argument("--data_path", required=data_required, default=None,
                        help="folder with train/ and val/, each holding one sub-folder of images per class")
    parser.add_argument("--batch_size_per_gpu", type=positive_int, default=128, help="images per process and batch")
    parser.add_argument("--num_workers", type=int, default=10, help="data-loading processes per process")
    parser.add_argument("--resize_size", type=positive_int, default=256,
                        help="evaluation images are resized (shorter side, bicubic) to this size (default: 256)")
    parser.add_argument("--crop_size", type=positive_int, default=224,
                        help="then centre-cropped to this size, a multiple of the patch size (default: 224)")
    parser.add_argument("--slots", type=slot_list, default=None,
                        help="comma-separated SPARO slot indices, e.g. 3,17,42: evaluate only these slots of the "
                        "encoding (renormalised as a whole)")
    parser.add_argument("--dist_url", default="env://",
                        help="ignored, for compatibility: torchrun's environment variables set up the process group")
    parser.add_argument(*flag_names("--local_rank"), type=int, default=0, help=argparse.SUPPRESS)
    add_model_args(parser, from_checkpoint=True)


def resolve_num_labels(requested: int | None, classes: int) -> int:
    """``--num_labels`` (the linear layer's outputs), by default the number of classes in train/; never fewer."""
    num_labels = classes if requested is None else requested
    if num_labels < classes:
        raise UserError(f"--num_labels {num_labels} is smaller than the {classes} classes of train/")
    return num_labels


def check_eval_args(args: argparse.Namespace, config: ModelConfig) -> None:
    """Checks that need the resolved model: a crop the patch embedding would silently truncate, etc."""
    if args.crop_size % config.patch_size:
        raise UserError(f"--crop_size {args.crop_size} is not a multiple of the patch size {config.patch_size}")
    if args.resize_size < args.crop_size:
        raise UserError(f"--resize_size {args.resize_size} is smaller than --crop_size {args.crop_size}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
