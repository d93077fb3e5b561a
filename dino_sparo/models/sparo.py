"""SPARO read-out (Vani et al., ECCV 2024): L separately attended single-head slots over the encoder tokens."""
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
        logit_scale: bool = False,
        query_init_std: float = 1.0,
        key_init_gain: float = 4.0,
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

        # The paper's initialisation is queries N(0, 1), xavier-uniform projections and zero biases. Over the whole
        # (L*H, D) key matrix xavier gives logits so small that every slot starts near uniform attention, and short
        # schedules never leave it; a key gain of 4 (README: "Do my slots specialise?") makes the slots separate.
        self.queries = nn.Parameter(torch.randn(num_slots, attn_dim) * query_init_std)
        # Optional learnable per-slot temperature, multiplying the logits; starts at 1 (the paper's maths).
        self.logit_scale = nn.Parameter(torch.ones(num_slots)) if logit_scale else None
        self.key_proj = nn.Linear(embed_dim, num_slots * attn_dim)
        self.value_proj = None if share_kv else nn.Linear(embed_dim, num_slots * attn_dim)
        self.out_proj = nn.Linear(attn_dim, slot_dim)
        for linear in (self.key_proj, self.value_proj, self.out_proj):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight, gain=key_init_gain if linear is self.key_proj else 1.0)
                nn.init.zeros_(linear.bias)

    @property
    def output_dim(self) -> int:
        return self.num_slots * self.slot_dim

    def _per_slot(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (L, H, D) and bias (L, H) of a projection whose rows ``l*H:(l+1)*H`` belong to slot ``l``."""
        return (linear.weight.view(self.num_slots, self.attn_dim, self.embed_dim),
                linear.bias.view(self.num_slots, self.attn_dim))

    def forward(
        self, tokens: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` (B, N, D) -> encoding (B, L*V); with ``return_attention`` also the maps (B, L, N).

        Same maths as projecting every token to every slot's keys, but never builds those (B, N, L*H) keys:
        the query is folded into the key projection (q_l . (K_l x + b_l) = (q_l K_l) x + q_l . b_l) and,
        because each attention row sums to 1, the value projection is applied to the attention-pooled
        tokens (sum_n a_ln (K_l x_n + b_l) = K_l (sum_n a_ln x_n) + b_l). That is about L*H/(L + H) times
        fewer multiply-adds than projecting every token.
        """
        key_weight, key_bias = self._per_slot(self.key_proj)
        queries = self.queries / math.sqrt(self.attn_dim)
        if self.logit_scale is not None:
            queries = queries * self.logit_scale[:, None]
        queries = queries.to(key_weight.dtype)
        score_weight = torch.einsum("lh,lhd->ld", queries, key_weight)
        score_bias = (queries * key_bias).sum(dim=-1)
        attention = F.linear(tokens, score_weight, score_bias).transpose(1, 2).softmax(dim=-1)  # (B, L, N)
        pooled_tokens = attention @ tokens.to(attention.dtype)  # (B, L, D)
        value_weight, value_bias = ((key_weight, key_bias) if self.value_proj is None
                                    else self._per_slot(self.value_proj))
        pooled = torch.einsum("bld,lhd->blh", pooled_tokens, value_weight.to(pooled_tokens.dtype)) + value_bias
        slots = self.out_proj(pooled)  # (B, L, V)
        if self.slot_norm:
            # Unit-norm encoding: a dot product between encodings is the mean per-slot cosine.
            slots = F.normalize(slots, dim=-1) * math.sqrt(1.0 / self.num_slots)
        encoding = slots.flatten(1)
        if return_attention:
            return encoding, attention
        return encoding

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_slots={self.num_slots}, slot_dim={self.slot_dim}, "
                f"attn_dim={self.attn_dim}, share_kv={self.share_kv}, slot_norm={self.slot_norm}, "
                f"logit_scale={self.logit_scale is not None}")
