"""DINOv3's ViT-S/B/L (Siméoni et al., 2025) built from timm's ``Eva`` (the model timm builds DINOv3 with), ending
in a read-out of :data:`~.readouts.READOUTS`: rotary position embeddings (RoPE) instead of absolute ones, 4
register ("storage") tokens after the CLS token, LayerScale.

Parameter names are timm's (``reg_token``, ``blocks.i.gamma_1``, ``blocks.i.attn.q_bias``...), into which
:mod:`dino_sparo.weight_formats` renames official DINOv3 checkpoints. The query and value biases are always there
(timm's ``_qkvb`` form; DINOv3 keeps the key bias at zero), so every DINOv3 checkpoint loads into one model.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, apply_rot_embed_cat
from timm.models.eva import Eva
from torch import nn

from .backbone import ReadoutBackbone, check_backbone_args


class DINOv3VisionTransformer(ReadoutBackbone, Eva):
    """timm's DINOv3 ``Eva`` returning ``feature_dim`` features from the chosen read-out (see
    :class:`~.vision_transformer.VisionTransformer` for the read-out arguments). ``img_size`` only sets timm's
    nominal grid: RoPE is computed for each input's own grid, so any multiple of the patch size works."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        layer_scale: float | None = 1e-5,
        mlp: str = "gelu",
        drop_path_rate: float = 0.0,
        readout: str = "sparo",
        readout_replace_blocks: int | None = None,
        num_registers: int = 4,
        readout_sees_registers: bool = False,
        **readout_options: Any,
    ) -> None:
        replaced = check_backbone_args(readout, readout_options, num_registers, depth, readout_replace_blocks)
        if mlp != "gelu":
            raise ValueError(f"DINOv3 backbones here use the GELU MLP (ViT-S/B/L), got mlp={mlp!r}")
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            qkv_bias=True, init_values=layer_scale, rope_type="dinov3", rope_temperature=100, rope_rotate_half=True,
            use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=num_registers, use_fc_norm=False,
            norm_layer=partial(LayerNorm, eps=1e-5), num_classes=0, global_pool="token", dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if num_registers:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        self.num_registers = num_registers
        self._rope_tables: dict[tuple[tuple[int, int], torch.device, torch.dtype], torch.Tensor] = {}
        self.attach_readout(readout, readout_options, replaced, embed_dim, num_heads, readout_sees_registers)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(x)  # (B, rows, cols, D): timm's dynamic size
        batch, _, _, dim = patches.shape
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.num_registers:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        tokens = torch.cat([*(token.to(patches.dtype) for token in prefix), patches.reshape(batch, -1, dim)], dim=1)
        return self.norm_pre(self.pos_drop(tokens))

    def block_kwargs(self, tokens: torch.Tensor, grid: tuple[int, int] | None) -> dict[str, Any]:
        if grid is None:  # tokens alone, as forward_from gets them: the crops of training are square
            patches = tokens.shape[1] - self.num_prefix_tokens
            side = math.isqrt(patches)
            if side * side != patches:
                raise ValueError(f"the patch grid of {patches} tokens is not square: run the images from the start "
                                 f"(forward) instead of forward_from")
            grid = (side, side)
        return {"rope": self.rope_table(grid)}

    def rope_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """timm's RoPE table (rows * cols, 2 * head_dim: sines, cosines) of a (rows, cols) patch grid, built
        once per grid, device and dtype. timm builds the coordinates on the CPU and copies them to the device on
        every call, a copy that waits for the device (three times a training step); only while its coordinate
        augmentation draws new coordinates (in training, when configured) is a fresh table needed each time."""
        rope = self.rope
        if rope.training and rope.aug_active:
            return rope.get_embed(shape=list(grid))
        key = (tuple(grid), rope.periods.device, rope.periods.dtype)
        if key not in self._rope_tables:
            self._rope_tables[key] = rope.get_embed(shape=list(grid))
        return self._rope_tables[key]

    def attention_weights(self, block: nn.Module, normed: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        attn = block.attn
        batch, count, _ = normed.shape
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
        qkv = F.linear(normed, attn.qkv.weight, bias).reshape(batch, count, 3, attn.num_heads, -1)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope, prefix = block_kwargs["rope"], attn.num_prefix_tokens
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=attn.rotate_half)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=attn.rotate_half)], dim=2)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.cls_token, *([self.reg_token] if self.num_registers else [])]
