"""Exports a checkpoint's backbone (the teacher's, by default) as ``OUT.safetensors`` plus ``OUT.json``, its model
config, which ``--pretrained_weights``, ``--init_from`` and the torch.hub entry points read back::

    python -m dino_sparo.export runs/demo/checkpoint.pth exports/demo_teacher

The config is also stored in the safetensors metadata, so the ``.safetensors`` file alone is enough; the JSON file is
there to read (and is used when the metadata has none).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence

from .errors import UserError, run_cli
from .logger import setup_logging
from .models.factory import build_pretrained_backbone
from .utils.files import write_atomic_or_explain
from .weight_formats import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIX, config_path, save_safetensors_atomic

logger = logging.getLogger(__name__)


def export_backbone(checkpoint: str, out: str, checkpoint_key: str = "teacher") -> tuple[str, str]:
    """Writes the backbone of ``checkpoint`` to ``out`` (``.safetensors`` added unless given) and its config beside
    it; returns both paths. Every tensor must load (as for an evaluation), so a partial export cannot happen."""
    weights_path = out if out.endswith(SAFETENSORS_SUFFIX) else out + SAFETENSORS_SUFFIX
    model, config = build_pretrained_backbone(checkpoint, checkpoint_key, {})
    model_config = config.flags()
    folder = os.path.dirname(os.path.abspath(weights_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {folder}: {error.strerror}") from None
    save_safetensors_atomic(model.state_dict(), {CONFIG_METADATA_KEY: json.dumps(model_config), "format": "pt"},
                            weights_path)
    text = (json.dumps(model_config, indent=1, sort_keys=True) + "\n").encode()
    write_atomic_or_explain(config_path(weights_path), lambda handle: handle.write(text),
                            needed_bytes=lambda: len(text))
    return weights_path, config_path(weights_path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dino_sparo.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a main_dino.py checkpoint (or any weights --pretrained_weights reads)")
    parser.add_argument("out", help="output path; .safetensors is added unless given, the config goes to OUT.json")
    parser.add_argument("--checkpoint_key", default="teacher", help="which model of the checkpoint to export")
    args = parser.parse_args(argv)
    setup_logging()
    weights_path, json_path = export_backbone(args.checkpoint, args.out, args.checkpoint_key)
    logger.info(f"wrote {weights_path} and {json_path}")


if __name__ == "__main__":
    run_cli(main)
