"""The read-outs computed the straightforward way, as first written: the benchmark's baseline runs them
(:func:`benchmarks.reference_step.make_reference_style`), and the tests check that each equals its read-out's own
forward, so that the baseline does the same maths as the fast path, only the plain way."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dino_sparo.models.readouts import SPARO, MAPReadout, Readout


def sparo_per_token(sparo: SPARO, tokens: torch.Tensor) -> torch.Tensor:
    """SPARO as first written: keys (B, L, N, H) of every token for every slot, then the weighted sum."""
    batch, num_tokens, _ = tokens.shape
    keys = sparo.key_proj(tokens).view(batch, num_tokens, sparo.num_slots, sparo.attn_dim).transpose(1, 2)
    values = keys if sparo.value_proj is None else \
        sparo.value_proj(tokens).view(batch, num_tokens, sparo.num_slots, sparo.attn_dim).transpose(1, 2)
    logits = torch.einsum("blnh,lh->bln", keys, sparo.queries) / math.sqrt(sparo.attn_dim)
    slots = sparo.out_proj(torch.einsum("bln,blnh->blh", logits.softmax(dim=-1), values))
    if sparo.slot_norm:
        slots = F.normalize(slots, dim=-1) * math.sqrt(1.0 / sparo.num_slots)
    return slots.flatten(1)


def map_explicit_softmax(readout: MAPReadout, tokens: torch.Tensor) -> torch.Tensor:
    """MAP with an explicit softmax (timm's layer uses fused attention where it can)."""
    pool, (batch, count, _) = readout.pool, tokens.shape
    queries = pool.q(pool.latent.expand(batch, -1, -1)).reshape(batch, 1, pool.num_heads, pool.head_dim)
    keys, values = pool.kv(tokens).reshape(batch, count, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
    queries, keys = pool.q_norm(queries.transpose(1, 2)), pool.k_norm(keys)
    attention = ((queries * pool.scale) @ keys.transpose(-2, -1)).softmax(dim=-1)
    pooled = pool.proj((attention @ values).transpose(1, 2).reshape(batch, 1, readout.embed_dim))
    return (pooled + pool.mlp(pool.norm(pooled)))[:, 0]


# The read-outs whose fast forward differs from the plain one; every other read-out is its own reference.
REFERENCE_FORWARDS: dict[type[Readout], Callable[[Readout, torch.Tensor], torch.Tensor]] = {
    SPARO: sparo_per_token,
    MAPReadout: map_explicit_softmax,
}


def reference_forward(readout: Readout, tokens: torch.Tensor) -> torch.Tensor:
    """``readout`` of ``tokens`` as first written: its entry in :data:`REFERENCE_FORWARDS`, else its class's own
    forward."""
    return REFERENCE_FORWARDS.get(type(readout), type(readout).forward)(readout, tokens)
