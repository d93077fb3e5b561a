"""Weights in the layouts users hold, renamed to this project's (timm's) names: official DINOv2 checkpoints, timm
state dicts and ``.safetensors`` files (this project's exports among them); which sub-dict of a checkpoint holds
the model, and the wrapper prefixes (DDP, torch.compile, the multi-crop wrapper) around its keys.

- Official DINOv2 (``facebookresearch/dinov2``): ``register_tokens`` become ``reg_token``; the chunked blocks of
  its training checkpoints (``blocks.<chunk>.<index>.*``) are flattened; its giant's SwiGLU ``mlp.w12``/``mlp.w3``
  become ``mlp.fc1``/``mlp.fc2``; ``mask_token`` is reported as unused. ``ls1.gamma``/``ls2.gamma`` are timm's
  names already.
- timm's DINOv2 models with registers keep no position embedding for the CLS token (``no_embed_class``; timm folds
  it into ``cls_token``): a zero one is put back, which gives the same tokens.
- Official DINOv3 (``facebookresearch/dinov3``, recognised by ``storage_tokens`` or ``rope_embed.periods``):
  ``storage_tokens`` become ``reg_token``, ``ls1.gamma``/``ls2.gamma`` timm's ``gamma_1``/``gamma_2``, the masked
  ``attn.qkv.bias`` the query and value biases (the key bias must be zero, as DINOv3's mask keeps it); the RoPE
  periods are recomputed, not loaded. timm's DINOv3 models without biases get zero ones, which is the same model.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .errors import UserError
from .utils.files import write_atomic_or_explain

SAFETENSORS_SUFFIX = ".safetensors"
# The key of the safetensors metadata entry that holds an exported model's config (JSON).
CONFIG_METADATA_KEY = "dino_sparo_config"
_DINOV3_KEYS = ("storage_tokens", "rope_embed.periods")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_BACKBONE_PREFIX = "backbone."  # the multi-crop wrapper's


def is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(SAFETENSORS_SUFFIX)


def config_path(path: str | os.PathLike) -> str:
    """The JSON config written beside an exported ``.safetensors`` file."""
    return os.fspath(path)[: -len(SAFETENSORS_SUFFIX)] + ".json"


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a ``.safetensors`` file and the model config it carries (its metadata, else the JSON file
    beside it; None for files from elsewhere, whose architecture is then inferred from the tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        tensors = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({str(error).strip() or 'empty'})") from None
    config = metadata.get(CONFIG_METADATA_KEY)
    if config is None and os.path.isfile(config_path(path)):
        with open(config_path(path)) as handle:
            config = handle.read()
    try:
        return tensors, json.loads(config) if config is not None else None
    except json.JSONDecodeError:
        raise UserError(f"the model config of {path} is not valid JSON") from None


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                            path: str | os.PathLike) -> None:
    """``tensors`` (and string ``metadata``) as a ``.safetensors`` file, written as :func:`save_atomic` writes."""
    from safetensors.torch import save

    data = save({key: value.detach().contiguous() for key, value in tensors.items()}, metadata=dict(metadata))
    write_atomic_or_explain(path, lambda handle: handle.write(data), needed_bytes=lambda: len(data))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(checkpoint: Any, checkpoint_key: str | None, path: str = "checkpoint") -> dict[str, Any]:
    """The state dict under ``checkpoint_key`` (``teacher``, ``student``, ...), or the checkpoint itself when it
    is a bare state dict, as the official DINO backbone weights are."""
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} does not hold a dictionary of weights (found {type(checkpoint).__name__})")
    if checkpoint_key and checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], Mapping):
        return dict(checkpoint[checkpoint_key])
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    candidates = sorted(k for k, v in checkpoint.items() if isinstance(v, Mapping) and _is_state_dict(v))
    raise UserError(f"{path} has no key {checkpoint_key!r}; keys holding weights: "
                    f"{', '.join(candidates) if candidates else 'none'}")


def strip_prefixes(state_dict: Mapping[str, Any], keep_wrapper: bool = False) -> dict[str, Any]:
    """Removes DDP's ``module.`` and torch.compile's ``_orig_mod.`` from every key, and also the multi-crop
    wrapper's ``backbone.`` unless ``keep_wrapper`` (for loading a whole wrapper: ``backbone.*`` + ``head.*``)."""
    prefixes = _WRAPPER_PREFIXES if keep_wrapper else (*_WRAPPER_PREFIXES, _BACKBONE_PREFIX)
    cleaned = {}
    for key, value in state_dict.items():
        while (prefix := next((p for p in prefixes if key.startswith(p)), None)) is not None:
            key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def to_project_layout(state_dict: Mapping[str, torch.Tensor], path: str = "checkpoint"
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state_dict`` (prefixes already stripped) in this project's names, and one note per conversion made."""
    if any(key in state_dict for key in _DINOV3_KEYS):
        state_dict, notes = _from_official_dinov3(state_dict, path)
    else:
        notes = []
    if any(key.startswith("embeddings.") for key in state_dict) and any(
            key.startswith("encoder.layer.") for key in state_dict):
        raise UserError(f"{path} is in Hugging Face transformers' layout (embeddings.*, encoder.layer.*), which is not "
                        f"read: use the official .pth file or timm's safetensors (e.g. timm/vit_small_patch14_dinov2)")
    converted: dict[str, torch.Tensor] = {}
    chunked = mlp_renamed = False
    for key, value in state_dict.items():
        if (match := re.match(r"^blocks\.\d+\.(\d+)\.(.*)$", key)) is not None:
            # DINOv2 pads chunk c with Identity modules, so the index inside a chunk is the block's own.
            key, chunked = f"blocks.{match.group(1)}.{match.group(2)}", True
        if (match := re.match(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.(weight|bias)$", key)) is not None:
            key, mlp_renamed = f"{match.group(1)}{'fc1' if match.group(2) == 'w12' else 'fc2'}.{match.group(3)}", True
        if key == "register_tokens":
            key = "reg_token"
            notes.append("DINOv2 register_tokens loaded as reg_token")
        if key in converted:
            raise UserError(f"{path} holds two tensors for {key} (a chunked and a flat copy?)")
        converted[key] = value
    if chunked:
        notes.append("DINOv2's chunked blocks (blocks.<chunk>.<index>) flattened")
    if mlp_renamed:
        notes.append("DINOv2 SwiGLU mlp.w12/mlp.w3 loaded as mlp.fc1/mlp.fc2")
    unbiased = [key for key in converted if key.endswith(".attn.qkv.weight")
                and key.replace(".attn.qkv.weight", ".gamma_1") in converted
                and key.replace("qkv.weight", "q_bias") not in converted]
    for key in unbiased:  # timm's DINOv3 without query/value biases: zero ones compute the same
        width = converted[key].shape[0] // 3
        for name in ("q_bias", "v_bias"):
            converted[key.replace("qkv.weight", name)] = converted[key].new_zeros(width)
    if unbiased:
        notes.append("timm's DINOv3 without qkv biases given zero query/value biases")
    pos_embed, cls_token = converted.get("pos_embed"), converted.get("cls_token")
    if pos_embed is not None and cls_token is not None and pos_embed.ndim == 3 and _is_square(pos_embed.shape[1]):
        converted["pos_embed"] = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[-1]), pos_embed], dim=1)
        notes.append("timm's pos_embed without a CLS position (no_embed_class) given a zero one")
    return converted, notes


def _from_official_dinov3(state_dict: Mapping[str, torch.Tensor], path: str
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith((".periods", ".bias_mask")) or key.startswith("local_cls_norm."):
            continue  # RoPE periods are recomputed; the mask is applied below; local_cls_norm trains ViT-7B only
        if (match := re.match(r"^(blocks\.\d+\.attn\.)qkv\.bias$", key)) is not None:
            mask = state_dict.get(f"{match.group(1)}qkv.bias_mask")
            bias = value if mask is None else torch.nan_to_num(value * mask)
            q_bias, k_bias, v_bias = bias.chunk(3)
            if k_bias.abs().max() > 0:
                raise UserError(f"{path}: {key} has a non-zero key bias, which DINOv3's models (and these) keep at 0")
            converted[f"{match.group(1)}q_bias"], converted[f"{match.group(1)}v_bias"] = q_bias, v_bias
            continue
        key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)
        converted["reg_token" if key == "storage_tokens" else key] = value
    return converted, ["DINOv3 storage_tokens, ls1/ls2.gamma and qkv.bias loaded as reg_token, gamma_1/gamma_2 and "
                       "q_bias/v_bias (RoPE periods recomputed)"]


def _is_square(count: int) -> bool:
    # A grid of patches alone; with a CLS position it is 1 + n^2, never a square for n > 0.
    return count > 0 and math.isqrt(count) ** 2 == count
