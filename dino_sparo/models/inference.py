"""Which model a checkpoint without saved args holds (DINO's official ones, DINOv2's and DINOv3's releases, timm
state dicts): the arch from the width and the LayerScale naming, the patch size, the registers, the read-out whose
tensors are there and its options, and the depth, all read off the tensors."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from .backbone import replaced_blocks
from .config import BACKBONE_DEFAULTS
from .readouts import READOUTS
from .vision_transformer import ARCHS, BACKBONE_KEY_ROOTS

# Tensors that timm and DINO checkpoints may hold beside the backbone's, which no read-out owns.
_FOREIGN_KEY_ROOTS = ("fc_norm", "norm_pre", "mask_token", "head", "dino_head", "ibot_head")


def infer_model_flags(weights: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """``flags`` with those left out (None) filled in from the backbone ``weights`` where the tensors show them."""
    inferred = dict(flags)
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
    arch = ARCHS[inferred["arch"] or BACKBONE_DEFAULTS["arch"]]
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
