"""Runs every crop through the backbone grouped by resolution, then the head once on all of them."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` spans of consecutive crops of equal size (2 global crops: one span; N local: another)."""
    spans, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        spans.append((start, end))
        start = end
    return spans


class MultiCropWrapper(nn.Module):
    """``backbone`` then ``head`` over a list of crops.

    Consecutive crops of equal size are concatenated into one backbone pass (2 global crops: one pass;
    N local crops: another), and the head runs once on the features of all crops, so its batch statistics
    (BatchNorm) and kernels see the whole multi-crop batch. Outputs are in crop order.

    With frozen blocks (a retrofit: :meth:`VisionTransformer.freeze_blocks`), :meth:`frozen_tokens` computes
    the frozen blocks' outputs once, without a graph, and :meth:`forward` starts from them: the student and the
    teacher (whose frozen parts are identical) share one computation of them.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @torch.no_grad()
    def frozen_tokens(self, crops: Sequence[torch.Tensor], frozen_blocks: int) -> list[torch.Tensor]:
        """The tokens after the first ``frozen_blocks`` blocks, one tensor per resolution group."""
        return [self.backbone.frozen_tokens(torch.cat(list(crops[start:end])), frozen_blocks)
                for start, end in resolution_groups(crops)]

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor],
                frozen_tokens: Sequence[torch.Tensor] | None = None, frozen_blocks: int = 0) -> torch.Tensor:
        """Head outputs of ``crops``; with ``frozen_tokens`` (from :meth:`frozen_tokens` of these crops, or of a
        list that starts with them) the backbone starts after ``frozen_blocks`` blocks."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        for index, (start, end) in enumerate(resolution_groups(crops)):
            if frozen_tokens is None:
                features.append(self.backbone(torch.cat(list(crops[start:end]))))
            else:
                rows = sum(crop.shape[0] for crop in crops[start:end])
                features.append(self.backbone.forward_from(frozen_tokens[index][:rows], frozen_blocks))
        return self.head(torch.cat(features))
