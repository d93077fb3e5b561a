"""Attention maps of one image: per SPARO slot, per head of the last block, and laid out over the patch grid."""
from __future__ import annotations

import torch

from ..models import VisionTransformer


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
