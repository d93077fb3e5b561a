"""Attention maps over the patch grid and the "peakedness" used to rank slots."""
from __future__ import annotations

import math

import torch

from ..models import VisionTransformer

PEAKEDNESS_HELP = ("peakedness is 1 - H(p) / log(P), with p the slot's attention over the P patches "
                   "(CLS token left out, renormalised) and H its entropy: 0 for uniform attention, 1 for a single "
                   "patch; averaged over the images")


@torch.no_grad()
def slot_attention(model: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """Attention (L, N) of every SPARO slot over the tokens of one normalised image (C, H, W); token 0 is CLS."""
    return model.get_slot_attention(image[None])[0].float().cpu()


@torch.no_grad()
def head_cls_attention(model: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """Attention (heads, N) of the CLS query of each head of the last remaining block, as DINO visualises it."""
    return model.get_last_selfattention(image[None])[0, :, 0].float().cpu()


def patch_grid(token_attention: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """(..., N) attention over tokens -> (..., rows, cols) over the patches, prefix (CLS) tokens dropped."""
    rows, cols = grid_size
    patches = token_attention[..., num_prefix_tokens:]
    if patches.shape[-1] != rows * cols:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not fill a {rows}x{cols} grid")
    return patches.reshape(*patches.shape[:-1], rows, cols)


def peakedness(patch_attention: torch.Tensor) -> torch.Tensor:
    """(..., P) attention over patches -> (...) in [0, 1]; see :data:`PEAKEDNESS_HELP`."""
    count = patch_attention.shape[-1]
    if count == 1:
        return torch.ones(patch_attention.shape[:-1])
    p = patch_attention / patch_attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return (1.0 - entropy / math.log(count)).clamp(0.0, 1.0)
