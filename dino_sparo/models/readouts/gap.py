"""Global average pooling: the mean of the final-normed patch tokens (prefix tokens left out)."""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import Readout


class GAPReadout(Readout):
    name: ClassVar[str] = "gap"
    summary: ClassVar[str] = "mean of the patch tokens"
    state_prefix: ClassVar[str] = "gap_readout"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)
