"""Exports a checkpoint's backbone (the teacher's, by default) as ``OUT.safetensors`` plus ``OUT.json``, its model
config, which ``--pretrained_weights``, ``--init_from`` and the torch.hub entry points read back::

    python -m dino_sparo.export runs/demo/checkpoint.pth exports/demo_teacher

The config is also stored in the safetensors metadata, so the ``.safetensors`` file alone is enough; the JSON file is
there to read (and is used when the metadata has none).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from .checkpoint import read_weights
from .cli import BARE_IS_TRUE, ArgumentParser, bool_flag
from .errors import UserError, run_cli
from .logger import setup_logging
from .models.factory import backbone_from_weights
from .utils.files import write_atomic_or_explain
from .weight_formats import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIX, config_path, save_safetensors_atomic

logger = logging.getLogger(__name__)


# The DINO head's flags, which a continued run needs to rebuild the head of an export made --with_head.
HEAD_FLAGS = ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head", "norm_last_layer")


def export_backbone(checkpoint: str, out: str, checkpoint_key: str = "teacher", with_head: bool = False
                    ) -> tuple[str, str]:
    """Writes the backbone of ``checkpoint`` (with ``with_head``, its DINO head too, as ``head.*``) to ``out``
    (``.safetensors`` added unless given) and its config beside it; returns both paths. Every backbone tensor must
    load (as for an evaluation), so a partial export cannot happen. An export with the head starts a run
    (``--init_from``) with backbone, read-out and head, unlike Meta's releases, which hold backbones only."""
    weights_path = out if out.endswith(SAFETENSORS_SUFFIX) else out + SAFETENSORS_SUFFIX
    weights = read_weights(checkpoint, checkpoint_key)
    model, config = backbone_from_weights(weights, {})
    tensors, exported_config = model.state_dict(), config.flags()
    if with_head:
        saved = weights.saved_args or {}
        if not weights.head or any(name not in saved for name in HEAD_FLAGS):
            raise UserError(f"{checkpoint} has no DINO head to export with its flags (a main_dino.py checkpoint "
                            f"has): export without --with_head")
        tensors.update({f"head.{name}": value for name, value in weights.head.items()})
        exported_config.update({name: saved[name] for name in HEAD_FLAGS})
    folder = os.path.dirname(os.path.abspath(weights_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {folder}: {error.strerror}") from None
    save_safetensors_atomic(tensors, {CONFIG_METADATA_KEY: json.dumps(exported_config), "format": "pt"},
                            weights_path)
    text = (json.dumps(exported_config, indent=1, sort_keys=True) + "\n").encode()
    write_atomic_or_explain(config_path(weights_path), lambda handle: handle.write(text),
                            needed_bytes=lambda: len(text))
    return weights_path, config_path(weights_path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m dino_sparo.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a main_dino.py checkpoint (or any weights --pretrained_weights reads)")
    parser.add_argument("out", help="output path; .safetensors is added unless given, the config goes to OUT.json")
    parser.add_argument("--checkpoint_key", default="teacher", help="which model of the checkpoint to export")
    parser.add_argument("--with_head", type=bool_flag, **BARE_IS_TRUE, default=False,
                        help="also export the DINO head (as head.*), so that --init_from the export continues "
                        "self-supervised training with backbone, read-out and head")
    args = parser.parse_args(argv)
    setup_logging()
    weights_path, json_path = export_backbone(args.checkpoint, args.out, args.checkpoint_key, args.with_head)
    logger.info(f"wrote {weights_path} and {json_path}")


if __name__ == "__main__":
    run_cli(main)
