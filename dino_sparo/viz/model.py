"""Rebuilding a backbone from a checkpoint: this project's (architecture in its saved args) or DINO-format."""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import load_checkpoint_file, load_pretrained_weights, select_state_dict, strip_prefixes
from ..cli import MODEL_DEFAULTS, build_model_from_config, resolve_model_config
from ..models import ARCHS, VisionTransformer


def infer_config_from_weights(state_dict: Mapping[str, torch.Tensor], replaced_blocks: int | None = None
                              ) -> dict[str, Any]:
    """Model config read off backbone tensor shapes, for checkpoints without saved args (official DINO ones).

    Without ``sparo.*`` tensors the read-out is ``cls``: the weights are a plain DINO ViT. What the shapes do not
    tell (slot normalisation, how many blocks SPARO replaced) keeps its default.
    """
    inferred: dict[str, Any] = {}
    if "cls_token" in state_dict:
        width = state_dict["cls_token"].shape[-1]
        arch = next((name for name, spec in ARCHS.items() if spec["embed_dim"] == width), None)
        if arch is not None:
            inferred["arch"] = arch
    if "patch_embed.proj.weight" in state_dict:
        inferred["patch_size"] = int(state_dict["patch_embed.proj.weight"].shape[-1])
    kept_blocks = 1 + max((int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))),
                          default=-1)
    if "sparo.queries" in state_dict:
        slots, attn_dim = state_dict["sparo.queries"].shape
        inferred.update(readout="sparo", sparo_slots=int(slots), sparo_attn_dim=int(attn_dim),
                        sparo_share_kv="sparo.value_proj.weight" not in state_dict)
        if "sparo.out_proj.weight" in state_dict:
            inferred["sparo_slot_dim"] = int(state_dict["sparo.out_proj.weight"].shape[0])
        if kept_blocks:
            inferred["depth"] = kept_blocks + (replaced_blocks or MODEL_DEFAULTS["sparo_replace_blocks"])
    else:
        inferred["readout"] = "cls"
        if kept_blocks:
            inferred["depth"] = kept_blocks
    return inferred


def load_model(args: argparse.Namespace) -> tuple[VisionTransformer, bool]:
    """The backbone of ``args.pretrained_weights`` in eval mode on ``args.device``, and whether the checkpoint
    holds trained SPARO weights. Model flags given on the command line override the checkpoint's."""
    path = os.fspath(args.pretrained_weights)
    checkpoint = load_checkpoint_file(path)
    state_dict = strip_prefixes(select_state_dict(checkpoint, args.checkpoint_key, path))
    has_slot_weights = any(key.startswith("sparo.") for key in state_dict)
    saved_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), Mapping) else None
    if saved_args is None:
        saved_args = infer_config_from_weights(state_dict, args.sparo_replace_blocks)
        described = ", ".join(f"{key} {value}" for key, value in saved_args.items())
        print(f"{path} has no saved args; from its weights: {described or 'nothing'} (flags override)", flush=True)
    config = resolve_model_config(args, saved_args)
    # load_pretrained_weights reads the file again; it is what reports dropped blocks and a fresh SPARO.
    del checkpoint, state_dict
    model = build_model_from_config(config)
    load_pretrained_weights(model, path, args.checkpoint_key)
    print(f"model: {config['arch']}/{config['patch_size']}, depth {config['depth']}, read-out {config['readout']}"
          + (f", {config['sparo_slots']} slots" if config["readout"] == "sparo" else ""), flush=True)
    return model.eval().to(args.device), has_slot_weights
