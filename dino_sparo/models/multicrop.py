"""Runs every crop through the backbone grouped by resolution, then the head once on all of them."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """``backbone`` then ``head`` over a list of crops.

    Consecutive crops of equal size are concatenated into one backbone pass (2 global crops: one pass;
    N local crops: another), and the head runs once on the features of all crops, so its batch statistics
    (BatchNorm) and kernels see the whole multi-crop batch. Outputs are in crop order.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))
