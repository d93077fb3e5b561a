"""The architecture flags every script takes (``--arch``, ``--readout``, each read-out's options, ...). They all
default to None, meaning "not given": :class:`~.config.ModelConfig` decides the value (for the evaluations, from
the checkpoint first), so an evaluation never needs them retyped."""
from __future__ import annotations

import argparse
from typing import Any

from ..cli import ARCH_ALIASES, BARE_IS_TRUE, bool_flag, non_negative_int, positive_int
from .config import BACKBONE_DEFAULTS, canonical_arch
from .readouts import ARCHITECTURE, READOUTS
from .vision_transformer import ARCHS, POS_EMBED_INTERPOLATIONS


def arch_name(value: str) -> str:
    """argparse type for ``--arch``: a ViT of :data:`ARCHS`, or one of DINO's DeiT aliases for them."""
    arch = canonical_arch(value)
    if arch not in ARCHS:
        raise argparse.ArgumentTypeError(
            f"unknown or unsupported arch {value!r}: choose from {', '.join([*ARCHS, *ARCH_ALIASES])} (DINO's xcit "
            f"and torchvision architectures are not supported: the read-out replaces ViT blocks)")
    return arch

def add_model_args(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """Adds the architecture flags and the read-outs' options. With ``from_checkpoint`` (the evaluations) only those
    that tensors depend on, and the help says that the checkpoint's saved value comes first."""
    def default(value: Any) -> str:
        return f" (default: the checkpoint's, else {value})" if from_checkpoint else f" (default: {value})"

    group = parser.add_argument_group("architecture")
    group.add_argument("--arch", type=arch_name, default=None, metavar="{" + ",".join(ARCHS) + "}",
                       help="DINO's ViT sizes (deit_tiny/deit_small accepted as aliases), DINOv2's backbones "
                       "(LayerScale, patch 14; _reg: 4 registers) or DINOv3's (RoPE, 4 storage tokens)"
                       + default(BACKBONE_DEFAULTS["arch"]))
    group.add_argument("--patch_size", type=positive_int, default=None,
                       help="patch size in pixels (16 or 8 for DINO's archs, 14 for DINOv2's); with < 16 prefer "
                       "--precision bf16 or fp32" + default("the arch's: 16, 14 for dinov2_*"))
    group.add_argument("--depth", type=positive_int, default=None,
                       help="transformer blocks before any is replaced by the read-out"
                       + default("the arch's: 12; ViT-L 24, ViT-g 40"))
    group.add_argument("--readout", choices=tuple(READOUTS), default=None,
                       help="; ".join(f"{name}: {readout.summary}" for name, readout in READOUTS.items())
                       + default(BACKBONE_DEFAULTS["readout"]))
    group.add_argument("--readout_replace_blocks", type=non_negative_int, default=None,
                       help="final blocks the read-out replaces; 0 puts it on top of every block"
                       + default("the read-out's: " + ", ".join(f"{name} {readout.replaced_blocks}"
                                                                for name, readout in READOUTS.items())))
    group.add_argument("--num_registers", type=non_negative_int, default=None,
                       help="learned register tokens after the CLS token (Darcet et al., 2024), dropped at the output"
                       + default("the arch's: 0; 4 for dinov2_*_reg and dinov3_*"))
    group.add_argument("--readout_sees_registers", type=bool_flag, **BARE_IS_TRUE, default=None,
                       help="let the read-out attend to the registers too (by default it reads CLS and patches)"
                       + default(BACKBONE_DEFAULTS["readout_sees_registers"]))
    group.add_argument("--pos_embed_interpolation", choices=POS_EMBED_INTERPOLATIONS, default=None,
                       help="resampling of position embeddings for other image sizes: dino (reference, bicubic, "
                       "no antialias) or timm (antialiased)" + default(BACKBONE_DEFAULTS["pos_embed_interpolation"]))
    for readout in READOUTS.values():
        options = [option for option in readout.options if not from_checkpoint or option.role == ARCHITECTURE]
        if not options:
            continue
        group = parser.add_argument_group(f"{readout.name} read-out")
        for option in options:
            shown = "derived" if option.derived is not None else option.default
            if option.retrofit_default is not None and not from_checkpoint:
                shown = f"{shown}; {option.retrofit_default} with --freeze_blocks"
            extra = BARE_IS_TRUE if option.type is bool_flag else {}
            group.add_argument(f"--{option.flag}", type=option.type, default=None, **extra,
                               help=option.help + default(shown))
