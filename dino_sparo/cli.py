"""Command-line plumbing shared by the scripts: user errors, boolean flags and the model flags."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from .models import ARCHS, READOUTS, VisionTransformer, build_backbone
from .models.vision_transformer import POS_EMBED_INTERPOLATIONS


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


def run_cli(main: Callable[[], Any]) -> None:
    """Runs a script's ``main``, turning :class:`UserError` into ``error: <message>`` and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def ensure_writable_dir(path: str, flag: str = "--output_dir", create: bool = True) -> None:
    """Checks that files can be written into the folder ``path`` (creating it unless ``create`` is false, in
    which case its nearest existing parent is checked), so that a bad output folder is a one-line
    :class:`UserError` before any work starts rather than a traceback after it."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
            return
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, "Not a directory")
        if not os.access(existing, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"{flag} {path} cannot be written: {reason}") from None


def bool_flag(value: str | bool) -> bool:
    """argparse type for ``--flag true|false`` (also on/off, yes/no, 1/0)."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in {"true", "on", "yes", "1"}:
        return True
    if lowered in {"false", "off", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def positive_int(value: str) -> int:
    """argparse type for an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {number}")
    return number


MODEL_DEFAULTS: dict[str, Any] = {
    "arch": "vit_small",
    "patch_size": 16,
    "depth": 12,
    "readout": "sparo",
    "sparo_slots": 64,
    "sparo_slot_dim": 64,
    "sparo_attn_dim": None,
    "sparo_share_kv": True,
    "sparo_slot_norm": True,
    "sparo_replace_blocks": 1,
    "pos_embed_interpolation": "dino",
}


def add_model_args(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """Adds the architecture flags. With ``from_checkpoint`` they default to None, meaning "as saved in the
    checkpoint's args" (see :func:`resolve_model_config`), so evaluation never needs them retyped."""
    def default(name: str) -> Any:
        return None if from_checkpoint else MODEL_DEFAULTS[name]

    suffix = " (default: the checkpoint's, else %s)" if from_checkpoint else " (default: %s)"
    group = parser.add_argument_group("architecture")
    group.add_argument("--arch", choices=list(ARCHS), default=default("arch"),
                       help="ViT size" + suffix % MODEL_DEFAULTS["arch"])
    group.add_argument("--patch_size", type=positive_int, default=default("patch_size"),
                       help="patch size in pixels, 16 or 8; with < 16 prefer --precision bf16 or fp32"
                       + suffix % MODEL_DEFAULTS["patch_size"])
    group.add_argument("--depth", type=positive_int, default=default("depth"),
                       help="transformer blocks before any is replaced by SPARO" + suffix % MODEL_DEFAULTS["depth"])
    group.add_argument("--readout", choices=READOUTS, default=default("readout"),
                       help="sparo: SPARO slots replace the last block(s); cls: DINO's CLS token; gap: mean of "
                       "patch tokens" + suffix % MODEL_DEFAULTS["readout"])
    group.add_argument("--sparo_slots", type=positive_int, default=default("sparo_slots"),
                       help="L, number of SPARO slots" + suffix % MODEL_DEFAULTS["sparo_slots"])
    group.add_argument("--sparo_slot_dim", type=positive_int, default=default("sparo_slot_dim"),
                       help="V, output size of each slot" + suffix % MODEL_DEFAULTS["sparo_slot_dim"])
    group.add_argument("--sparo_attn_dim", type=positive_int, default=None,
                       help="H, key/query size of each slot (default: the checkpoint's, else embed_dim / heads)")
    group.add_argument("--sparo_share_kv", type=bool_flag, default=default("sparo_share_kv"),
                       help="use the keys as values" + suffix % MODEL_DEFAULTS["sparo_share_kv"])
    group.add_argument("--sparo_slot_norm", type=bool_flag, default=default("sparo_slot_norm"),
                       help="L2-normalise each slot, scaled by sqrt(1/L)" + suffix % MODEL_DEFAULTS["sparo_slot_norm"])
    group.add_argument("--sparo_replace_blocks", type=positive_int, default=default("sparo_replace_blocks"),
                       help="final blocks removed for SPARO" + suffix % MODEL_DEFAULTS["sparo_replace_blocks"])
    group.add_argument("--pos_embed_interpolation", choices=POS_EMBED_INTERPOLATIONS,
                       default=default("pos_embed_interpolation"),
                       help="resampling of position embeddings for other image sizes: dino (reference, bicubic, "
                       "no antialias) or timm (antialiased)" + suffix % MODEL_DEFAULTS["pos_embed_interpolation"])


def resolve_model_config(args: argparse.Namespace | Mapping[str, Any],
                         saved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Model config from explicit flags, else the checkpoint's saved args, else :data:`MODEL_DEFAULTS`."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    saved = saved or {}
    config = {}
    for name, fallback in MODEL_DEFAULTS.items():
        value = given.get(name)
        if value is None:
            value = saved.get(name, fallback)
        config[name] = value
    return config


def build_model_from_config(config: Mapping[str, Any], drop_path_rate: float = 0.0) -> VisionTransformer:
    """Builds the backbone a model config describes; an impossible combination is a :class:`UserError`."""
    kwargs = {name: config[name] for name in MODEL_DEFAULTS if name != "arch"}
    try:
        return build_backbone(config["arch"], drop_path_rate=drop_path_rate, **kwargs)
    except ValueError as error:
        raise UserError(str(error)) from None
