"""SimPool (Psomas et al., "Keep It SimPool: Who Said Supervised Transformers Suffer from Attention Deficit?",
ICCV 2023): the mean patch token is the query of one attention over the LayerNorm'd patch tokens, which also serve
as the values, pooled by a generalised mean; the CLS token is not used."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...cli import positive_int
from .base import Option, Readout

_EPS = 1e-6


class SimPoolReadout(Readout):
    """For the P patch tokens X (prefix tokens left out): q = W_q mean(X), K = W_k LN(X), V = LN(X),
    a = softmax(q K^T / sqrt(d)) per head, and the encoding is (sum_p a_p (v_p - m + eps)^gamma)^(1/gamma), with m the
    per-channel minimum over the image's patches (the paper's shift to positive values; the authors' code takes the
    minimum over the whole batch, which would make an image's encoding depend on its batch). gamma 0 pools the
    values linearly (sum_p a_p v_p). Defaults are the paper's for ViTs: one head, no q/k bias, gamma 1.25."""

    name: ClassVar[str] = "simpool"
    summary: ClassVar[str] = "SimPool: attention pooling queried by the mean patch token"
    state_prefix: ClassVar[str] = "simpool"
    map_label: ClassVar[str] = "head"
    options: ClassVar[tuple[Option, ...]] = (
        Option("simpool_heads", positive_int, 1, "attention heads of the SimPool read-out", argument="num_heads"),
        Option("simpool_gamma", float, 1.25, "exponent of SimPool's generalised-mean pooling (the paper: 1.25 for "
               "ViTs, 2 for convnets); 0 pools linearly", argument="gamma"),
    )

    def __init__(self, embed_dim: int, num_heads: int = 1, gamma: float = 1.25, num_prefix_tokens: int = 1) -> None:
        super().__init__(embed_dim, num_prefix_tokens)
        if embed_dim % num_heads:
            raise ValueError(f"SimPool heads ({num_heads}) must divide embed_dim ({embed_dim})")
        if gamma < 0:
            raise ValueError(f"SimPool gamma must be >= 0, got {gamma}")
        self.num_heads, self.head_dim, self.gamma = num_heads, embed_dim // num_heads, gamma
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.query_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.key_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        for linear in (self.query_proj, self.key_proj):  # as the ViT's own linear layers
            nn.init.trunc_normal_(linear.weight, std=0.02)

    def _attention(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention (B, heads, P), values (B, heads, P, d)) over the patch tokens (B, P, D)."""
        batch, count, _ = patches.shape
        normed = self.norm(patches)
        query = self.query_proj(patches.mean(dim=1)).view(batch, self.num_heads, 1, self.head_dim)
        keys = self.key_proj(normed).view(batch, count, self.num_heads, self.head_dim).transpose(1, 2)
        attention = (query @ keys.transpose(-2, -1) / self.head_dim ** 0.5).softmax(dim=-1)[:, :, 0]
        return attention, normed.view(batch, count, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attention, values = self._attention(tokens[:, self.num_prefix_tokens:])
        if self.gamma:
            shifted = values - values.amin(dim=2, keepdim=True) + _EPS
            pooled = (attention.unsqueeze(-1) * shifted.pow(self.gamma)).sum(dim=2).pow(1.0 / self.gamma)
        else:
            pooled = (attention.unsqueeze(-1) * values).sum(dim=2)
        return pooled.flatten(1)

    @property
    def num_maps(self) -> int:
        return self.num_heads

    def attention_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, heads, N) over every token read, zero on the prefix tokens (SimPool attends to patches only)."""
        attention, _ = self._attention(tokens[:, self.num_prefix_tokens:])
        return torch.cat([attention.new_zeros(*attention.shape[:2], self.num_prefix_tokens), attention], dim=-1)
