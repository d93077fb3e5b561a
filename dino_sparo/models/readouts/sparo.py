"""SPARO read-out (Vani et al., ECCV 2024): L separately attended single-head slots over the encoder tokens."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...cli import bool_flag, positive_int
from .base import INITIALISATION, OPTIMISATION, Option, Readout, restrict_to_slots

KEY_INIT_GAIN = 4.0


class SPARO(Readout):
    """Replaces the last transformer block(s) with ``num_slots`` independent single-head attentions.

    Slot ``l`` owns query ``q_l`` and rows ``l*H:(l+1)*H`` of the key projection; by default the keys also
    serve as values. One output projection (H -> V) is shared by every slot. All slots are computed
    batched, with no Python loop. The attention runs over every token it is given, CLS included.
    """

    name: ClassVar[str] = "sparo"
    summary: ClassVar[str] = "SPARO slots (by default replacing the last block)"
    state_prefix: ClassVar[str] = "sparo"
    replaced_blocks: ClassVar[int] = 1
    map_label: ClassVar[str] = "slot"
    options: ClassVar[tuple[Option, ...]] = (
        Option("sparo_slots", positive_int, 64, "L, number of SPARO slots", argument="num_slots"),
        Option("sparo_slot_dim", positive_int, 64, "V, output size of each slot"),
        Option("sparo_attn_dim", positive_int, None, "H, key/query size of each slot (default: embed_dim / heads)",
               derived=lambda embed_dim, num_heads: embed_dim // num_heads),
        Option("sparo_share_kv", bool_flag, True, "use the keys as values"),
        Option("sparo_slot_norm", bool_flag, True, "L2-normalise each slot, scaled by sqrt(1/L)"),
        Option("sparo_query_init_std", float, 1.0, "std of the queries' N(0, std) initialisation (with the key gain "
               "it sets the initial attention temperature)", role=INITIALISATION),
        Option("sparo_key_init_gain", float, KEY_INIT_GAIN, "gain of the key projection's xavier-uniform "
               "initialisation (the paper: 1); 4 lets the slots separate within short schedules; a --freeze_blocks "
               "retrofit starts near-uniform slots at 1, which match the frozen CLS token's k-NN from the first step",
               role=INITIALISATION, retrofit_default=1.0),
        Option("sparo_lr_mult", float, 1.0, "learning-rate multiplier of the SPARO read-out's parameters (queries, "
               "projections)", role=OPTIMISATION),
    )

    def __init__(
        self,
        embed_dim: int,
        num_slots: int = 64,
        slot_dim: int = 64,
        attn_dim: int = 64,
        share_kv: bool = True,
        slot_norm: bool = True,
        query_init_std: float = 1.0,
        key_init_gain: float = KEY_INIT_GAIN,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__(embed_dim, num_prefix_tokens)
        for name, value in (("embed_dim", embed_dim), ("num_slots", num_slots), ("slot_dim", slot_dim),
                            ("attn_dim", attn_dim)):
            if value <= 0:
                raise ValueError(f"SPARO {name} must be positive, got {value}")
        self.num_slots = num_slots
        self.slot_dim = slot_dim
        self.attn_dim = attn_dim
        self.share_kv = share_kv
        self.slot_norm = slot_norm

        # The paper's initialisation is queries N(0, 1), xavier-uniform projections and zero biases. Over the whole
        # (L*H, D) key matrix xavier gives logits so small that every slot starts near uniform attention, and short
        # schedules never leave it; a key gain of 4 makes the slots separate (docs/experiments/slot_specialisation.md).
        self.queries = nn.Parameter(torch.randn(num_slots, attn_dim) * query_init_std)
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
        queries = (self.queries / math.sqrt(self.attn_dim)).to(key_weight.dtype)
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

    @property
    def num_maps(self) -> int:
        return self.num_slots

    def attention_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens, return_attention=True)[1]

    @property
    def slot_layout(self) -> tuple[int, int]:
        return self.num_slots, self.slot_dim

    def probe_features(self, tokens: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor:
        """The encoding (or the chosen ``slots`` of it, renormalised as a whole) scaled to unit RMS per dimension
        (norm sqrt(dim)), the scale of a LayerNorm'd CLS token, so that one probe learning rate fits both."""
        encoding = self(tokens)
        if slots is not None:
            encoding = restrict_to_slots(encoding, slots, self.slot_dim)
        return F.normalize(encoding, dim=1) * math.sqrt(encoding.shape[1])

    @classmethod
    def parameter_group(cls, config: Mapping[str, Any], name: str, param: nn.Parameter) -> tuple[float, bool | None]:
        return float(config["sparo_lr_mult"]), None

    @classmethod
    def infer_options(cls, state_dict: Mapping[str, torch.Tensor], embed_dim: int, num_heads: int) -> dict[str, Any]:
        queries, out_proj = state_dict.get("sparo.queries"), state_dict.get("sparo.out_proj.weight")
        inferred: dict[str, Any] = {"sparo_share_kv": "sparo.value_proj.weight" not in state_dict}
        if queries is not None and queries.ndim == 2:
            inferred.update(sparo_slots=int(queries.shape[0]), sparo_attn_dim=int(queries.shape[1]))
        if out_proj is not None and out_proj.ndim == 2:
            inferred["sparo_slot_dim"] = int(out_proj.shape[0])
        return inferred

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_slots={self.num_slots}, slot_dim={self.slot_dim}, "
                f"attn_dim={self.attn_dim}, share_kv={self.share_kv}, slot_norm={self.slot_norm}")
