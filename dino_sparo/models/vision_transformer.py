"""DINO's ViT-Tiny/Small/Base and DINOv2's ViT-S/B/L/g (with or without registers) built from timm, ending in a read-out
of :data:`~.readouts.READOUTS` (SPARO, CLS, ...); :data:`ARCHS` also names DINOv3's, built by :mod:`.dinov3`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from .backbone import ReadoutBackbone, check_backbone_args

POS_EMBED_INTERPOLATIONS = ("dino", "timm")


@dataclass(frozen=True)
class ArchSpec:
    """What an ``--arch`` name fixes (width, heads, LayerScale, MLP, the position-embedding grid) and the defaults it
    gives the flags that may still differ (``patch_size``, ``depth``, ``num_registers``)."""
    embed_dim: int
    num_heads: int
    patch_size: int = 16
    depth: int = 12
    num_registers: int = 0
    layer_scale: float | None = None  # LayerScale's initial value (DINOv2: 1e-5); None: no LayerScale
    mlp: Literal["gelu", "swiglu"] = "gelu"
    img_size: int = 224  # the position embeddings' native image size (DINOv2's: 518 px, a 37x37 grid)
    family: Literal["dino", "dinov2", "dinov3"] = "dino"  # dinov3: RoPE, built by DINOv3VisionTransformer

    def model_kwargs(self) -> dict[str, Any]:
        """The :class:`VisionTransformer` arguments no flag overrides."""
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, layer_scale=self.layer_scale, mlp=self.mlp,
                    img_size=self.img_size)

    @property
    def absolute_positions(self) -> bool:
        """Whether the arch adds absolute position embeddings (resampled for other sizes); DINOv3's rotate its
        queries and keys instead (RoPE)."""
        return self.family != "dinov3"

    def flag_defaults(self) -> dict[str, int]:
        return dict(patch_size=self.patch_size, depth=self.depth, num_registers=self.num_registers)


def _dinov2(embed_dim: int, num_heads: int, depth: int, registers: int, mlp: str = "gelu") -> ArchSpec:
    # DINOv2's hub backbones (Oquab et al., 2024): patch 14, LayerScale from 1e-5, 518 px position embeddings.
    return ArchSpec(embed_dim, num_heads, patch_size=14, depth=depth, num_registers=registers, layer_scale=1e-5,
                    mlp=mlp, img_size=518, family="dinov2")


def _dinov3(embed_dim: int, num_heads: int, depth: int) -> ArchSpec:
    # DINOv3's ViT-S/B/L (Siméoni et al., 2025): patch 16, RoPE, 4 storage tokens, LayerScale from 1e-5.
    return ArchSpec(embed_dim, num_heads, patch_size=16, depth=depth, num_registers=4, layer_scale=1e-5,
                    family="dinov3")


ARCHS: dict[str, ArchSpec] = {
    "vit_tiny": ArchSpec(192, 3),
    "vit_small": ArchSpec(384, 6),
    "vit_base": ArchSpec(768, 12),
    **{f"dinov2_vit{size}14{suffix}": _dinov2(width, heads, depth, registers, mlp)
       for size, width, heads, depth, mlp in (("s", 384, 6, 12, "gelu"), ("b", 768, 12, 12, "gelu"),
                                              ("l", 1024, 16, 24, "gelu"), ("g", 1536, 24, 40, "swiglu"))
       for suffix, registers in (("", 0), ("_reg", 4))},
    "dinov3_vits16": _dinov3(384, 6, 12),
    "dinov3_vitb16": _dinov3(768, 12, 12),
    "dinov3_vitl16": _dinov3(1024, 16, 24),
}
# First components of the backbones' own state-dict keys (the read-out's are its ``state_prefix``).
BACKBONE_KEY_ROOTS = ("cls_token", "reg_token", "pos_embed", "patch_embed", "blocks", "norm")


class VisionTransformer(ReadoutBackbone, TimmVisionTransformer):
    """timm's ViT configured as DINO's, returning ``feature_dim`` features from the chosen read-out.

    Parameter names are timm's, which are also DINO's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.i.*``, ``norm``), so official DINO and timm weights load into the shared blocks. The last
    ``readout_replace_blocks`` blocks (default: the read-out's own, 1 for SPARO) are removed, and the read-out,
    held as the attribute its ``state_prefix`` names (``sparo``), reads the final-normed tokens, CLS included.
    ``readout_options`` are read-out flags by name (``sparo_slots=16``); those of other read-outs are ignored.

    ``num_registers`` learned tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024) follow the CLS
    token, without position embeddings (DINOv2's layout), so that weights without registers still load. They absorb
    the high-norm artefact tokens large ViTs grow, and are dropped before the read-out unless
    ``readout_sees_registers``.

    ``layer_scale`` (LayerScale's initial value) and ``mlp="swiglu"`` give DINOv2's blocks (``ls1.gamma``, ...,
    its giant's SwiGLU), whose official weights load after :mod:`dino_sparo.weight_formats` renames them.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = None,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        drop_path_rate: float = 0.0,
        readout: str = "sparo",
        readout_replace_blocks: int | None = None,
        num_registers: int = 0,
        readout_sees_registers: bool = False,
        pos_embed_interpolation: Literal["dino", "timm"] = "dino",
        **readout_options: Any,
    ) -> None:
        replaced = check_backbone_args(readout, readout_options, num_registers, depth, readout_replace_blocks)
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, "
                             f"got {pos_embed_interpolation!r}")
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        # DINOv2's giant packs SwiGLU's two input projections in one (its ``w12``), 2/3 of 4x wide each.
        mlp_args = dict(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU) if mlp == "swiglu" else \
            dict(mlp_ratio=mlp_ratio)
        # Built at full depth so the stochastic-depth rates of the kept blocks equal DINO's.
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            qkv_bias=True, num_classes=0, global_pool="token", dynamic_img_size=True,
            drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=layer_scale,
            **mlp_args,
        )
        # timm starts the CLS token at std 1e-6; DINO (and so its checkpoints' training) at trunc_normal std 0.02.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.num_registers = self.num_reg_tokens = num_registers
        if num_registers:
            # DINOv2 starts its registers at std 1e-6; 0.02, as the CLS token, lets them tell apart in short runs.
            self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
            nn.init.trunc_normal_(self.reg_token, std=0.02)
            self.num_prefix_tokens = 1 + num_registers
        self.pos_embed_interpolation = pos_embed_interpolation
        self.attach_readout(readout, readout_options, replaced, embed_dim, num_heads, readout_sees_registers)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Adds (resampled) position embeddings to NHWC patch tokens, prepends the CLS token and inserts the
        registers after it."""
        batch, rows, cols, dim = x.shape
        pos_embed = self.pos_embed
        if (rows, cols) != tuple(self.patch_embed.grid_size):
            if self.pos_embed_interpolation == "timm":
                pos_embed = resample_abs_pos_embed(pos_embed, new_size=(rows, cols),
                                                   old_size=self.patch_embed.grid_size, num_prefix_tokens=1)
            else:
                pos_embed = _resample_pos_embed_dino(pos_embed, rows, cols)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)], dim=1)
        tokens = tokens + pos_embed.to(tokens.dtype)
        if self.num_registers:
            tokens = torch.cat([tokens[:, :1], self.reg_token.expand(batch, -1, -1).to(tokens.dtype), tokens[:, 1:]],
                               dim=1)
        return self.pos_drop(tokens)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> tokens (B, 1 + registers + H*W/p^2, D) with position embeddings, before any
        block."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.cls_token, self.pos_embed, *([self.reg_token] if self.num_registers else [])]

    def attention_weights(self, block: nn.Module, normed: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        return _attention_weights(block.attn, normed)


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
    return VisionTransformer(**ARCHS["vit_tiny"].model_kwargs(), patch_size=patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Small: 384 wide, 6 heads, depth 12 (DINO's configuration)."""
    return VisionTransformer(**ARCHS["vit_small"].model_kwargs(), patch_size=patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Base: 768 wide, 12 heads, depth 12 (DINO's configuration)."""
    return VisionTransformer(**ARCHS["vit_base"].model_kwargs(), patch_size=patch_size, **kwargs)
