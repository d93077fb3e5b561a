"""SPARO slots as separate features: restriction to chosen slots, per-slot k-NN and slot selection.

Slot ``l`` of an encoding is dims ``l*V:(l+1)*V``. A set of slots is evaluated as its concatenation,
L2-normalised as a whole (with the default slot normalisation that is the mean per-slot cosine).
Selection (the paper's concept selection) looks only at the training set: a held-out part of train,
fixed by the seed, is classified by k-NN against the rest of train.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import distributed
from ..errors import UserError
from ..models.backbone import ReadoutBackbone
from ..models.readouts import restrict_to_slots
from .knn import sharded_knn


def slot_layout(model: ReadoutBackbone, flag: str) -> tuple[int, int]:
    """(L, V) of a model whose encoding is made of slots (SPARO); any other read-out is a :class:`UserError`
    naming ``flag``."""
    layout = model.readout_module.slot_layout
    if layout is None:
        raise UserError(f"{flag} needs an encoding made of slots (SPARO), but this model's read-out is "
                        f"{model.readout!r}")
    return layout


def check_slots(slots: Sequence[int], num_slots: int, flag: str = "--slots") -> list[int]:
    """``slots`` (as parsed by :func:`dino_sparo.cli.slot_list`) if every index exists in a model of
    ``num_slots`` slots, else a :class:`UserError` naming those that do not."""
    outside = [slot for slot in slots if not 0 <= slot < num_slots]
    if outside:
        raise UserError(f"{flag} {', '.join(map(str, outside))} out of range: this model has {num_slots} slots "
                        f"(indices 0 to {num_slots - 1})")
    return list(slots)


@dataclass
class SlotScore:
    slot: int
    top1: float
    top5: float


def per_slot_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_slots: int, slot_dim: int, k: int, T: float,
                 num_classes: int) -> list[SlotScore]:
    """k-NN accuracy of every single slot (each re-normalised), best first (ties: lower index first).

    Arguments are this rank's shards, as for :func:`~dino_sparo.eval.knn.sharded_knn`.
    """
    scores = []
    for slot in range(num_slots):
        top1, top5 = sharded_knn(restrict_to_slots(train_features, [slot], slot_dim), train_labels,
                                 restrict_to_slots(test_features, [slot], slot_dim), test_labels,
                                 [k], T, num_classes)[k]
        scores.append(SlotScore(slot, top1, top5))
    return sorted(scores, key=lambda score: (-score.top1, -score.top5, score.slot))


def holdout_mask(num_items: int, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask over ``num_items`` marking a random ``fraction`` (at least one item, never all)."""
    if num_items < 2:
        raise UserError(f"slot selection needs at least 2 training images, got {num_items}")
    count = min(num_items - 1, max(1, round(fraction * num_items)))
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(num_items, dtype=torch.bool)
    mask[torch.randperm(num_items, generator=generator)[:count]] = True
    return mask


@dataclass
class SlotSelection:
    slots: list[int]                # chosen slots, best first
    holdout_scores: list[SlotScore]  # every slot scored on the held-out part of train, best first
    holdout_size: int


def select_slots(train_features: torch.Tensor, train_labels: torch.Tensor, count: int, num_slots: int,
                 slot_dim: int, k: int, T: float, num_classes: int, holdout_fraction: float = 0.1,
                 seed: int = 0) -> SlotSelection:
    """Chooses ``count`` slots from the training set alone (no validation data is passed in).

    A ``holdout_fraction`` of train, fixed by ``seed`` over the global train order, is classified by k-NN
    against the remaining train images with each single slot; the ``count`` best slots are chosen. The
    arguments are this rank's contiguous shard of train (as split by :func:`~dino_sparo.data.datasets.shard`),
    so the held-out part is the same whatever the number of processes.
    """
    if not 1 <= count <= num_slots:
        raise UserError(f"--select_slots must be between 1 and the number of slots ({num_slots}), got {count}")
    sizes = distributed.all_gather_sizes(train_features.shape[0])
    start = sum(sizes[: distributed.get_rank()])
    mask = holdout_mask(sum(sizes), holdout_fraction, seed)[start:start + train_features.shape[0]]
    feature_mask, label_mask = mask.to(train_features.device), mask.to(train_labels.device)
    scores = per_slot_knn(train_features[~feature_mask], train_labels[~label_mask], train_features[feature_mask],
                          train_labels[label_mask], num_slots, slot_dim, k, T, num_classes)
    holdout_size = int(distributed.all_reduce_sum(mask.long().sum()))
    return SlotSelection([score.slot for score in scores[:count]], scores, holdout_size)
