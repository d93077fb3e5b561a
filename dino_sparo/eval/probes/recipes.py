"""How the probe grid is trained: the optimiser, the epochs, the warm-up, the learning-rate schedule and the default
grid of learning rates, as one named recipe."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ...optim import LARS

# DINOv2's linear-evaluation grid (its eval/linear.py: 1e-5 ... 0.1), extended by 0.2 and 0.5 for features whose
# scale needs larger rates; each is for a total batch of 256, scaled linearly with the total batch.
DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5)
# The LARS base learning rates Efficient Probing searched (its search_linprobe.py); 0.1 is its default.
EFFICIENT_PROBING_LEARNING_RATES = (0.1, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5)


@dataclass(frozen=True)
class Recipe:
    """``optimizer``: ``sgd`` (momentum 0.9) or ``lars`` (momentum 0.9, trust coefficient 0.001); no weight decay
    in either. The schedule is a linear warm-up over ``warmup_fraction`` of the epochs then a half cosine to 0,
    set once per epoch (DINO) or at every iteration (``per_iteration``, MAE and Efficient Probing)."""
    name: str
    optimizer: str
    epochs: int
    warmup_fraction: float
    per_iteration: bool
    learning_rates: tuple[float, ...]
    summary: str

    def warmup_epochs(self, epochs: int) -> int:
        return round(self.warmup_fraction * epochs)


RECIPES = {
    "dino": Recipe("dino", "sgd", 100, 0.0, False, DINOV2_LEARNING_RATES,
                   "DINO's linear protocol: SGD momentum 0.9, no weight decay, cosine per epoch, 100 epochs; "
                   "DINOv2's grid of learning rates"),
    "efficient_probing": Recipe("efficient_probing", "lars", 90, 10 / 90, True, EFFICIENT_PROBING_LEARNING_RATES,
                                "Efficient Probing's protocol: LARS, no weight decay, 10 warm-up epochs of 90 "
                                "then cosine per iteration; base learning rates around its 0.1"),
}


def default_recipe(probe: str) -> str:
    """Efficient Probing's recipe for its probe; DINO's for the linear probe and the common pooler."""
    return "efficient_probing" if probe == "attentive" else "dino"


def lr_factor(progress: float, epochs: int, warmup_epochs: int) -> float:
    """The fraction of the base learning rate at ``progress`` epochs into the run (an integer for a per-epoch
    schedule): ``progress / warmup`` during the warm-up, then ``(1 + cos(pi t)) / 2`` with t going from 0 to 1
    over the remaining epochs (MAE's ``adjust_learning_rate``; without warm-up, at integer epochs, torch's
    ``CosineAnnealingLR`` with ``eta_min=0`` as DINO's eval_linear uses it)."""
    if progress < warmup_epochs:
        return progress / warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_epochs) / (epochs - warmup_epochs)))


def build_optimizer(recipe: Recipe, param_groups: Iterable[dict]) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``param_groups``, each with its own ``lr`` (set by the schedule)."""
    if recipe.optimizer == "lars":
        return LARS(param_groups, weight_decay=0.0, momentum=0.9)
    return torch.optim.SGD(param_groups, lr=0.0, momentum=0.9, weight_decay=0.0)
