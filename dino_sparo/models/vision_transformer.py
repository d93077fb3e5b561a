"""DINO's ViT-Tiny/Small/Base built from timm, with a choice of read-out: CLS, SPARO or patch-token mean."""
from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from .sparo import SPARO

READOUTS = ("sparo", "cls", "gap")
POS_EMBED_INTERPOLATIONS = ("dino", "timm")
ARCHS = {
    "vit_tiny": dict(embed_dim=192, num_heads=3),
    "vit_small": dict(embed_dim=384, num_heads=6),
    "vit_base": dict(embed_dim=768, num_heads=12),
}


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT configured as DINO's, returning ``feature_dim`` features from the chosen read-out.

    Parameter names are timm's, which are also DINO's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.i.*``, ``norm``), so official DINO and timm weights load into the shared blocks. For
    ``readout="sparo"`` the last ``sparo_replace_blocks`` blocks are removed and a :class:`SPARO` module reads
    the final-normed tokens, CLS token included.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        readout: Literal["sparo", "cls", "gap"] = "sparo",
        sparo_slots: int = 64,
        sparo_slot_dim: int = 64,
        sparo_attn_dim: int | None = None,
        sparo_share_kv: bool = True,
        sparo_slot_norm: bool = True,
        sparo_logit_scale: bool = False,
        sparo_query_init_std: float = 1.0,
        sparo_key_init_gain: float = 4.0,
        sparo_replace_blocks: int = 1,
        pos_embed_interpolation: Literal["dino", "timm"] = "dino",
    ) -> None:
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, "
                             f"got {pos_embed_interpolation!r}")
        if readout == "sparo" and not 1 <= sparo_replace_blocks < depth:
            raise ValueError(f"sparo_replace_blocks must be in [1, depth-1] = [1, {depth - 1}], "
                             f"got {sparo_replace_blocks}")
        # Built at full depth so the stochastic-depth rates of the kept blocks equal DINO's.
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, global_pool="token", dynamic_img_size=True,
            drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        # timm starts the CLS token at std 1e-6; DINO (and so its checkpoints' training) at trunc_normal std 0.02.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.readout = readout
        self.pos_embed_interpolation = pos_embed_interpolation
        self.sparo: SPARO | None = None
        if readout == "sparo":
            self.blocks = self.blocks[: depth - sparo_replace_blocks]
            attn_dim = sparo_attn_dim if sparo_attn_dim is not None else embed_dim // num_heads
            self.sparo = SPARO(embed_dim, sparo_slots, sparo_slot_dim, attn_dim, sparo_share_kv, sparo_slot_norm,
                               sparo_logit_scale, sparo_query_init_std, sparo_key_init_gain)
        self.feature_dim = self.sparo.output_dim if self.sparo is not None else embed_dim

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Adds (resampled) position embeddings to NHWC patch tokens and prepends the CLS token."""
        batch, rows, cols, dim = x.shape
        pos_embed = self.pos_embed
        if (rows, cols) != tuple(self.patch_embed.grid_size):
            if self.pos_embed_interpolation == "timm":
                pos_embed = resample_abs_pos_embed(pos_embed, new_size=(rows, cols),
                                                   old_size=self.patch_embed.grid_size, num_prefix_tokens=1)
            else:
                pos_embed = _resample_pos_embed_dino(pos_embed, rows, cols)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)], dim=1)
        return self.pos_drop(tokens + pos_embed.to(tokens.dtype))

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> tokens (B, 1 + H*W/p^2, D) with position embeddings, before any block."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed token outputs (B, N, D) of the remaining blocks: what the read-out sees."""
        return self.norm(self.blocks(self.prepare_tokens(x)))

    def prefix_tokens(self, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Tokens after the embeddings and the first ``num_blocks`` blocks: the input of :meth:`forward_from`."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:num_blocks]:
            x = block(x)
        return x

    def forward_from(self, tokens: torch.Tensor, first_block: int) -> torch.Tensor:
        """The read-out of ``tokens`` from :meth:`prefix_tokens` (``first_block`` blocks already applied) run
        through the remaining blocks: ``forward(x) == forward_from(prefix_tokens(x, k), k)`` for every k."""
        for block in self.blocks[first_block:]:
            tokens = block(tokens)
        return self.readout_features(self.norm(tokens))

    def freeze_prefix(self, num_blocks: int) -> None:
        """Freezes the patch and position embeddings, the CLS token and the first ``num_blocks`` blocks (no
        gradients), and turns off stochastic depth inside those blocks, whose outputs are then computed once and
        shared (see :class:`~dino_sparo.models.multicrop.MultiCropWrapper`)."""
        if not 0 <= num_blocks <= len(self.blocks):
            raise ValueError(f"cannot freeze {num_blocks} blocks: the model keeps {len(self.blocks)} before its "
                             f"read-out")
        for module in (self.patch_embed, *self.blocks[:num_blocks]):
            module.requires_grad_(False)
        self.cls_token.requires_grad_(False)
        self.pos_embed.requires_grad_(False)
        for block in self.blocks[:num_blocks]:
            block.drop_path1, block.drop_path2 = nn.Identity(), nn.Identity()

    def readout_features(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.readout == "cls":
            return tokens[:, 0]
        if self.readout == "gap":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return self.sparo(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout_features(self.tokens(x))

    def get_slot_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slot attention over the tokens (B, L, N); each row sums to 1."""
        if self.sparo is None:
            raise ValueError(f"get_slot_attention needs readout='sparo', this model's read-out is {self.readout!r}")
        return self.sparo(self.tokens(x), return_attention=True)[1]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention (B, heads, N, N) of the last remaining transformer block."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return _attention_weights(self.blocks[-1].attn, self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normed token outputs (B, N, D) of the last ``n`` remaining blocks, oldest first."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        x = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


def _resample_pos_embed_dino(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bicubic resampling as in the reference DINO: scale factor (n + 0.1) / sqrt(N) per side, no antialias.

    The +0.1 makes the floor in ``interpolate`` land on the intended grid size; official weights were trained
    with exactly this resampling for the 96 px local crops.
    """
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(math.sqrt(patch_pos.shape[1]))
    grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                         mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"position-embedding resampling gave {tuple(grid.shape[-2:])}, wanted {(rows, cols)}")
    patch_pos = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([class_pos, patch_pos], dim=1)


def _attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights (B, heads, N, N) of a timm ``Attention`` on its (already normed) input."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Tiny: 192 wide, 3 heads, depth 12 (DINO's configuration)."""
    return VisionTransformer(**ARCHS["vit_tiny"], patch_size=patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Small: 384 wide, 6 heads, depth 12 (DINO's configuration)."""
    return VisionTransformer(**ARCHS["vit_small"], patch_size=patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Base: 768 wide, 12 heads, depth 12 (DINO's configuration)."""
    return VisionTransformer(**ARCHS["vit_base"], patch_size=patch_size, **kwargs)
