"""Flags shared by the evaluation scripts and the frozen backbone they evaluate."""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Any

from ..checkpoint import summarise_keys, load_checkpoint_file, load_weights, select_state_dict, strip_prefixes
from ..cli import UserError, add_model_args, build_model_from_config, positive_int, resolve_model_config
from ..models import ARCHS, VisionTransformer


def add_common_eval_args(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    """Flags both evaluations take, with the reference's names and defaults, plus the model flags, which
    default to the checkpoint's saved args."""
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
    parser.add_argument("--slots", default=None,
                        help="comma-separated SPARO slot indices, e.g. 3,17,42: evaluate only these slots of the "
                        "encoding (renormalised as a whole)")
    parser.add_argument("--dist_url", default="env://",
                        help="ignored, for compatibility: torchrun's environment variables set up the process group")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    add_model_args(parser, from_checkpoint=True)


MODEL_FLAGS = ("arch", "patch_size", "depth", "readout", "sparo_slots", "sparo_slot_dim", "sparo_attn_dim",
               "sparo_share_kv", "sparo_slot_norm", "sparo_replace_blocks", "pos_embed_interpolation")


def load_frozen_backbone(args: argparse.Namespace, log: bool = True) -> tuple[VisionTransformer, dict[str, Any]]:
    """The backbone ``args.pretrained_weights`` describes, with its weights, frozen and in eval mode.

    The architecture comes from explicit flags, else the checkpoint's saved ``args``, else the defaults. A
    DINO-format checkpoint without saved args and without SPARO weights is evaluated with the CLS read-out
    unless ``--readout`` is given. Every parameter must come from the checkpoint: a missing or mis-shaped
    tensor is a :class:`UserError` naming what differs, since evaluating partly random weights is never meant.
    """
    path = args.pretrained_weights
    if not path:
        raise UserError("--pretrained_weights is required (there is no download of official weights)")
    checkpoint = load_checkpoint_file(path)
    state_dict = strip_prefixes(select_state_dict(checkpoint, args.checkpoint_key, path))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    saved_args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    saved_args = saved_args if isinstance(saved_args, Mapping) else None
    flags = {name: getattr(args, name, None) for name in MODEL_FLAGS}
    if saved_args is None and flags["readout"] is None and not any(k.startswith("sparo.") for k in state_dict):
        flags["readout"] = "cls"
        if log:
            print(f"{path} has no saved args and no SPARO weights: evaluating it as a DINO model with the CLS "
                  f"read-out (pass --readout to override)", flush=True)
    if saved_args is None:
        flags = _infer_from_weights(state_dict, flags)
    config = resolve_model_config(flags, saved_args)
    if saved_args is None and flags["depth"] is None:
        config["depth"] = _depth_of(state_dict, config)
    model = build_model_from_config(config)
    report = load_weights(model, state_dict, "backbone")
    if report.missing:
        unused = summarise_keys(report.unused) or "none"
        raise UserError(f"{path} (key {args.checkpoint_key!r}) does not hold weights for this architecture "
                        f"({config['arch']}, depth {config['depth']}, read-out {config['readout']}): missing "
                        f"{summarise_keys(report.missing)}; unused from the checkpoint: {unused}")
    if log:
        described = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"loaded {len(report.loaded)} tensors from {path} (key {args.checkpoint_key!r}); model: {described}",
              flush=True)
        if report.unused:
            print(f"unused from the checkpoint: {summarise_keys(report.unused)}", flush=True)
    model.requires_grad_(False)
    model.eval()
    return model, config


def _infer_from_weights(state_dict: Mapping[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Fills --arch and --patch_size the user left out from the tensor shapes of a checkpoint without saved
    args (as DINO's official ones are), so they need not be retyped either."""
    inferred = dict(flags)
    cls_token, patch_weight = state_dict.get("cls_token"), state_dict.get("patch_embed.proj.weight")
    if inferred["arch"] is None and cls_token is not None:
        widths = {spec["embed_dim"]: name for name, spec in ARCHS.items()}
        inferred["arch"] = widths.get(int(cls_token.shape[-1]))
    if inferred["patch_size"] is None and patch_weight is not None and patch_weight.ndim == 4:
        inferred["patch_size"] = int(patch_weight.shape[-1])
    return inferred


def _depth_of(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> int:
    """Depth before any SPARO replacement, read from the block indices of a checkpoint without saved args."""
    indices = [int(match.group(1)) for key in state_dict if (match := re.match(r"^blocks\.(\d+)\.", key))]
    if not indices:
        return config["depth"]
    remaining = max(indices) + 1
    return remaining + (config["sparo_replace_blocks"] if config["readout"] == "sparo" else 0)


def check_eval_args(args: argparse.Namespace, config: Mapping[str, Any]) -> None:
    """Checks that need the resolved model: a crop the patch embedding would silently truncate, etc."""
    if args.crop_size % config["patch_size"]:
        raise UserError(f"--crop_size {args.crop_size} is not a multiple of the patch size {config['patch_size']}")
    if args.resize_size < args.crop_size:
        raise UserError(f"--resize_size {args.resize_size} is smaller than --crop_size {args.crop_size}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
