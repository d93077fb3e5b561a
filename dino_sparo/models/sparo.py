"""SPARO read-out: L separately attended single-head slots over the encoder tokens (design.md §2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SPARO(nn.Module):
    """Replaces the last transformer block(s) with ``num_slots`` independent single-head attentions.

    Slot ``l`` owns query ``q_l`` and rows ``l*H:(l+1)*H`` of the key projection; by default the keys also
    serve as values. One output projection (H -> V) is shared by every slot. All slots are computed
    batched, with no Python loop.
    """

    def __init__(
        self,
        embed_dim: int,
        num_slots: int = 64,
        slot_dim: int = 64,
        attn_dim: int = 64,
        share_kv: bool = True,
        slot_norm: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_slots", num_slots), ("slot_dim", slot_dim),
                            ("attn_dim", attn_dim)):
            if value <= 0:
                raise ValueError(f"SPARO {name} must be positive, got {value}")
        self.embed_dim = embed_dim
        self.num_slots = num_slots
        self.slot_dim = slot_dim
        self.attn_dim = attn_dim
        self.share_kv = share_kv
        self.slot_norm = slot_norm

        self.queries = nn.Parameter(torch.randn(num_slots, attn_dim))
        self.key_proj = nn.Linear(embed_dim, num_slots * attn_dim)
        self.value_proj = None if share_kv else nn.Linear(embed_dim, num_slots * attn_dim)
        self.out_proj = nn.Linear(attn_dim, slot_dim)
        for linear in (self.key_proj, self.value_proj, self.out_proj):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    @property
    def output_dim(self) -> int:
        return self.num_slots * self.slot_dim

    def _split_slots(self, projected: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = projected.shape
        return projected.view(batch, tokens, self.num_slots, self.attn_dim).transpose(1, 2)  # (B, L, N, H)

    def forward(
        self, tokens: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` (B, N, D) -> encoding (B, L*V); with ``return_attention`` also the maps (B, L, N)."""
        keys = self._split_slots(self.key_proj(tokens))
        values = keys if self.value_proj is None else self._split_slots(self.value_proj(tokens))
        scores = torch.einsum("blnh,lh->bln", keys, self.queries.to(keys.dtype)) / math.sqrt(self.attn_dim)
        attention = scores.softmax(dim=-1)
        slots = self.out_proj(torch.einsum("bln,blnh->blh", attention, values))  # (B, L, V)
        if self.slot_norm:
            # Unit-norm encoding: a dot product between encodings is the mean per-slot cosine.
            slots = F.normalize(slots, dim=-1) * math.sqrt(1.0 / self.num_slots)
        encoding = slots.flatten(1)
        if return_attention:
            return encoding, attention
        return encoding

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_slots={self.num_slots}, slot_dim={self.slot_dim}, "
                f"attn_dim={self.attn_dim}, share_kv={self.share_kv}, slot_norm={self.slot_norm}")
