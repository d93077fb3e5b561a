"""The one source of a backbone's architecture: its flags and their defaults, resolving them from explicit flags,
a checkpoint's saved args or its weights, and building the model (with or without pretrained weights).

Backbone flags and their defaults are read off :class:`VisionTransformer`'s signature; each read-out's flags are
the :class:`~.readouts.Option` entries its module declares. A new read-out option is therefore one line in its
read-out's module, and a new read-out is its module and its registry line: the parsers, the saved args, the
resume check and the evaluations all follow from here.
"""
from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..checkpoint import load_pretrained_weights, read_weights, summarise_keys
from ..cli import bool_flag, non_negative_int, positive_int
from ..errors import UserError
from .backbone import READOUT_OPTION_DEFAULTS, ReadoutBackbone, replaced_blocks
from .dinov3 import DINOv3VisionTransformer
from .readouts import ARCHITECTURE, INITIALISATION, OPTIMISATION, READOUTS
from .vision_transformer import ARCHS, BACKBONE_KEY_ROOTS, POS_EMBED_INTERPOLATIONS, VisionTransformer

# Backbone flags, in the order they are printed; all but ``arch`` are VisionTransformer arguments.
BACKBONE_FLAGS = ("arch", "patch_size", "depth", "readout", "readout_replace_blocks", "num_registers",
                  "readout_sees_registers", "pos_embed_interpolation")
_READOUT_OPTIONS = [(readout, option) for readout in READOUTS.values() for option in readout.options]
# What a model is built from: the backbone flags and every read-out's architecture and initialisation options.
MODEL_FLAGS = BACKBONE_FLAGS + tuple(option.flag for _, option in _READOUT_OPTIONS if option.role != OPTIMISATION)
# Flags that only set the initialisation: no tensor depends on them, so resuming with other values is fine.
INIT_ONLY_FLAGS = tuple(option.flag for _, option in _READOUT_OPTIONS if option.role == INITIALISATION)
_SIGNATURE = inspect.signature(VisionTransformer.__init__).parameters
MODEL_DEFAULTS: dict[str, Any] = {
    "arch": "vit_small", **{name: _SIGNATURE[name].default for name in BACKBONE_FLAGS[1:]},
    **{flag: READOUT_OPTION_DEFAULTS[flag] for flag in MODEL_FLAGS[len(BACKBONE_FLAGS):]}}
# The DINO head's shape; with the backbone's flags these are what a checkpoint's tensors depend on.
HEAD_FLAGS = ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head")
# Tensors that timm and DINO checkpoints may hold beside the backbone's, which no read-out owns.
_FOREIGN_KEY_ROOTS = ("fc_norm", "norm_pre", "mask_token", "head", "dino_head", "ibot_head")

# facebookresearch/dino renames these to the ViTs they are.
ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}
# Flags whose default the arch sets (DINOv2's: patch 14, depth 24 for ViT-L, 4 registers for the _reg ones).
ARCH_SET_FLAGS = ("patch_size", "depth", "num_registers")


def arch_defaults(arch: str | None) -> dict[str, Any]:
    """:data:`MODEL_DEFAULTS` with the defaults ``arch`` gives its own flags (None: the default arch)."""
    arch = ARCH_ALIASES.get(arch or MODEL_DEFAULTS["arch"], arch or MODEL_DEFAULTS["arch"])
    spec = ARCHS.get(arch)
    return {**MODEL_DEFAULTS, "arch": arch, **(spec.flag_defaults() if spec is not None else {})}


def arch_name(value: str) -> str:
    """argparse type for ``--arch``: a ViT of :data:`ARCHS`, or one of DINO's DeiT aliases for them."""
    value = ARCH_ALIASES.get(value, value)
    if value not in ARCHS:
        raise argparse.ArgumentTypeError(
            f"unknown or unsupported arch {value!r}: choose from {', '.join([*ARCHS, *ARCH_ALIASES])} (DINO's xcit "
            f"and torchvision architectures are not supported: the read-out replaces ViT blocks)")
    return value


def add_model_args(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """Adds the architecture flags and every read-out's flags. With ``from_checkpoint`` (the evaluations) only
    those that tensors depend on, defaulting to None, meaning "as saved in the checkpoint" (see
    :func:`resolve_model_config`), so an evaluation never needs them retyped."""
    def shown(fallback: Any) -> str:
        # Training parsers print their defaults themselves (ArgumentDefaultsHelpFormatter).
        return f" (default: the checkpoint's, else {fallback})" if from_checkpoint else ""

    def default(name: str) -> Any:
        return None if from_checkpoint or name in ARCH_SET_FLAGS else MODEL_DEFAULTS[name]

    def arch_shown(values: str) -> str:
        # The training parser's formatter appends "(default: None)" itself.
        return f" (default: the checkpoint's, else the arch's: {values})" if from_checkpoint else \
            f"; None: the arch's ({values})"

    group = parser.add_argument_group("architecture")
    group.add_argument("--arch", type=arch_name, default=default("arch"), metavar="{" + ",".join(ARCHS) + "}",
                       help="DINO's ViT sizes (deit_tiny/deit_small accepted as aliases), DINOv2's backbones "
                       "(LayerScale, patch 14; _reg: 4 registers) or DINOv3's (RoPE, 4 storage tokens)"
                       + shown("vit_small"))
    group.add_argument("--patch_size", type=positive_int, default=default("patch_size"),
                       help="patch size in pixels (16 or 8 for DINO's archs, 14 for DINOv2's); with < 16 prefer "
                       "--precision bf16 or fp32" + arch_shown("16 for vit_* and dinov3_*, 14 for dinov2_*"))
    group.add_argument("--depth", type=positive_int, default=default("depth"),
                       help="transformer blocks before any is replaced by the read-out"
                       + arch_shown("12; ViT-L 24, ViT-g 40"))
    group.add_argument("--readout", choices=tuple(READOUTS), default=default("readout"),
                       help="; ".join(f"{name}: {readout.summary}" for name, readout in READOUTS.items())
                       + shown(MODEL_DEFAULTS["readout"]))
    group.add_argument("--readout_replace_blocks", "--sparo_replace_blocks", dest="readout_replace_blocks",
                       type=non_negative_int, default=None,
                       help="final blocks the read-out replaces (" + ", ".join(
                           f"{name}: {readout.replaced_blocks}" for name, readout in READOUTS.items())
                       + "); 0 puts it on top of every block; None: the read-out's own" + shown("the read-out's"))
    group.add_argument("--num_registers", type=non_negative_int, default=default("num_registers"),
                       help="learned register tokens after the CLS token (Darcet et al., 2024), dropped at the output"
                       + arch_shown("0; 4 for dinov2_*_reg and dinov3_*"))
    group.add_argument("--readout_sees_registers", type=bool_flag, default=default("readout_sees_registers"),
                       help="let the read-out attend to the registers too (by default it reads CLS and patches)"
                       + shown(MODEL_DEFAULTS["readout_sees_registers"]))
    group.add_argument("--pos_embed_interpolation", choices=POS_EMBED_INTERPOLATIONS,
                       default=default("pos_embed_interpolation"),
                       help="resampling of position embeddings for other image sizes: dino (reference, bicubic, "
                       "no antialias) or timm (antialiased)" + shown(MODEL_DEFAULTS["pos_embed_interpolation"]))
    for readout in READOUTS.values():
        options = [o for o in readout.options if not from_checkpoint or o.role == ARCHITECTURE]
        if not options:
            continue
        group = parser.add_argument_group(f"{readout.name} read-out")
        for option in options:
            group.add_argument(f"--{option.flag}", type=option.type,
                               default=None if from_checkpoint else option.default,
                               help=option.help + shown("derived" if option.default is None else option.default))


def upgrade_saved_args(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Saved args of older checkpoints in today's names: ``sparo_replace_blocks`` counted the blocks SPARO
    replaced (other read-outs replaced none) before ``readout_replace_blocks`` served every read-out."""
    upgraded = dict(saved)
    if "readout_replace_blocks" not in upgraded and "sparo_replace_blocks" in upgraded:
        legacy = upgraded.pop("sparo_replace_blocks")
        upgraded["readout_replace_blocks"] = legacy if upgraded.get("readout", "sparo") == "sparo" else 0
    return upgraded


def resolve_model_config(flags: argparse.Namespace | Mapping[str, Any], saved: Mapping[str, Any] | None = None,
                         weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model config: each flag given explicitly, else the checkpoint's saved args, else (for checkpoints
    without saved args, as DINO's official ones) what the backbone ``weights`` show, else the default."""
    given = upgrade_saved_args(vars(flags) if isinstance(flags, argparse.Namespace) else flags)
    config = {name: given.get(name) for name in MODEL_FLAGS}
    if saved is not None:
        saved = upgrade_saved_args(saved)
        config = {name: saved.get(name) if value is None else value for name, value in config.items()}
    elif weights is not None:
        config = _infer_from_weights(weights, config)
    defaults = arch_defaults(config["arch"])
    config = {name: defaults[name] if value is None else value for name, value in config.items()}
    config["arch"] = ARCH_ALIASES.get(config["arch"], config["arch"])
    if config["readout"] in READOUTS:
        config["readout_replace_blocks"] = replaced_blocks(config["readout"], config["readout_replace_blocks"])
    return config


def readout_flags(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The flags of ``config`` that matter for its read-out: the backbone's and the read-out's own."""
    own = READOUTS[config["readout"]].options
    return BACKBONE_FLAGS + tuple(option.flag for option in own if option.flag in config)


def _infer_from_weights(weights: Mapping[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Fills flags left out from tensor shapes: arch from the width, patch size from the patch embedding, the
    registers, the read-out whose tensors are there (CLS when none is; unknown tensors are an error), its options,
    and the depth from the block indices."""
    inferred = dict(config)
    cls_token, patch_weight = weights.get("cls_token"), weights.get("patch_embed.proj.weight")
    if inferred["arch"] is None and cls_token is not None:
        inferred["arch"] = _recognise_arch(weights, int(cls_token.shape[-1]))
    if inferred["patch_size"] is None and patch_weight is not None and patch_weight.ndim == 4:
        inferred["patch_size"] = int(patch_weight.shape[-1])
    registers = weights.get("reg_token")
    if inferred["num_registers"] is None and registers is not None and registers.ndim == 3:
        inferred["num_registers"] = int(registers.shape[1])
    if inferred["readout"] is None:
        inferred["readout"] = _recognise_readout(weights)
    arch = ARCHS[inferred["arch"] or MODEL_DEFAULTS["arch"]]
    for flag, value in READOUTS[inferred["readout"]].infer_options(weights, arch.embed_dim, arch.num_heads).items():
        if inferred.get(flag) is None:
            inferred[flag] = value
    indices = [int(match.group(1)) for key in weights if (match := re.match(r"^blocks\.(\d+)\.", key))]
    if inferred["depth"] is None and indices:
        inferred["depth"] = max(indices) + 1 + replaced_blocks(inferred["readout"], inferred["readout_replace_blocks"])
    return inferred


def _recognise_arch(weights: Mapping[str, Any], width: int) -> str | None:
    """The arch of that width whose family (DINOv3's LayerScale names, DINOv2's, or none) and register count the
    weights show."""
    family = ("dinov3" if any(key.endswith(".gamma_1") for key in weights)
              else "dinov2" if any(key.endswith(".ls1.gamma") for key in weights) else "dino")
    registers = weights.get("reg_token")
    count = int(registers.shape[1]) if registers is not None and registers.ndim == 3 else 0
    candidates = [name for name, spec in ARCHS.items() if spec.family == family and spec.embed_dim == width]
    matching = [name for name in candidates if ARCHS[name].num_registers == count]
    return (matching or candidates or [None])[0]


def _recognise_readout(weights: Mapping[str, Any]) -> str:
    recognised = [name for name, readout in READOUTS.items() if readout.recognise(weights)]
    if recognised:
        return recognised[0]
    owned = {*BACKBONE_KEY_ROOTS, *_FOREIGN_KEY_ROOTS, *(readout.state_prefix for readout in READOUTS.values())}
    unknown = sorted({key.split(".")[0] for key in weights} - owned)
    if unknown:
        raise UserError(f"the weights hold tensors of no known read-out ({', '.join(unknown)}): pass --readout "
                        f"(one of {', '.join(READOUTS)}) to say which to build")
    return "cls"  # no read-out tensors: DINO's own read-out


def build_backbone(config: Mapping[str, Any] | None = None, drop_path_rate: float = 0.0,
                   **overrides: Any) -> ReadoutBackbone:
    """The backbone a model config describes (missing or None entries take the arch's defaults, ``overrides``
    win): a :class:`~.dinov3.DINOv3VisionTransformer` for the dinov3 archs, else a :class:`VisionTransformer`; an
    impossible combination is a :class:`UserError`."""
    given = {name: value for name, value in {**upgrade_saved_args(config or {}), **overrides}.items()
             if value is not None}
    defaults = arch_defaults(given.get("arch"))
    arch = defaults["arch"]
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    config = {**defaults, **given}
    kwargs = {name: config[name] for name in MODEL_FLAGS[1:]}
    try:
        backbone = DINOv3VisionTransformer if ARCHS[arch].family == "dinov3" else VisionTransformer
        return backbone(**ARCHS[arch].model_kwargs(), drop_path_rate=drop_path_rate, **kwargs)
    except ValueError as error:
        raise UserError(str(error)) from None


def architecture_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The flags a training checkpoint's tensors depend on (backbone and head), as resuming compares them."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    config = resolve_model_config(given)
    compared = [name for name in readout_flags(config) if name not in INIT_ONLY_FLAGS]
    return {**{name: config[name] for name in compared}, **{name: given[name] for name in HEAD_FLAGS}}


def build_pretrained_backbone(path: str, checkpoint_key: str, flags: argparse.Namespace | Mapping[str, Any],
                              log: Callable[[str], None] | None = print) -> tuple[ReadoutBackbone, dict[str, Any]]:
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
    described = ", ".join(f"{name}={config[name]}" for name in readout_flags(config))
    report = load_pretrained_weights(model, weights, strict=True, verbose=False, architecture=described)
    if log is not None:
        log(f"loaded {len(report.loaded)} tensors from {path} (key {checkpoint_key!r}); model: {described}")
        if report.unused:
            log(f"unused from the checkpoint: {summarise_keys(report.unused)}")
        for note in report.notes:
            log(note)
    model.requires_grad_(False)
    model.eval()
    return model, config
