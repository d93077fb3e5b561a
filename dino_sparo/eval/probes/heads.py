"""The trainable heads of the probes on frozen inputs: DINO's linear classifier, Efficient Probing's multi-query
cross-attention and the common cross-attention pooler with a learned query. Each maps what
:mod:`~dino_sparo.eval.probes.inputs` gives it to class logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ...errors import UserError

PROBES = ("linear", "attentive", "cross_attention")


class LinearClassifier(nn.Module):
    """One linear layer on frozen features: weight N(0, 0.01), zero bias, as DINO's."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


class EfficientProbe(nn.Module):
    """Efficient Probing (Psomas et al., "Attention, Please! Revisiting Attentive Probing Through the Lens of
    Efficiency", ICLR 2026; its ``poolings/ep.py`` and ``probe_heads.py``) on tokens x (B, N, D).

    Of multi-head cross-attention it keeps only the value projection W_v (D x D, no bias): the Q queries are
    learned vectors in token space (no query projection), the keys are the tokens themselves (no key projection),
    and there is no output projection. Query q attends over the tokens with softmax(q . x_n / sqrt(D)) and reads
    its own slice of D / Q value dimensions; the Q slices, concatenated (D dims), go through a BatchNorm without
    affine parameters and one linear layer, as the paper's probe head does.
    """

    def __init__(self, dim: int, num_labels: int, num_queries: int = 32) -> None:
        super().__init__()
        if num_queries < 1 or dim % num_queries:
            raise ValueError(f"{num_queries} queries must divide the token width {dim}")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.value = nn.Linear(dim, dim, bias=False)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_labels)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, Q, N) attention of each query over the tokens; rows sum to 1."""
        logits = torch.einsum("qd,bnd->bqn", self.queries[0], tokens) / math.sqrt(tokens.shape[-1])
        return logits.softmax(dim=-1)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D): query q's attention-weighted sum of its slice q of the projected values, for every q."""
        batch, num_tokens, dim = tokens.shape
        values = self.value(tokens).view(batch, num_tokens, self.num_queries, dim // self.num_queries)
        return torch.einsum("bqn,bnqc->bqc", self.attention(tokens), values).flatten(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.pool(tokens)))


class CrossAttentionProbe(nn.Module):
    """The common attentive probe (V-JEPA's ``AttentivePooler`` + ``AttentiveClassifier``, the form DINOv3's
    attention-pooling evaluation also takes): one pre-norm cross-attention block whose ``num_queries`` learned
    queries (usually one) attend over the tokens with full query/key/value and output projections, then an MLP
    with a residual, then one linear layer on the queries' outputs, concatenated. Initialisation as V-JEPA's:
    truncated normal (std 0.02) for the queries and the block's linear layers, zero biases, the output projection
    and the MLP's second layer divided by sqrt(2)."""

    def __init__(self, dim: int, num_labels: int, num_heads: int, num_queries: int = 1,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_queries < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"{num_heads} heads must divide the token width {dim}")
        self.num_heads, self.num_queries = num_heads, num_queries
        self.queries = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        nn.init.trunc_normal_(self.queries, std=0.02)
        for layer in (self.q, self.kv, self.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.proj.weight.div_(math.sqrt(2.0))
            self.mlp.fc2.weight.div_(math.sqrt(2.0))
        self.linear = nn.Linear(num_queries * dim, num_labels)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, Q, D): the queries after the cross-attention block."""
        batch, num_tokens, dim = tokens.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        queries = self.queries.expand(batch, -1, -1)
        q = self.q(queries).view(batch, -1, heads, head_dim).transpose(1, 2)
        k, v = self.kv(self.norm1(tokens)).view(batch, num_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, dim)
        queries = queries + self.proj(attended)
        return queries + self.mlp(self.norm2(queries))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(tokens).flatten(1))


def default_queries(probe: str) -> int:
    """Efficient Probing's 32 queries; the common pooler's one."""
    return 32 if probe == "attentive" else 1


def build_head(probe: str, dim: int, num_labels: int, num_queries: int | None = None,
               num_heads: int | None = None) -> nn.Module:
    """The head of ``probe`` for inputs of width ``dim``; an impossible shape is a :class:`UserError`.
    ``num_heads`` (cross_attention only) defaults to dim / 64, as V-JEPA's ViT-B/L poolers (12, 16 heads)."""
    queries = default_queries(probe) if num_queries is None else num_queries
    if queries < 1:
        raise UserError(f"--probe_queries must be >= 1, got {queries}")
    if probe == "linear":
        return LinearClassifier(dim, num_labels)
    if probe == "attentive":
        if dim % queries:
            raise UserError(f"--probe_queries {queries} does not divide the token width {dim}: each of the Q "
                            f"queries of Efficient Probing reads D / Q value dimensions")
        return EfficientProbe(dim, num_labels, queries)
    if probe == "cross_attention":
        heads = max(1, dim // 64) if num_heads is None else num_heads
        if heads < 1 or dim % heads:
            raise UserError(f"--probe_heads {heads} does not divide the token width {dim}")
        return CrossAttentionProbe(dim, num_labels, heads, queries)
    raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
