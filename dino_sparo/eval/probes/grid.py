"""A grid of probe heads trained at once on the same frozen inputs (DINOv2's linear evaluation: learning rates x
feature sets), their accuracies, and the choice among them on held-out training images."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed


@dataclass(frozen=True)
class GridPoint:
    """One head of the grid: it reads input set ``inputs`` and trains at base learning rate ``lr`` (for a total
    batch of 256, scaled linearly with the total batch)."""
    inputs: int
    lr: float


class ProbeGrid(nn.Module):
    """One head per :class:`GridPoint`, each built by ``make_head(point.inputs)`` from the random state
    ``torch.manual_seed(seed)``: heads of the same shape start equal, so within an input set the learning rate is
    the only difference between them. ``forward(inputs)`` is the list of every head's logits."""

    def __init__(self, make_head: Callable[[int], nn.Module], points: Sequence[GridPoint], seed: int) -> None:
        super().__init__()
        self.points = list(points)
        heads = []
        for point in self.points:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                heads.append(make_head(point.inputs))
        self.heads = nn.ModuleList(heads)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(inputs[point.inputs]) for head, point in zip(self.heads, self.points)]


def grid_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The sum of every head's cross-entropy: the heads share no parameter, so each one's gradient is that of its
    own loss, as if it were trained alone."""
    return torch.stack([F.cross_entropy(head_logits, labels) for head_logits in logits]).sum()


@dataclass
class Scores:
    """One head's accuracy (percent) and mean loss over a set of ``images``."""
    acc1: float
    acc5: float
    loss: float
    images: int


class GridScores:
    """Running sums of every head's loss, top-1 and top-5 hits over this process's batches; :meth:`reduce` adds up
    those of all processes."""

    def __init__(self, num_heads: int) -> None:
        self.sums = torch.zeros(num_heads, 3, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits
        self.images = 0

    @torch.no_grad()
    def add(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        for index, head_logits in enumerate(logits):
            ranked = head_logits.topk(min(5, head_logits.shape[1]), dim=1).indices == labels.view(-1, 1)
            self.sums[index] += torch.tensor([F.cross_entropy(head_logits.float(), labels, reduction="sum").item(),
                                              ranked[:, 0].sum().item(), ranked.any(dim=1).sum().item()],
                                             dtype=torch.float64)
        self.images += labels.numel()

    def reduce(self) -> list[Scores]:
        totals = distributed.all_reduce_sum(torch.cat([self.sums.flatten(),
                                                       torch.tensor([self.images], dtype=torch.float64)]))
        images = int(totals[-1])
        sums = totals[:-1].view(-1, 3) / max(1, images)
        return [Scores(100 * float(top1), 100 * float(top5), float(loss), images) for loss, top1, top5 in sums]


def choose(holdout: Sequence[Scores]) -> int:
    """The head with the best held-out top-1; among equals, the lowest held-out loss, then the first."""
    return min(range(len(holdout)), key=lambda i: (-holdout[i].acc1, holdout[i].loss, i))

