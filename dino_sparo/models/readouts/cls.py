"""DINO's read-out: the CLS token of the last block, after the final LayerNorm (Caron et al., ICCV 2021)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .base import Readout


class CLSReadout(Readout):
    name: ClassVar[str] = "cls"
    summary: ClassVar[str] = "DINO's CLS token"
    state_prefix: ClassVar[str] = "cls_readout"
    # DINO's linear probe for ViT-S: the CLS tokens of the last 4 blocks (ViT-B: 1, with the patch mean).
    probe_cls_blocks: ClassVar[int] = 4

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]

    def probe_features(self, tokens: torch.Tensor, slots: Sequence[int] | None = None) -> None:
        return None
