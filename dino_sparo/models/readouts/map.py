"""Multi-head attention pooling (MAP): one learned latent query attends over the tokens with every head, then a
residual MLP (Lee et al., "Set Transformer", ICML 2019, as used by SigLIP; Zhai et al., ICCV 2023). timm's
``AttentionPoolLatent`` is the layer, configured as timm's ``global_pool="map"`` ViTs configure it."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from ...cli import positive_int
from .base import Option, Readout


class MAPReadout(Readout):
    name: ClassVar[str] = "map"
    summary: ClassVar[str] = "multi-head attention pooling with a learned query (SigLIP's MAP head)"
    state_prefix: ClassVar[str] = "map"
    map_label: ClassVar[str] = "head"
    options: ClassVar[tuple[Option, ...]] = (
        Option("map_heads", positive_int, None, "attention heads of the MAP read-out (default: the backbone's)",
               argument="num_heads", derived=lambda embed_dim, num_heads: num_heads),
        Option("map_mlp_ratio", float, 4.0, "hidden width of the MAP read-out's MLP, in multiples of embed_dim",
               argument="mlp_ratio"),
    )

    def __init__(self, embed_dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1) -> None:
        super().__init__(embed_dim, num_prefix_tokens)
        if embed_dim % num_heads:
            raise ValueError(f"MAP heads ({num_heads}) must divide embed_dim ({embed_dim})")
        self.pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-6))
        # As the ViT's own linear layers (timm and DINO): truncated normal, std 0.02, zero biases.
        for module in self.pool.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pool(tokens)

    @property
    def num_maps(self) -> int:
        return self.pool.num_heads

    def attention_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, heads, N): where the latent query of each head looks."""
        queries, keys, _ = self._heads(tokens)
        return ((queries * self.pool.scale) @ keys.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]

    def _heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latent query (B, heads, 1, d) and the keys and values (B, heads, N, d) of every head."""
        pool, (batch, count, _) = self.pool, tokens.shape
        queries = pool.q(pool.latent.expand(batch, -1, -1)).reshape(batch, 1, pool.num_heads, pool.head_dim)
        keys, values = pool.kv(tokens).reshape(batch, count, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
        return pool.q_norm(queries.transpose(1, 2)), pool.k_norm(keys), values

    @classmethod
    def infer_options(cls, state_dict: Mapping[str, torch.Tensor], embed_dim: int, num_heads: int) -> dict[str, Any]:
        hidden = state_dict.get("map.pool.mlp.fc1.weight")
        # The head count leaves no trace in the tensors: it is the backbone's unless the saved args say otherwise.
        return {} if hidden is None else {"map_mlp_ratio": hidden.shape[0] / hidden.shape[1]}
