"""The one source of a backbone's architecture: its flags and their defaults, resolving them from explicit flags,
a checkpoint's saved args or its weights, and building the model (with or without pretrained weights).

Defaults are read off :class:`VisionTransformer`'s signature, so a new architecture option is added in one place
(the constructor) plus its flag in :func:`add_model_args`.
"""
from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..checkpoint import load_pretrained_weights, read_weights, summarise_keys
from ..cli import bool_flag, positive_int
from ..errors import UserError
from .vision_transformer import ARCHS, POS_EMBED_INTERPOLATIONS, READOUTS, VisionTransformer

# Architecture flags, in the order they are printed; all but ``arch`` are VisionTransformer arguments.
MODEL_FLAGS = ("arch", "patch_size", "depth", "readout", "sparo_slots", "sparo_slot_dim", "sparo_attn_dim",
               "sparo_share_kv", "sparo_slot_norm", "sparo_logit_scale", "sparo_replace_blocks",
               "pos_embed_interpolation", "sparo_query_init_std", "sparo_key_init_gain")
# Flags that only set the initialisation: no tensor depends on them, so resuming with other values is fine.
INIT_ONLY_FLAGS = ("sparo_query_init_std", "sparo_key_init_gain")
_SIGNATURE = inspect.signature(VisionTransformer.__init__).parameters
MODEL_DEFAULTS: dict[str, Any] = {"arch": "vit_small", **{name: _SIGNATURE[name].default for name in MODEL_FLAGS[1:]}}
# The DINO head's shape; with the backbone's flags these are what a checkpoint's tensors depend on.
HEAD_FLAGS = ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head")

# facebookresearch/dino renames these to the ViTs they are.
ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}


def arch_name(value: str) -> str:
    """argparse type for ``--arch``: a ViT of :data:`ARCHS`, or one of DINO's DeiT aliases for them."""
    value = ARCH_ALIASES.get(value, value)
    if value not in ARCHS:
        raise argparse.ArgumentTypeError(
            f"unknown or unsupported arch {value!r}: choose from {', '.join([*ARCHS, *ARCH_ALIASES])} (DINO's xcit "
            f"and torchvision architectures are not supported: SPARO replaces a ViT block)")
    return value


def add_model_args(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """Adds the architecture flags. With ``from_checkpoint`` they default to None, meaning "as saved in the
    checkpoint" (see :func:`resolve_model_config`), so an evaluation never needs them retyped."""
    def default(name: str) -> Any:
        return None if from_checkpoint else MODEL_DEFAULTS[name]

    def shown(name: str) -> str:
        fallback = MODEL_DEFAULTS[name]
        return f" (default: the checkpoint's, else {fallback})" if from_checkpoint else f" (default: {fallback})"

    group = parser.add_argument_group("architecture")
    group.add_argument("--arch", type=arch_name, default=default("arch"), metavar="{" + ",".join(ARCHS) + "}",
                       help="ViT size; DINO's deit_tiny/deit_small are accepted as aliases" + shown("arch"))
    group.add_argument("--patch_size", type=positive_int, default=default("patch_size"),
                       help="patch size in pixels, 16 or 8; with < 16 prefer --precision bf16 or fp32"
                       + shown("patch_size"))
    group.add_argument("--depth", type=positive_int, default=default("depth"),
                       help="transformer blocks before any is replaced by SPARO" + shown("depth"))
    group.add_argument("--readout", choices=READOUTS, default=default("readout"),
                       help="sparo: SPARO slots replace the last block(s); cls: DINO's CLS token; gap: mean of "
                       "patch tokens" + shown("readout"))
    group.add_argument("--sparo_slots", type=positive_int, default=default("sparo_slots"),
                       help="L, number of SPARO slots" + shown("sparo_slots"))
    group.add_argument("--sparo_slot_dim", type=positive_int, default=default("sparo_slot_dim"),
                       help="V, output size of each slot" + shown("sparo_slot_dim"))
    group.add_argument("--sparo_attn_dim", type=positive_int, default=None,
                       help="H, key/query size of each slot (default: the checkpoint's, else embed_dim / heads)")
    group.add_argument("--sparo_share_kv", type=bool_flag, default=default("sparo_share_kv"),
                       help="use the keys as values" + shown("sparo_share_kv"))
    group.add_argument("--sparo_slot_norm", type=bool_flag, default=default("sparo_slot_norm"),
                       help="L2-normalise each slot, scaled by sqrt(1/L)" + shown("sparo_slot_norm"))
    group.add_argument("--sparo_logit_scale", type=bool_flag, default=default("sparo_logit_scale"),
                       help="a learnable temperature per slot multiplying its attention logits, starting at 1"
                       + shown("sparo_logit_scale"))
    if not from_checkpoint:
        group.add_argument("--sparo_query_init_std", type=float, default=MODEL_DEFAULTS["sparo_query_init_std"],
                           help="std of the queries' N(0, std) initialisation (with the key gain it sets the initial "
                           "attention temperature)" + shown("sparo_query_init_std"))
        group.add_argument("--sparo_key_init_gain", type=float, default=MODEL_DEFAULTS["sparo_key_init_gain"],
                           help="gain of the key projection's xavier-uniform initialisation (the paper: 1; 4 lets "
                           "the slots separate within short schedules)" + shown("sparo_key_init_gain"))
    group.add_argument("--sparo_replace_blocks", type=positive_int, default=default("sparo_replace_blocks"),
                       help="final blocks removed for SPARO" + shown("sparo_replace_blocks"))
    group.add_argument("--pos_embed_interpolation", choices=POS_EMBED_INTERPOLATIONS,
                       default=default("pos_embed_interpolation"),
                       help="resampling of position embeddings for other image sizes: dino (reference, bicubic, "
                       "no antialias) or timm (antialiased)" + shown("pos_embed_interpolation"))


def resolve_model_config(flags: argparse.Namespace | Mapping[str, Any], saved: Mapping[str, Any] | None = None,
                         weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model config: each flag given explicitly, else the checkpoint's saved args, else (for checkpoints
    without saved args, as DINO's official ones) what the backbone ``weights`` show, else the default."""
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    config = {name: given.get(name) for name in MODEL_FLAGS}
    if saved is not None:
        config = {name: saved.get(name) if value is None else value for name, value in config.items()}
    elif weights is not None:
        config = _infer_from_weights(weights, config)
    config = {name: MODEL_DEFAULTS[name] if value is None else value for name, value in config.items()}
    config["arch"] = ARCH_ALIASES.get(config["arch"], config["arch"])
    return config


def _infer_from_weights(weights: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Fills flags left out from tensor shapes: arch from the width, patch size from the patch embedding, the
    CLS read-out when there are no SPARO tensors, and the depth from the block indices."""
    inferred = dict(config)
    cls_token, patch_weight = weights.get("cls_token"), weights.get("patch_embed.proj.weight")
    if inferred["arch"] is None and cls_token is not None:
        widths = {spec["embed_dim"]: name for name, spec in ARCHS.items()}
        inferred["arch"] = widths.get(int(cls_token.shape[-1]))
    if inferred["patch_size"] is None and patch_weight is not None and patch_weight.ndim == 4:
        inferred["patch_size"] = int(patch_weight.shape[-1])
    if inferred["readout"] is None and not any(key.startswith("sparo.") for key in weights):
        inferred["readout"] = "cls"
    indices = [int(match.group(1)) for key in weights if (match := re.match(r"^blocks\.(\d+)\.", key))]
    if inferred["depth"] is None and indices:
        readout = inferred["readout"] or MODEL_DEFAULTS["readout"]
        replaced = inferred["sparo_replace_blocks"] or MODEL_DEFAULTS["sparo_replace_blocks"]
        inferred["depth"] = max(indices) + 1 + (replaced if readout == "sparo" else 0)
    return inferred


def build_backbone(config: Mapping[str, Any] | None = None, drop_path_rate: float = 0.0,
                   **overrides: Any) -> VisionTransformer:
    """The backbone a model config describes (missing entries take :data:`MODEL_DEFAULTS`, ``overrides`` win);
    an impossible combination is a :class:`UserError`."""
    config = {**MODEL_DEFAULTS, **(config or {}), **overrides}
    arch = ARCH_ALIASES.get(config["arch"], config["arch"])
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    kwargs = {name: config[name] for name in MODEL_FLAGS[1:]}
    try:
        return VisionTransformer(**ARCHS[arch], drop_path_rate=drop_path_rate, **kwargs)
    except ValueError as error:
        raise UserError(str(error)) from None


def architecture_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The flags a training checkpoint's tensors depend on (backbone and head), as resuming compares them."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    config = {name: value for name, value in resolve_model_config(given).items() if name not in INIT_ONLY_FLAGS}
    return {**config, **{name: given[name] for name in HEAD_FLAGS}}


def build_pretrained_backbone(path: str, checkpoint_key: str, flags: argparse.Namespace | Mapping[str, Any],
                              log: Callable[[str], None] | None = print) -> tuple[VisionTransformer, dict[str, Any]]:
    """The frozen backbone (eval mode, no gradients) of ``path``, every parameter loaded from it.

    The architecture comes from explicit ``flags``, else the checkpoint's saved args, else its weights: a
    DINO-format checkpoint without SPARO tensors is evaluated with the CLS read-out unless ``--readout`` says
    otherwise. A missing or mis-shaped tensor is a :class:`UserError`: evaluating partly random weights is
    never meant.
    """
    if not path:
        raise UserError("--pretrained_weights is required (there is no download of official weights)")
    weights = read_weights(path, checkpoint_key)
    config = resolve_model_config(flags, weights.saved_args, weights.backbone)
    if weights.saved_args is None and log is not None:
        log(f"{path} has no saved args: the architecture comes from its weights ({config['arch']}/"
            f"{config['patch_size']}, depth {config['depth']}, {config['readout'].upper()} read-out; flags override)")
    model = build_backbone(config)
    described = ", ".join(f"{name}={value}" for name, value in config.items())
    report = load_pretrained_weights(model, weights, strict=True, verbose=False, architecture=described)
    if log is not None:
        log(f"loaded {len(report.loaded)} tensors from {path} (key {checkpoint_key!r}); model: {described}")
        if report.unused:
            log(f"unused from the checkpoint: {summarise_keys(report.unused)}")
    model.requires_grad_(False)
    model.eval()
    return model, config
